"""Where one decode step of the 1.3B preset spends its time: the graphed step's replay time with the LoRA
route run as two extra GEMMs (unfused), with it merged into in_proj (the GEMM count generation has, since it
runs merged copies) unfused and fused (ops/fused_step.py), and both merged steps' kernels by name (CUDA time
per step, eager) from the PyTorch profiler. Random weights, bf16, batch sizes from --batch; the step times go
to benchmarks/results/profile_decode.json.

    python benchmarks/profile_decode.py [--batch 1 32] [--top 15]
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import torch

import gpu_common as gc
from mmu_long_generation import build_omnimamba
from omnimamba.ops import fused_step


# (name, in_proj launch changes, out_proj launch changes) against the committed one-row launches
# (ops/fused_step.py: _IN_TILE_ONE_ROW, _OUT_TILE_ONE_ROW)
ONE_ROW_VARIANTS = [
    ("in_proj conv windows read after its loop", {"EARLY_CONV": False}, {}),
    ("in_proj 8 warps", {"num_warps": 8}, {}),
    ("out_proj 4 columns, 4 warps", {}, {"BLOCK_N": 4, "num_warps": 4}),
    ("both as before (late conv windows, out_proj 4 columns at 4 warps)", {"EARLY_CONV": False},
     {"BLOCK_N": 4, "num_warps": 4}),
]


def replay_ms(runner, inputs, n: int = 200) -> float:
    for _ in range(10):
        runner(*inputs)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        runner(*inputs)
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / n


def gemv_bandwidth(rows: int, cols: int, batch: int) -> float:
    w = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(batch, cols, device="cuda", dtype=torch.bfloat16)
    g = torch.cuda.CUDAGraph()
    torch.nn.functional.linear(x, w)
    with torch.cuda.graph(g):
        for _ in range(20):
            torch.nn.functional.linear(x, w)
    g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        g.replay()
    end.record()
    end.synchronize()
    return w.nbytes * 200 / (start.elapsed_time(end) / 1e3)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--top", type=int, default=15)
    args = ap.parse_args()
    print(gc.device_info())
    bw = gc.copy_bandwidth()
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s")
    model = build_omnimamba()
    c = model.config.backbone
    rows = []
    for b in args.batch:
        print(f"in_proj as one GEMM at batch {b}: {gemv_bandwidth(c.d_in_proj, c.d_model, b) / 1e12:.2f} TB/s; "
              f"out_proj: {gemv_bandwidth(c.d_model, c.d_inner, b) / 1e12:.2f} TB/s")
        tokens = torch.zeros(b, dtype=torch.long, device="cuda")
        model.backbone.fused_decode = False
        for kind in ("text", "image"):
            runner = model._step_runner(kind, b, torch.device("cuda"), True)
            ms = replay_ms(runner, (tokens, tokens))
            rows.append({"batch": b, "step": f"{kind}, unfused, LoRA route as two extra GEMMs", "ms": ms})
        # generation runs in_proj on merged copies (decode_with_merged_lora): the same GEMM count as this
        model.merge_lora("mmu")
        for fused in (False, True):
            model.backbone.fused_decode = fused
            runner = model._step_runner("text", b, torch.device("cuda"), True)
            ms = replay_ms(runner, (tokens, tokens))
            rows.append({"batch": b, "step": f"text, {'fused' if fused else 'unfused'}, LoRA merged", "ms": ms})
        # past 8 rows (and up to 32) the fused step's three-kernel few-rows path against its five-kernel GEMM path
        variants = []
        if fused_step.GEMV_ROWS < b <= 32:
            variants += [(f"{k} kernels per layer (FEW_ROWS {rows_})", {"FEW_ROWS": rows_})
                         for k, rows_ in (("three", b), ("five", fused_step.GEMV_ROWS))]
        if b == 1:  # the one-row launches against others (benchmarks/gemv_variants.py times each kernel alone)
            one_in, one_out = fused_step._IN_TILE_ONE_ROW, fused_step._OUT_TILE_ONE_ROW
            for name, tin, tout in ONE_ROW_VARIANTS:
                variants.append((f"one-row {name}", {"_IN_TILE_ONE_ROW": {**one_in, **tin},
                                                     "_OUT_TILE_ONE_ROW": {**one_out, **tout}}))
        for name, settings in variants:
            saved = {k: getattr(fused_step, k) for k in settings}
            for k, v in settings.items():
                setattr(fused_step, k, v)
            model._runners.clear()
            runner = model._step_runner("text", b, torch.device("cuda"), True)
            rows.append({"batch": b, "step": f"text, fused, LoRA merged, {name}", "ms": replay_ms(runner, (tokens, tokens))})
            for k, v in saved.items():
                setattr(fused_step, k, v)
            model._runners.clear()
        print(f"fused step default: FEW_ROWS {fused_step.FEW_ROWS}")
        for row in rows[len(rows) - 4 - len(variants):]:
            print(f"batch {b} {row['step']}, graphed: {row['ms']:.3f} ms")
        for fused in (False, True):
            model.backbone.fused_decode = fused
            print(f"batch {b} eager text step, {'fused' if fused else 'unfused'}, LoRA merged:")
            kernel_table(model, b, tokens, args.top)
        model.unmerge_lora()
        model.backbone.fused_decode = True
    gc.write_json("profile_decode", {"device": gc.device_info(), "copy_bandwidth_TBps": bw / 1e12, "rows": rows})


def kernel_table(model, b: int, tokens, top: int) -> None:
    """The eager step's CUDA kernels by name, time per step (PyTorch profiler)."""
    eager = model._step_runner("text", b, torch.device("cuda"), False)
    for _ in range(3):
        eager(tokens, tokens)
    steps = 5
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            eager(tokens, tokens)
        torch.cuda.synchronize()
    per_name = defaultdict(lambda: [0.0, 0])
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            per_name[e.name][0] += e.device_time / steps / 1e3
            per_name[e.name][1] += 1
    total = sum(v[0] for v in per_name.values())
    launches = sum(v[1] for v in per_name.values()) // steps
    print(f"  {launches} kernels, {total:.3f} ms of kernel time")
    for name, (ms, count) in sorted(per_name.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"  {ms:8.3f} ms  {count // steps:4d}x  {name[:110]}")

if __name__ == "__main__":
    main()
