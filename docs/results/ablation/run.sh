#!/bin/bash
# Issue 12's ablation on a lent GPU machine: the paper's Table 4, joint vs two-stage training and three stage-2
# data ratios, 3 seeds each, on configs/shapes-gpu.yaml with a shortened schedule (30 + 30 stage-1 steps, 300
# stage-2 steps; the committed recipe runs 60 + 60 + 1,200). Run from the repository root:
#   SEEDS=2 bash docs/results/ablation/run.sh     # a first device call: the tokenizer and seeds 0-1
#   SEEDS=3 bash docs/results/ablation/run.sh     # a second: seed 2 (finished runs are reused)
# LIMIT bounds the ablate command (a device call lasts at most 10 minutes); what it finished is kept.
# SMOKE=1: a CPU rehearsal on a tiny budget.
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ablation_out}; mkdir -p "$OUT"
ABL=runs/ablation-gpu
ARGS=(--set stages.0.steps=30 --set stages.1.steps=30 --set stages.2.steps=300)
if [ -n "$SMOKE" ]; then
  ABL=runs/ablation-smoke
  ARGS=(--set model.preset=shapes-tiny --set data.shapes.train_images=64 --set vq_train.steps=3
        --set stages.0.steps=2 --set stages.1.steps=2 --set stages.2.steps=4 --set stages.0.batch=[4,0]
        --set stages.1.batch=[0,4] --set stages.2.batch=[4,4] --set run.device=cpu)
fi
nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null
python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__)"
T0=$(date +%s)
timeout "${LIMIT:-520}" python3 -m omnimamba.cli ablate --config configs/shapes-gpu.yaml "${ARGS[@]}" \
  --seeds "${SEEDS:-3}" --jobs "${JOBS:-14}" --n-images 50 --n-prompts 96 --out $ABL 2>&1 | tee "$OUT/ablate.log"
echo "ablate ended after $(( $(date +%s) - T0 )) s"
# What comes back: the report, every finished run's score and log, the shared tokenizer (to resume elsewhere).
tar czf "$OUT/ablation.tgz" --exclude="*.pt" --exclude=codes.safetensors --exclude="stage*" --exclude=checkpoints $ABL
ls -la "$OUT"
