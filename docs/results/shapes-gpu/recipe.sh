#!/bin/bash
# Issue 11 on one GPU: configs/shapes-gpu.yaml as committed (run A; VARIANTS=1 adds two learning rates beside it),
# then the full evaluation and a guidance sweep of A. Results land in $OUT/runs.tgz. SMOKE=1: a CPU rehearsal.
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
OUT=${OUT:-/tmp/recipe_out}; mkdir -p $OUT runs; [ -n "$SMOKE" ] && [ -z "$RESUME" ] && rm -rf runs/[ABC]*
[ -z "$RESUME" ] && rm -f runs/[ABC].log
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
TRAIN_LIMIT=${TRAIN_LIMIT:-445}; EVAL_LIMIT=${EVAL_LIMIT:-75}
# RECIPE_SET: more training overrides for every run, e.g. RECIPE_SET="--set model.overrides.backbone.d_conv=17"
read -r -a EXTRA <<< "${RECIPE_SET:-}"
if [ -n "$SMOKE" ]; then
  EXTRA+=(--set data.shapes.train_images=64 --set vq_train.steps=3 --set stages.0.steps=2 --set stages.1.steps=2
         --set stages.2.steps=4 --set stages.0.batch=[4,0] --set stages.1.batch=[0,4] --set stages.2.batch=[4,4]
         --set run.eval_every=2 --set model.preset=shapes-tiny --set run.eval_images=2 --set run.eval_prompts=2 --set run.device=cpu)
  EVAL_ARGS=(--n-images 2 --n-prompts 2 --device cpu); SWEEP_ARGS=(--n-prompts 2 --seeds 1 --scales 1 3 --device cpu)
else
  EVAL_ARGS=(--n-images 100 --n-prompts 200 --guidance ${GUIDANCE:-2}); SWEEP_ARGS=(--n-prompts 96 --seeds 2 --scales 1 2 3 5)
fi
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null
python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__)"
SEED=${SEED:-0}
# RESUME=1: continue runs/A from its newest checkpoint (a run longer than one device call, over calls on a warm
# machine: RECIPE_SET="--set stages.2.steps=2400 --set run.ckpt_every=200"); the log is appended to
start() { name=$1; shift
  setsid nohup timeout $TRAIN_LIMIT python3 -m omnimamba.cli train --config configs/shapes-gpu.yaml ${RESUME:+--resume} \
    --set run.out=runs/$name --set run.seed=$SEED --set run.progress=false "${EXTRA[@]}" "$@" >> runs/$name.log 2>&1 < /dev/null & }
start A
[ -n "$VARIANTS" ] && { start B --set stages.2.lr=2e-3; start C --set stages.2.lr=3e-3; }
while pgrep -f "omnimamba.cli train" > /dev/null; do
  sleep ${POLL:-30}
  echo "--- $(el) s"; for f in runs/[A-Z].log; do echo "$f: $(grep -E 'tokenizer|eval|saved|Error' $f | tail -n 2 | cut -c1-220 | tr '\n' ' ')"; done
  nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader 2>/dev/null
done
echo "training done at $(el) s"
for n in A B C; do
  if [ -f runs/$n/stage2-unified/config.json ]; then
    timeout $EVAL_LIMIT python3 -m omnimamba.cli evaluate --model runs/$n/stage2-unified --out runs/$n/evaluation \
      "${EVAL_ARGS[@]}" > runs/$n.eval.log 2>&1 &
  fi
done
wait; echo "evaluation done at $(el) s"
# SWEEP=0 skips the guidance sweep (the call's remaining time goes to whatever runs after this script)
if [ -f runs/A/stage2-unified/config.json ] && [ "${SWEEP:-1}" != 0 ]; then
  timeout $(( ${BUDGET:-575} - $(el) )) python3 -m omnimamba.cli guidance --model runs/A/stage2-unified \
    --out runs/A/guidance.json "${SWEEP_ARGS[@]}" > runs/A.guidance.log 2>&1
fi
echo "all done at $(el) s"
tar czf $OUT/runs.tgz --exclude="*.safetensors" --exclude="*.pt" --exclude=checkpoints runs/A runs/A.*log runs/A.log 2>&1 | tail -2
ls -la $OUT
