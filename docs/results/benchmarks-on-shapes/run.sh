#!/bin/bash
# The quickstart model through 'omnimamba eval' on the Shapes test split written in each benchmark's own
# format (POPE, MME, VQAv2, MMBench), and FID on its captions. Run from the repository root after `make quickstart`:
#   bash docs/results/benchmarks-on-shapes/run.sh [MODEL] [N_IMAGES]
# Writes data and predictions under runs/benchmarks-on-shapes and copies each summary.json and report.txt here.
set -euo pipefail
MODEL=${1:-runs/quickstart/stage2-unified}; N=${2:-100}
HERE=docs/results/benchmarks-on-shapes; WORK=runs/benchmarks-on-shapes; BIN=.venv/bin/omnimamba
for fmt in pope mme vqa mcq coco; do
  $BIN data shapes --split test --n "$N" --format $fmt --out $WORK/data/$fmt > /dev/null
done
common=(--model "$MODEL" --quiet --suffix "")
$BIN eval pope --questions $WORK/data/pope/coco_pope_*.json --images $WORK/data/pope/images "${common[@]}" --out $WORK/pope
$BIN eval mme --root $WORK/data/mme "${common[@]}" --out $WORK/mme
$BIN eval vqa --questions $WORK/data/vqa/questions.json --annotations $WORK/data/vqa/annotations.json \
  --images $WORK/data/vqa/images --image-pattern 'shapes_{image_id:06d}.png' "${common[@]}" --out $WORK/vqa
$BIN eval mcq --file $WORK/data/mcq/mmbench.tsv "${common[@]}" --out $WORK/mcq
# FID needs torch-fidelity's InceptionV3 weights, which cannot be downloaded here: this run uses the real
# architecture with random weights (seed 0, He-initialised: tests/helpers/random_inception.py), which proves the
# pipeline; its FID is comparable only to other FIDs computed with the same file.
.venv/bin/python tests/helpers/random_inception.py $WORK/inception-random.pth
$BIN eval fid --captions $WORK/data/coco/captions.json --reference $WORK/data/coco/images \
  --inception-weights $WORK/inception-random.pth --model "$MODEL" --quiet --out $WORK/fid
for b in pope mme vqa mcq fid; do
  mkdir -p $HERE/$b; cp $WORK/$b/summary.json $WORK/$b/report.txt $HERE/$b/
done
# What the same weights give for two sets of real Shapes images (test against validation): the floor.
$BIN data shapes --split val --n "$N" --format coco --out $WORK/data/coco-val > /dev/null
.venv/bin/python - $WORK <<'PY' | tee $HERE/fid/floor.txt
import sys
from pathlib import Path
from omnimamba.evaluation.fid import compute_fid, image_files
work = Path(sys.argv[1])
ref, val = image_files(work / "data/coco/images"), image_files(work / "data/coco-val/images")
print(f"FID, {len(ref)} Shapes test renders against {len(val)} validation renders, same Inception file: "
      f"{compute_fid(ref, val, work / 'inception-random.pth', progress=False):.2f}")
PY
