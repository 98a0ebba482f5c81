#!/bin/bash
# Issue 12's ablation on a lent GPU machine: the paper's Table 4, joint vs two-stage training and three stage-2
# data ratios, 3 seeds each, on configs/shapes-gpu.yaml with a shortened schedule (30 + 30 stage-1 steps, 300
# stage-2 steps; the committed recipe runs 60 + 60 + 1,200). Run from the repository root:
#   SEEDS=2 bash docs/results/ablation/run.sh     # a first device call: the tokenizer and seeds 0-1
#   SEEDS=3 bash docs/results/ablation/run.sh     # a second: seed 2 (finished runs are reused)
# LIMIT bounds the ablate command (a device call lasts at most 10 minutes); what it finished is kept.
# BACKEND=reference: train and score with the pure-PyTorch kernels (no Triton compilation), into
# runs/ablation-gpu-reference. EXTRA: more --set options (e.g. "--set run.micro_batch=64"). SMOKE=1: a CPU rehearsal on a tiny budget.
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1
# Triton's compiled kernels cost each process minutes on a cold cache (README.md here). They are kept in
# .triton-cache (ignored by git) and come back as $OUT/triton-cache.tgz when that fits (16 MiB a file), so a later
# call can unpack them into .triton-cache and carry it. (Added after the calls measured here; not used by them.)
export TRITON_CACHE_DIR=${TRITON_CACHE_DIR:-$PWD/.triton-cache}
OUT=${OUT:-/tmp/ablation_out}; mkdir -p "$OUT"
ABL=runs/ablation-gpu
ARGS=(--set stages.0.steps=30 --set stages.1.steps=30 --set stages.2.steps=300)
if [ -n "$BACKEND" ]; then
  ABL=runs/ablation-gpu-$BACKEND
  ARGS+=(--set run.backend=$BACKEND)
fi
ARGS+=($EXTRA)
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
[ -d "$TRITON_CACHE_DIR" ] && tar czf "$OUT/triton-cache.tgz" -C "$TRITON_CACHE_DIR" .
[ "$(stat -c %s "$OUT/triton-cache.tgz" 2>/dev/null || echo 0)" -le 16000000 ] || rm -f "$OUT/triton-cache.tgz"
ls -la "$OUT"
