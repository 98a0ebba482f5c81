# The second call on the same machine (runs/A kept): what call.sh left undone (the evaluation, state_dtype), then
# issue 13's A/B of the scan op's chain rule, torch's (the spec) against the Triton kernel, on stage 2 of the 1.3B
# shape at 3 : 48 with checkpointing + loss chunk 4096, eager.
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
export PYTHONPATH=src PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-index .wheels/*.whl -q 2>&1 | tail -2
if [ -f runs/A/stage2-unified/config.json ] && [ ! -f runs/A/evaluation/results.json ]; then
  timeout 90 python3 -m omnimamba.cli evaluate --model runs/A/stage2-unified --out runs/A/evaluation \
    --n-images 100 --n-prompts 200 --guidance 2 > runs/A.eval.log 2>&1 &
fi
if [ -f runs/A/stage2-unified/config.json ] && [ ! -f runs/A/state_dtype_done ]; then
  timeout 150 python3 benchmarks/state_dtype.py --model runs/A/stage2-unified --n-images 100 --n-prompts 96 \
    --seeds 0 1 2 --guidance 2 --epsilon 0.001 --out $OUT/state_dtype_shapes_gpu.json > $OUT/state_dtype_shapes_gpu.log 2>&1
fi
wait; echo "evaluation done at $(el) s"; tail -4 runs/A.eval.log
B="python3 benchmarks/training_throughput.py --activation-checkpointing --loss-chunk 4096 --warmup 2 --steps 5 --no-baseline"
for c in torch triton torch triton; do
  OMNIMAMBA_SCAN_CHAIN=$c timeout 120 $B --name training_throughput_eager_chain_$c > $OUT/tt_chain_$c.log 2>&1
  grep -E "^omnimamba " $OUT/tt_chain_$c.log | tail -1; echo "$c done at $(el) s"
  [ $(el) -gt 420 ] && break
done
cp benchmarks/results/training_throughput_eager_chain_*.json $OUT/ 2>/dev/null
tar czf $OUT/runs.tgz --exclude="*.safetensors" --exclude="*.pt" --exclude=checkpoints runs/A runs/A.*log runs/A.log
echo "call total: $(el) s"
