# issue 11: the GPU recipe again with training seed 1 (spread), its full evaluation, and image-code sampling
# settings (temperature, top-k) against the guidance scale, all four in parallel once training is done.
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
python3 -m pip install --no-deps --no-index .wheels/*.whl -q 2>&1 | tail -2
export PYTHONPATH=$PWD/src PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
mkdir -p runs
timeout 492 python3 -m omnimamba.cli train --config configs/shapes-gpu.yaml --set run.out=runs/B --set run.seed=1 \
  --set run.progress=false > runs/B.log 2>&1
grep -E "tokenizer|eval|Error" runs/B.log | tail -8; echo "training done at $(el) s"
M=runs/B/stage2-unified
timeout 85 python3 -m omnimamba.cli evaluate --model $M --out runs/B/evaluation --n-images 100 --n-prompts 200 > runs/B.eval.log 2>&1 &
for s in "1 0" "1 20" "0.7 0"; do set -- $s
  timeout 85 python3 -m omnimamba.cli guidance --model $M --out runs/B/guidance_t$1_k$2.json --n-prompts 96 --seeds 2 \
    --scales 1 2 3 --temperature $1 --top-k $2 > runs/B.guidance_t$1_k$2.log 2>&1 &
done
wait; echo "evaluation done at $(el) s"
tail -12 runs/B.eval.log; tail -n 4 runs/B.guidance_*.log
tar czf $OUT/runs.tgz --exclude="*.safetensors" --exclude="*.pt" --exclude=checkpoints runs/B runs/B.*log runs/B.log
echo "call total: $(el) s"
