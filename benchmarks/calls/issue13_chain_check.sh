#!/usr/bin/env bash
# issue 13, one device call: the scan op's chain rule in one Triton pass (ops/scan_chain.py). Its GPU parity test
# against the torch spec, the scan's gradient tests and checkpointed-vs-plain on the fast path (which run it), then
# stage 2 of the 1.3B shape at 3 : 48 with checkpointing + loss chunk 4096, eager, the torch chain rule against the
# kernel, interleaved (torch, triton, torch, triton). The compiled-blocks parity test's bf16 case runs beside them
# from the start (it compiled for > 250 s last time; CPU-bound: the throughput rows share the host with it, both
# chain rules alike). JSON in $OUT, logs in $OUT/logs.tgz.
set -uo pipefail
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
export PYTHONPATH=src PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-index .wheels/*.whl -q 2>&1 | tail -2
L="$OUT/logs"; mkdir -p "$L"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 120 python3 -m pytest tests/test_ops_gpu.py -k "chain_kernel or scan_gradients or activation_checkpointing" \
  -q -p no:cacheprovider > "$L/gpu_tests_chain.log" 2>&1; tail -3 "$L/gpu_tests_chain.log"
echo "tests done at $(el) s"
(timeout $(( ${CALL_LIMIT:-570} - $(el) )) python3 -m pytest tests/test_ops_gpu.py -q -p no:cacheprovider \
  -k "compiled_training and True" > "$L/gpu_tests_compiled_bf16.log" 2>&1) &
B="python3 benchmarks/training_throughput.py --activation-checkpointing --loss-chunk 4096 --warmup 2 --steps 5 --no-baseline"
i=0
for c in torch triton torch triton; do
  i=$((i + 1))
  OMNIMAMBA_SCAN_CHAIN=$c timeout 110 $B --name training_throughput_eager_chain_${c}_$i > "$L/tt_chain_${c}_$i.log" 2>&1
  echo "$c: $(grep -E "^omnimamba " "$L/tt_chain_${c}_$i.log" | tail -1) (done at $(el) s)"
  [ "$(el)" -gt 450 ] && break
done
wait; tail -3 "$L/gpu_tests_compiled_bf16.log"
cp benchmarks/results/training_throughput_eager_chain_*.json "$OUT/" 2>/dev/null
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$L"
echo "call total: $(el) s"
