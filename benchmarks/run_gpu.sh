#!/usr/bin/env bash
# The GPU tests and the GPU benchmarks, for one lent machine (or your own GPU).
# Usage: bash benchmarks/run_gpu.sh [PART ...]
#   all (default)  every part below, in order (scaling too where the machine has 2 GPUs)
#   tests          the GPU tests (kernel parity, graphed decode, the fast scan backward)
#   decode         the decode-step profile, batch-1 long MMU decoding against the LLaMA baselines, and what an
#                  answer's end check costs
#   decode-batch   16 and 64 sequences decoding together at 1k / 16k / 100k (chunked prefill)
#   images         16 (all systems), 64 and 128 guided images
#   training       stage-2 training throughput, with and without activation checkpointing, and its profile
#   scaling        one- and two-GPU training rows and the two-GPU equivalence check (2 GPUs)
#   quick          small sizes of decode, images and training, to check that everything runs
# Each part fits a 10-minute call on an H200, so a lent machine can run them one call each; every part writes
# its logs and JSON, and the Markdown tables are rewritten at the end.
# Uses the python on PATH (with torch, triton, transformers, timm, flash-linear-attention and matplotlib:
# pip install -e .[gpu,bench]); logs and JSON go to benchmarks/results/ and, when set, to $OUT; the
# Markdown tables and the plot are written by benchmarks/report.py at the end.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOGS="${OUT:-benchmarks/results}"
mkdir -p "$LOGS"
status=0
run() {  # run LOG COMMAND...: the command's output to the terminal and to $LOGS/LOG
    local log=$1
    shift
    "$@" 2>&1 | tee "$LOGS/$log" || status=1
}
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
parts=("$@")
[ ${#parts[@]} -gt 0 ] || parts=(all)
if [ "${parts[0]}" = all ]; then
    parts=(tests decode decode-batch images training)
    [ "$gpus" -ge 2 ] && parts+=(scaling)
fi
for part in "${parts[@]}"; do
    echo "== run_gpu.sh $part ($(date -u +%H:%M:%S) UTC)"
    case $part in
    tests)
        run gpu_tests.log python3 -m pytest tests/test_ops_gpu.py tests/test_decode_gpu.py -p no:cacheprovider ;;
    decode)
        run profile_decode.log python3 benchmarks/profile_decode.py --batch 1 16 32
        run mmu_long_generation.log python3 benchmarks/mmu_long_generation.py
        run answer_decode.log python3 benchmarks/answer_decode.py ;;
    decode-batch)  # many sequences decoding together; long prompts prefilled in chunks
        for b in 16 64; do
            run "mmu_long_generation_batch$b.log" python3 benchmarks/mmu_long_generation.py --batch $b \
                --lengths 1024 16384 100000 --window 64 --systems omnimamba-chunked llama-static-compile --budget-s 240
        done ;;
    images)
        run image_generation.log python3 benchmarks/image_generation.py
        for n in 64 128; do
            run "image_generation_$n.log" python3 benchmarks/image_generation.py --images $n --repeat 1 \
                --systems omnimamba llama-static-compile
        done ;;
    training)
        run training_throughput_loss_chunk.log python3 benchmarks/training_throughput.py --loss-chunk 4096 \
            --name training_throughput_loss_chunk
        run training_throughput_checkpointing.log python3 benchmarks/training_throughput.py \
            --activation-checkpointing --loss-chunk 4096 --name training_throughput_checkpointing \
            --profile training_profile_stage2.txt ;;
    scaling)  # one and two GPUs, one host
        if [ "$gpus" -lt 2 ]; then
            echo "scaling needs 2 GPUs, this machine has $gpus"; status=1; continue
        fi
        B="--activation-checkpointing --loss-chunk 4096 --no-baseline"
        run training_scaling_1gpu.log python3 benchmarks/training_throughput.py $B --name training_scaling_1gpu
        run training_scaling_2gpu_ddp.log torchrun --nproc-per-node 2 benchmarks/training_throughput.py $B \
            --strategy ddp --name training_scaling_2gpu_ddp
        run training_scaling_2gpu_fsdp.log torchrun --nproc-per-node 2 benchmarks/training_throughput.py $B \
            --strategy fsdp --name training_scaling_2gpu_fsdp --profile training_profile_fsdp.txt
        # FSDP2 with the frozen encoders sharded too (the trainer keeps them whole on each GPU)
        run training_scaling_2gpu_fsdp_shard_frozen.log torchrun --nproc-per-node 2 \
            benchmarks/training_throughput.py $B --strategy fsdp --fsdp-shard-frozen \
            --name training_scaling_2gpu_fsdp_shard_frozen
        run multi_gpu_equivalence.log python3 benchmarks/multi_gpu_equivalence.py --fp32 ;;
    quick)
        run mmu_long_generation.log python3 benchmarks/mmu_long_generation.py --lengths 1024 8192 --window 32
        run image_generation.log python3 benchmarks/image_generation.py --images 4 --repeat 1
        run training_throughput.log python3 benchmarks/training_throughput.py --mmu-batch 1 --t2i-batch 4 \
            --warmup 1 --steps 2 ;;
    *)
        echo "unknown part '$part' (all, tests, decode, decode-batch, images, training, scaling, quick)"; status=1 ;;
    esac
done
python3 benchmarks/report.py > /dev/null && echo "tables: benchmarks/results/gpu_benchmarks.md" || status=1
exit $status
