#!/bin/bash
# The quickstart tokenizer's code dimension and codebook size, over training seeds; run from the repository root:
#   bash docs/results/quickstart-cpu/tokenizer/run.sh          (about 3.5 min a tokenizer on 2 CPU cores)
# Each trains into runs/tokenizer-only/NAME-seedS (skipped when its tokenizer is there) and is scored by
# round_trip.py into results.jsonl here. The variants name model.overrides.vq explicitly, so they do not depend on
# the preset's default.
set -euo pipefail
HERE=docs/results/quickstart-cpu/tokenizer
declare -A VARIANTS=(
  [dim8-codes256]="codebook_embed_dim=8 codebook_size=256"
  [dim8-codes1024]="codebook_embed_dim=8 codebook_size=1024"
  [dim32-codes256]="codebook_embed_dim=32 codebook_size=256"
  [dim32-codes1024]="codebook_embed_dim=32 codebook_size=1024"
  [dim8-codes256-batch16]="codebook_embed_dim=8 codebook_size=256 vq_train.batch=16"
  [dim8-codes256-split]="codebook_embed_dim=8 codebook_size=256 vq_train.restart=split"
  [dim8-codes256-split-batch16]="codebook_embed_dim=8 codebook_size=256 vq_train.restart=split vq_train.batch=16"
)
for seed in ${SEEDS:-0}; do
  for name in ${NAMES:-dim8-codes256 dim8-codes1024 dim32-codes256 dim32-codes1024}; do
    out=runs/tokenizer-only/$name-seed$seed
    if [ ! -f "$out/vq/manifest.json" ]; then
      sets=(--set run.out=$out --set run.seed=$seed)
      for kv in ${VARIANTS[$name]}; do  # a dotted key is a whole config path, a plain one a VQ field
        if [[ ${kv%%=*} == *.* ]]; then sets+=(--set $kv); else sets+=(--set model.overrides.vq.$kv); fi
      done
      omnimamba train --config $HERE/tokenizer-only.yaml "${sets[@]}" | grep "VQ tokenizer"
    fi
    python $HERE/round_trip.py $out/vq | sed "s/^{/{\"variant\": \"$name\", \"seed\": $seed, /" >> $HERE/results.jsonl
  done
done
