#!/usr/bin/env bash
# issue 13, one device call: the compiled-blocks gradient parity test in its new form (ops/fla.py's scan op taking
# x, dt and A), then stage-2 throughput at 3 : 48 with checkpointing + loss chunk 4096 on this one GPU: compiled
# (baseline compiled too, both steps profiled), compiled with the first KEEP blocks recomputed only, and eager
# (baseline eager). JSON in $OUT, logs in $OUT/logs.tgz.
set -uo pipefail
T0=$(date +%s)
export PYTHONPATH=src PYTHONUNBUFFERED=1
python3 -m pip install --no-deps --no-index .wheels/*.whl -q 2>&1 | tail -2
L="$OUT/logs"; mkdir -p "$L"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
timeout 150 python3 -m pytest tests/test_ops_gpu.py -k "scan_gradients or compiled_training or activation_checkpointing" \
  -q -p no:cacheprovider > "$L/gpu_tests_compiled_op.log" 2>&1; tail -4 "$L/gpu_tests_compiled_op.log"
echo "tests done at $(( $(date +%s) - T0 )) s"
B="python3 benchmarks/training_throughput.py --activation-checkpointing --loss-chunk 4096 --warmup 2 --steps 5"
timeout 200 $B --compile --name training_throughput_compiled_op --profile training_profile_stage2_compiled_op.txt \
  > "$L/training_throughput_compiled_op.log" 2>&1; grep -E "^(omnimamba|llama) " "$L/training_throughput_compiled_op.log" | tail -3
echo "compiled done at $(( $(date +%s) - T0 )) s"
timeout 110 $B --compile --checkpoint-blocks ${KEEP:-28} --no-baseline --name training_throughput_compiled_op_partial \
  > "$L/training_throughput_compiled_op_partial.log" 2>&1; tail -3 "$L/training_throughput_compiled_op_partial.log"
echo "partial done at $(( $(date +%s) - T0 )) s"
timeout $(( ${CALL_LIMIT:-580} - ($(date +%s) - T0) )) $B --name training_throughput_eager_op > "$L/training_throughput_eager_op.log" 2>&1
tail -4 "$L/training_throughput_eager_op.log"
cp benchmarks/results/logs/training_profile_stage2_compiled_op*.txt "$L/" 2>/dev/null
tar czf "$OUT/logs.tgz" -C "$OUT" logs && rm -rf "$L"
echo "call total: $(( $(date +%s) - T0 )) s"
