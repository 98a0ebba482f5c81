"""Training throughput of stage 2 (unified fine-tuning) at the 1.3B preset: tokens/s of full optimizer
steps. One GPU, one run, random weights and random data.

A step: an MMU batch ([MMU][SOI] 729 image features [EOI][SOT] 128 text tokens) and a T2I batch (a 72-token
caption prefix + 256 image codes + [EOI]) through one forward, the summed loss backward, and fused AdamW on
every parameter but the frozen vision encoders and VQ, under bf16 autocast with float32 master weights,
as `omnimamba train` runs it. The default batch is the paper's stage-2 ratio, 3 MMU : 48 T2I per GPU.

Baseline: transformers LLaMA ~1.3B (DeepSeek-LLM-1.3B shape), SDPA, the same sequence lengths and batch as
token ids, the same optimizer and autocast; run at the batch OmniMamba fitted, and at the asked one. It has no vision encoder to run; OmniMamba's time includes its
frozen DINOv2 + SigLIP forward. Tokens counted: every sequence position through the backbone.

    python benchmarks/training_throughput.py [--mmu-batch 3] [--t2i-batch 48] [--steps 8]
        [--activation-checkpointing [--checkpoint-blocks N]] [--loss-chunk 4096] [--compile]
    torchrun --nproc-per-node 2 benchmarks/training_throughput.py --strategy ddp|fsdp [...]

Under torchrun (NCCL) every process runs the given batch on its GPU, the model wrapped as `omnimamba train`
wraps it (DDP, or FSDP2 per block); tokens/s counts all processes; no baseline is run.

`--compile` (the training config's run.compile): each OmniMamba block through torch.compile, one graph shared by
the blocks (the first warm-up step compiles); the baseline's decoder layers are compiled the same way. On the
GPU backend its gradients match eager's since ops/fla.py's scan op took x, dt and A (tests/test_ops_gpu.py).

Memory options (the training config's run.activation_checkpointing and run.loss_chunk): per-block activation
checkpointing (the baseline gets transformers' gradient checkpointing too), and the heads + cross-entropy on
target positions only, N at a time, recomputed in the backward (the baseline keeps its plain loss).
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

import gpu_common as gc
from omnimamba.model import OmniMamba, preset
from omnimamba.sequence import IGNORE_INDEX, MMUBatch, T2IBatch
from omnimamba.training.stages import apply_freeze_plan, never_trained

COLUMNS = ["system", "options", "mmu_batch", "t2i_batch", "tokens_per_step", "step_s", "tokens_per_s", "peak_GiB",
           "note"]
TEXT = 128


def omnimamba_step_fn(model, bm: int, bt: int, n_image: int, engine=None):
    cfg, sp = model.config, model.config.special
    size = cfg.understanding.image_size
    text = torch.randint(0, cfg.text_base_vocab_size, (bm, TEXT), device="cuda")
    labels = text.clone()
    labels[:, : TEXT // 4] = IGNORE_INDEX  # the question is not a target
    mmu = MMUBatch(torch.rand(bm, 3, size, size, device="cuda"), text, labels)
    cap = cfg.max_caption_tokens
    prefix = torch.cat([torch.tensor([sp.t2i, sp.sot], device="cuda").expand(bt, -1),
                        torch.randint(0, cfg.text_base_vocab_size, (bt, cap), device="cuda"),
                        torch.tensor([sp.eot, sp.soi], device="cuda").expand(bt, -1)], 1)
    caption = torch.zeros_like(prefix, dtype=torch.bool)
    caption[:, 2:2 + cap] = True
    t2i = T2IBatch(prefix, torch.ones_like(prefix), caption,
                   torch.randint(0, cfg.vq.codebook_size, (bt, cfg.image_tokens), device="cuda"), None)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, fused=True)
    tokens = bm * (4 + n_image + TEXT) + bt * (prefix.size(1) + cfg.image_tokens + 1)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = (engine or model)(mmu=mmu, t2i=t2i)["loss"]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, tokens


def llama_step_fn(model, bm: int, bt: int, mmu_len: int, t2i_len: int):
    batches = [torch.randint(2, model.config.vocab_size, (b, n), device="cuda")
               for b, n in ((bm, mmu_len), (bt, t2i_len)) if b]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = 0
            for ids in batches:
                logits = model(input_ids=ids).logits
                loss = loss + F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step, bm * mmu_len + bt * t2i_len


def profile_step(step, name: str, options: str, batch: tuple[int, int], rows: int = 30, write: bool = True,
                 system: str = "OmniMamba 1.3B") -> None:
    """torch.profiler over one step after two warm-up steps: the kernels by total CUDA time (written and printed
    when `write`: under torchrun every process steps, rank 0 writes)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    if not write:
        return
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=70)
    try:
        classes = gc.breakdown_table(gc.profiled_kernels(prof))
    except Exception as e:  # the breakdown is a summary of the table: never lose the table to it
        classes = f"(kernel classes unavailable: {gc.failure(e)})"
    header = (f"# one {system} stage-2 step, batch {batch[0]} MMU : {batch[1]} T2I, options: {options}\n"
              f"# python benchmarks/training_throughput.py ... --profile {name}\n")
    gc.write_log(name, header + "\nGPU time by kernel class (every kernel of the step):\n" + classes + "\n\n" + table)
    print(classes)
    print(table)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mmu-batch", type=int, default=3)
    ap.add_argument("--t2i-batch", type=int, default=48)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--activation-checkpointing", action="store_true", help="recompute each block in the backward")
    ap.add_argument("--checkpoint-blocks", type=int, default=0, help="with --activation-checkpointing: "
                    "recompute the first N blocks only (run.checkpoint_blocks; the baseline recomputes all)")
    ap.add_argument("--loss-chunk", type=int, default=0, help="target positions per head + loss chunk (0: all)")
    ap.add_argument("--compile", action="store_true", help="torch.compile each block (run.compile; the baseline "
                    "gets its decoder layers compiled too)")
    ap.add_argument("--strategy", choices=["ddp", "fsdp"], default="ddp", help="under torchrun: how the "
                    "model is spread over the processes")
    ap.add_argument("--fsdp-shard-frozen", action="store_true", help="under FSDP2: shard the frozen vision "
                    "encoders and VQ with the root too, as the trainer once did (it now keeps them whole per GPU)")
    ap.add_argument("--no-baseline", action="store_true", help="skip the LLaMA rows")
    ap.add_argument("--name", help="results/NAME.json (default: training_throughput, or "
                    "training_throughput_memory_options with a memory option)")
    ap.add_argument("--profile", metavar="FILE", help="also profile one OmniMamba step at the fitted batch and "
                    "write its GPU time by kernel class and top-kernel table to FILE (under results/logs/); the "
                    "baseline's step likewise to FILE with _llama before its suffix")
    args = ap.parse_args()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    ckpt = f"checkpointing {args.checkpoint_blocks} blocks" if args.checkpoint_blocks else "checkpointing"
    options = ", ".join([o for o, on in ((ckpt, args.activation_checkpointing),
                                         (f"loss chunk {args.loss_chunk}", args.loss_chunk),
                                         ("compiled blocks", args.compile),
                                         (f"{world} GPUs, {args.strategy}", world > 1),
                                         ("frozen modules sharded", world > 1 and args.strategy == "fsdp"
                                          and args.fsdp_shard_frozen)) if on]) or "none"
    if world > 1:
        import torch.distributed as dist

        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl", device_id=torch.device("cuda", torch.cuda.current_device()))
    rank = int(os.environ.get("RANK", "0"))
    info = gc.device_info()
    rows = []

    def record(system: str, build, batches) -> tuple[int, int]:
        """Run at the first of `batches` (mmu, t2i) that fits in memory; every try is a row."""
        for bm, bt in batches:
            row = {"system": system, "options": options, "mmu_batch": bm, "t2i_batch": bt}
            step = None
            try:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
                step, tokens = build(bm, bt)
                seconds, _ = gc.median_seconds(step, args.steps, warmup=args.warmup)
                tokens *= world
                row.update(tokens_per_step=tokens, step_s=seconds, tokens_per_s=tokens / seconds,
                           peak_GiB=gc.gib(torch.cuda.max_memory_allocated()))
            except torch.OutOfMemoryError:
                row["note"] = "out of memory"
            rows.append(row)
            if rank == 0:
                gc.print_table([row], COLUMNS)
            del step
            if "note" not in row:
                return bm, bt
        return batches[-1]

    from omnimamba.ops import fla as fla_backend

    torch.manual_seed(rank)  # each process its own data (the weights are built alike, then wrapped)
    with torch.device("cuda"):
        model = OmniMamba(preset("omnimamba-1.3b"), backend="auto")
    backbone = model.config.backbone
    scan_backward = {"fla": "flash-linear-attention",
                     "fla-verified": "flash-linear-attention, fla #640 refusal lifted at the verified tile shape",
                     "reference": "reference (fla's is refused on Hopper with this Triton, fla #640)",
                     }[fla_backend.scan_backward(backbone.d_state, backbone.headdim)]
    if rank == 0:
        print(f"scan backward: {scan_backward}")
    model.train()
    model.backbone.gradient_checkpointing = args.activation_checkpointing
    model.backbone.checkpoint_blocks = args.checkpoint_blocks
    model.loss_chunk = args.loss_chunk
    model.backbone.compile_blocks(args.compile)
    apply_freeze_plan(model, "stage2-unified")
    n_image = model.encode_images(torch.rand(1, 3, 384, 384, device="cuda")).size(1)
    mmu_len, t2i_len = 4 + n_image + TEXT, 2 + model.config.max_caption_tokens + 2 + model.config.image_tokens + 1
    bm, bt = args.mmu_batch, args.t2i_batch
    if world > 1:
        from omnimamba.training.parallel import shard_fsdp2, wrap_ddp

        if args.strategy == "fsdp":  # as the trainer shards it (training/loop.py, Trainer._wrap)
            frozen = () if args.fsdp_shard_frozen else never_trained(model)
            engine = shard_fsdp2(model, never_trained=frozen)
        else:
            engine = wrap_ddp(model, torch.device("cuda"))
        fitted = record("omnimamba", lambda bm, bt: omnimamba_step_fn(model, bm, bt, n_image, engine), [(bm, bt)])
        if args.profile:
            profile_step(omnimamba_step_fn(model, *fitted, n_image, engine)[0], args.profile, options, fitted,
                         write=rank == 0)
        torch.distributed.destroy_process_group()
        if rank != 0:
            return
    else:
        # The paper's batch first, then smaller ones at about its ratio, down to one sequence of each.
        batches = [(bm, bt)] + [(max(1, bm // k), max(1, bt // k)) for k in (2, 4, 8, 16, 48) if bt // k < bt]
        fitted = record("omnimamba", lambda bm, bt: omnimamba_step_fn(model, bm, bt, n_image), batches)
        if args.profile:
            profile_step(omnimamba_step_fn(model, *fitted, n_image)[0], args.profile, options, fitted)
        del model
        torch.cuda.empty_cache()
        if not args.no_baseline:
            llama = gc.llama_baseline().float().train()
            if args.activation_checkpointing:
                llama.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if args.compile:
                for layer in llama.model.layers:
                    layer.compile()
            record("llama", lambda bm, bt: llama_step_fn(llama, bm, bt, mmu_len, t2i_len), [fitted])
            if args.profile:  # the baseline's step too, beside ours: FILE with "_llama" before its suffix
                stem, dot, suffix = args.profile.rpartition(".")
                profile_step(llama_step_fn(llama, *fitted, mmu_len, t2i_len)[0],
                             f"{stem}_llama.{suffix}" if dot else f"{args.profile}_llama", options, fitted,
                             system="LLaMA ~1.3B baseline")
            if fitted != (bm, bt):
                record("llama", lambda bm, bt: llama_step_fn(llama, bm, bt, mmu_len, t2i_len), [(bm, bt)])

    print()
    gc.print_table(rows, COLUMNS)
    name = args.name or ("training_throughput" if options == "none" else "training_throughput_memory_options")
    path = gc.write_json(name, {
        "command": ("python" if world == 1 else f"torchrun --nproc-per-node {world}")
        + " benchmarks/training_throughput.py " + " ".join(sys.argv[1:]), "seed": 0,
        "benchmark": "stage-2 training step (forward, backward, fused AdamW), bf16 autocast, float32 master weights",
        "weights": gc.RANDOM_WEIGHTS, "mmu_sequence": mmu_len, "t2i_sequence": t2i_len,
        "scan_backward": scan_backward, "options": options, "processes": world,
        "per_process_batch": world > 1, "warmup_steps": args.warmup, "timed_steps": args.steps,
        **info,
        "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
