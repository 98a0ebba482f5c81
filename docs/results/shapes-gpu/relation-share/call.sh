#!/usr/bin/env bash
# configs/shapes-gpu.yaml with data.shapes.relation_share=SHARE (default 1.0), training seed SEED (default 0), over
# device calls on one warm machine: a call without the trained model trains it (RESUME=1: from the newest
# checkpoint of an earlier call's cut-off run); a call that finds it (and has time) evaluates it at guidance 2 (100
# images, 200 prompts) with benchmarks/state_dtype.py beside it (issue 14). $OUT/runs.tgz holds the logs and
# metrics, $OUT/state_dtype_shapes_gpu.{json,log} the state check.
set -uo pipefail
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
export PYTHONPATH=src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
python3 -m pip install --no-deps --no-index .wheels/*.whl -q 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
mkdir -p runs; M=runs/A/stage2-unified
if [ ! -f $M/config.json ]; then
  timeout ${TRAIN_LIMIT:-575} python3 -m omnimamba.cli train --config configs/shapes-gpu.yaml ${RESUME:+--resume} \
    --set run.out=runs/A --set run.seed=${SEED:-0} --set run.progress=false \
    --set data.shapes.relation_share=${SHARE:-1.0} >> runs/A.log 2>&1
  echo "training: rc $? at $(el) s"; grep -E "tokenizer:|^eval|saved" runs/A.log | tail -8
fi
if [ -f $M/config.json ] && [ $(el) -lt 420 ]; then
  timeout $(( ${CALL_LIMIT:-585} - $(el) )) python3 benchmarks/state_dtype.py --model $M --n-images 100 \
    --n-prompts 96 --seeds 0 1 2 --guidance 2 --epsilon 0.001 --out $OUT/state_dtype_shapes_gpu.json \
    > $OUT/state_dtype_shapes_gpu.log 2>&1 &
  timeout ${EVAL_LIMIT:-150} python3 -m omnimamba.cli evaluate --model $M --out runs/A/evaluation --n-images 100 \
    --n-prompts 200 --guidance 2 > runs/A.eval.log 2>&1
  echo "evaluation: rc $? at $(el) s"; grep -vE "it/s|s/it" runs/A.eval.log | tail -22
  wait; echo "state check at $(el) s"; tail -8 $OUT/state_dtype_shapes_gpu.log
fi
tar czf $OUT/runs.tgz --exclude="*.safetensors" --exclude="*.pt" --exclude=checkpoints runs/A runs/A.log \
  $(ls runs/A.eval.log 2>/dev/null)
echo "call total: $(el) s"
