#!/usr/bin/env bash
# The GPU tests and the three GPU benchmarks in one go, for one lent machine (or your own GPU).
# Usage: bash benchmarks/run_gpu.sh [quick|scaling]   -- "quick" runs small sizes, to check that everything runs;
# "scaling" only the one- and two-GPU training rows and the two-GPU equivalence check (a machine with 2 GPUs).
# Uses the python on PATH (with torch, triton, transformers, timm, flash-linear-attention and matplotlib:
# pip install -e .[gpu,bench]); logs and JSON go to benchmarks/results/ and, when set, to $OUT; the
# Markdown tables and the plot are written by benchmarks/report.py at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOGS="${OUT:-benchmarks/results}"
mkdir -p "$LOGS"
status=0
[ "${1:-}" = scaling ] || python3 -m pytest tests/test_ops_gpu.py tests/test_decode_gpu.py -p no:cacheprovider 2>&1 | tee "$LOGS/gpu_tests.log" || status=1
if [ "${1:-}" = scaling ]; then
    :
elif [ "${1:-}" = quick ]; then
    python3 benchmarks/mmu_long_generation.py --lengths 1024 8192 --window 32 2>&1 | tee "$LOGS/mmu_long_generation.log" || status=1
    python3 benchmarks/image_generation.py --images 4 --repeat 1 2>&1 | tee "$LOGS/image_generation.log" || status=1
    python3 benchmarks/training_throughput.py --mmu-batch 1 --t2i-batch 4 --warmup 1 --steps 2 2>&1 | tee "$LOGS/training_throughput.log" || status=1
else
    python3 benchmarks/profile_decode.py 2>&1 | tee "$LOGS/profile_decode.log" || status=1
    python3 benchmarks/mmu_long_generation.py 2>&1 | tee "$LOGS/mmu_long_generation.log" || status=1
    for b in 16 64; do  # many sequences decoding together; long prompts prefilled in chunks
        python3 benchmarks/mmu_long_generation.py --batch $b --lengths 1024 16384 100000 --window 64 \
            --systems omnimamba-chunked llama-static-compile 2>&1 | tee "$LOGS/mmu_long_generation_batch$b.log" || status=1
    done
    python3 benchmarks/image_generation.py 2>&1 | tee "$LOGS/image_generation.log" || status=1
    for n in 64 128; do
        python3 benchmarks/image_generation.py --images $n --repeat 1 --systems omnimamba llama-static-compile 2>&1 \
            | tee "$LOGS/image_generation_$n.log" || status=1
    done
    python3 benchmarks/training_throughput.py --loss-chunk 4096 --name training_throughput_loss_chunk 2>&1 \
        | tee "$LOGS/training_throughput_loss_chunk.log" || status=1
    python3 benchmarks/training_throughput.py --activation-checkpointing --loss-chunk 4096 \
        --name training_throughput_checkpointing --profile training_profile_stage2.txt 2>&1 \
        | tee "$LOGS/training_throughput_checkpointing.log" || status=1
fi
if [ "$(python3 -c 'import torch; print(torch.cuda.device_count())')" -ge 2 ]; then  # one and two GPUs, one host
    B="--activation-checkpointing --loss-chunk 4096 --no-baseline"
    python3 benchmarks/training_throughput.py $B --name training_scaling_1gpu 2>&1 | tee "$LOGS/training_scaling_1gpu.log" || status=1
    torchrun --nproc-per-node 2 benchmarks/training_throughput.py $B --strategy ddp --name training_scaling_2gpu_ddp 2>&1 \
        | tee "$LOGS/training_scaling_2gpu_ddp.log" || status=1
    torchrun --nproc-per-node 2 benchmarks/training_throughput.py $B --strategy fsdp --name training_scaling_2gpu_fsdp \
        --profile training_profile_fsdp.txt 2>&1 | tee "$LOGS/training_scaling_2gpu_fsdp.log" || status=1
    # FSDP2 with the frozen encoders sharded too (the trainer keeps them whole on each GPU)
    torchrun --nproc-per-node 2 benchmarks/training_throughput.py $B --strategy fsdp --fsdp-shard-frozen \
        --name training_scaling_2gpu_fsdp_shard_frozen 2>&1 | tee "$LOGS/training_scaling_2gpu_fsdp_shard_frozen.log" || status=1
    python3 benchmarks/multi_gpu_equivalence.py --fp32 2>&1 | tee "$LOGS/multi_gpu_equivalence.log" || status=1
fi
python3 benchmarks/report.py > /dev/null && echo "tables: benchmarks/results/gpu_benchmarks.md" || status=1
exit $status
