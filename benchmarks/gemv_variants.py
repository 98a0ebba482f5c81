"""Where a one-row bf16 GEMV at the 1.3B decode shapes loses bandwidth (in_proj: K 2048 -> N 8512; out_proj:
K 4096 -> N 2048), and what the 32-row image step's small kernels cost at other launches. Each variant is a plain
GEMV (no norm, no conv), against cuBLAS and the fused step's own kernels (ops/fused_step.py):

    loads      the fused step's CUDA-core loop: a (BLOCK_N, BLOCK_K) weight tile per step, products summed once
    prefetch   the same with the next tile's load issued before this tile's products (two tiles in flight)
    tma        weight tiles through a tensor descriptor (Hopper's bulk copy engine), num_stages deep
    splitk     the loads loop over a slice of K, partial sums added atomically into a zeroed float32 output

32 rows (16 guided images): the norm kernel at 4, 8 and 16 warps, the GEMM-path out_proj at other tiles and K
splits. The fused step's one-row projections (norm and conv, or norm and residual, included) at other launches and
with the variants that its kernels take as flags (`run_fused`). Timing as benchmarks/fused_step_tiles.py:
eight calls, one per weight copy (L2 holds none), graphed.

    python benchmarks/gemv_variants.py [--reps 50] [--only fused] [--check]   (--check: small shapes, parity
                                                                only; runs in Triton's interpreter on a CPU)
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from fused_step_tiles import bench  # the same timing: eight weight copies, graphed
from omnimamba.ops import fused_step as fs

RESULTS = Path(__file__).resolve().parent / "results"


@triton.jit
def _gemv_loads(x, w, out, N, K, PREFETCH: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    mn = rn < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    ptrs = w + rn[:, None] * K + rk[None, :]
    if PREFETCH:
        nxt = tl.load(ptrs, mask=mn[:, None], other=0.0)
        for k0 in range(0, K, BLOCK_K):
            cur = nxt
            nxt = tl.load(ptrs + k0 + BLOCK_K, mask=mn[:, None] & (k0 + BLOCK_K + rk < K)[None, :], other=0.0)
            xt = tl.load(x + k0 + rk).to(tl.float32)
            acc += cur.to(tl.float32) * xt[None, :]
    else:
        for k0 in range(0, K, BLOCK_K):
            wt = tl.load(ptrs + k0, mask=mn[:, None], other=0.0)
            xt = tl.load(x + k0 + rk).to(tl.float32)
            acc += wt.to(tl.float32) * xt[None, :]
    tl.store(out + rn, tl.sum(acc, axis=1), mask=mn)


@triton.jit
def _gemv_tma(x, w_desc, out, N, K, STAGES: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    n0 = tl.program_id(0) * BLOCK_N
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        wt = w_desc.load([n0, k0])
        xt = tl.load(x + k0 + rk).to(tl.float32)
        acc += wt.to(tl.float32) * xt[None, :]
    rn = n0 + tl.arange(0, BLOCK_N)
    tl.store(out + rn, tl.sum(acc, axis=1), mask=rn < N)


@triton.jit
def _gemv_splitk(x, w, out, N, K, K_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_lo = tl.program_id(1) * K_SPLIT
    rk = tl.arange(0, BLOCK_K)
    mn = rn < N
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(k_lo, k_lo + K_SPLIT, BLOCK_K):
        wt = tl.load(w + rn[:, None] * K + k0 + rk[None, :], mask=mn[:, None], other=0.0)
        xt = tl.load(x + k0 + rk).to(tl.float32)
        acc += wt.to(tl.float32) * xt[None, :]
    tl.atomic_add(out + rn, tl.sum(acc, axis=1), mask=mn, sem="relaxed")


def gemv(kind: str, x: torch.Tensor, w: torch.Tensor, bn: int, bk: int, warps: int, stages: int = 3,
         split: int = 1, desc=None) -> torch.Tensor:
    """x (K,) bf16 @ w (N, K)^T -> (N,) float32 by variant `kind`."""
    n, k = w.shape
    grid = (triton.cdiv(n, bn),)
    if kind == "splitk":
        out = torch.zeros(n, device=w.device, dtype=torch.float32)
        _gemv_splitk[(grid[0], split)](x, w, out, n, k, K_SPLIT=k // split, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
        return out
    out = torch.empty(n, device=w.device, dtype=torch.float32)
    if kind == "tma":
        _gemv_tma[grid](x, desc, out, n, k, STAGES=stages, BLOCK_N=bn, BLOCK_K=bk, num_warps=warps)
    else:
        _gemv_loads[grid](x, w, out, n, k, PREFETCH=kind == "prefetch", BLOCK_N=bn, BLOCK_K=bk, num_warps=warps,
                          num_stages=stages)
    return out


def variants(n: int, k: int, check: bool) -> list[dict]:
    out = []
    for bn in (4, 8, 16, 32, 64):
        for bk in (128, 256, 512, 1024):
            if not 2048 <= bn * bk <= 16384 or bk > k:
                continue
            for warps in (4, 8):
                out.append(dict(kind="loads", bn=bn, bk=bk, warps=warps))
            out.append(dict(kind="prefetch", bn=bn, bk=bk, warps=4))
            for split in (2, 4):
                if k // split >= bk:
                    out.append(dict(kind="splitk", bn=bn, bk=bk, warps=4, split=split))
            if bk <= 256 and bn >= 8:  # a descriptor's box is at most 256 wide
                for warps, stages in ((4, 3), (4, 5), (8, 4)):
                    out.append(dict(kind="tma", bn=bn, bk=bk, warps=warps, stages=stages))
    if check:  # one of each kind is enough for parity
        seen, keep = set(), []
        for v in out:
            if v["kind"] not in seen:
                seen.add(v["kind"])
                keep.append(v)
        out = keep
    return out


def name(v: dict) -> str:
    s = f"{v['kind']} n{v['bn']} k{v['bk']} w{v['warps']}"
    if "split" in v:
        s += f" x{v['split']}"
    if "stages" in v:
        s += f" s{v['stages']}"
    return s


def run_gemv(rows: list, proj: str, n: int, k: int, reps: int, check: bool, dev: str) -> None:
    from triton.tools.tensor_descriptor import TensorDescriptor

    W = [torch.randn(n, k, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(1 if check else 8)]
    x = torch.randn(k, device=dev, dtype=torch.bfloat16)
    truth = F.linear(x.float()[None], W[0].float())[0]
    t_cublas = bench(lambda i: F.linear(x[None], W[i % len(W)]), reps)
    print(f"{proj} cuBLAS {t_cublas:.1f} us ({n * k * 2 / t_cublas / 1e3:.0f} GB/s)", flush=True)
    rows.append({"proj": proj, "variant": "cuBLAS", "us": t_cublas, "GB_s": n * k * 2 / t_cublas / 1e3})
    for v in variants(n, k, check):
        descs = None
        try:
            if v["kind"] == "tma":
                descs = [TensorDescriptor.from_tensor(w, [v["bn"], v["bk"]]) for w in W]
            args = {key: val for key, val in v.items() if key != "kind"}

            def call(i, v=v, args=args, descs=descs):
                j = i % len(W)
                return gemv(v["kind"], x, W[j], desc=descs[j] if descs else None, **args)

            err = float((call(0) - truth).norm() / truth.norm())
            t = bench(call, reps)
        except Exception as e:  # noqa: BLE001 - a variant that does not compile is a row, not a stop
            print(f"{proj} {name(v):<28} failed: {repr(e)[:160]}", flush=True)
            rows.append({"proj": proj, "variant": name(v), "error": repr(e)[:300]})
            continue
        print(f"{proj} {name(v):<28} {t:6.1f} us {n * k * 2 / t / 1e3:6.0f} GB/s  rel. err {err:.1e}", flush=True)
        rows.append({"proj": proj, "variant": name(v), "us": t, "GB_s": n * k * 2 / t / 1e3, "rel_err": err})
        if err > 1e-2:
            raise SystemExit(f"{name(v)}: relative error {err:.1e}")


def run_image_kernels(rows: list, reps: int, dev: str) -> None:
    """The 32-row GEMM path's norm (N_PARTS partial sums + residual) at 4 / 8 / 16 warps, and its out_proj at
    other tiles and K splits."""
    m, d, k_in = 32, 2048, 4096
    bf = torch.bfloat16
    k_split = fs._k_split(m, d, k_in, torch.device(dev), fs._DOT_TILE["BLOCK_N"])
    n_parts = k_in // k_split
    parts = [torch.randn(n_parts, m, d, device=dev) for _ in range(8)]
    res = torch.randn(m, d, device=dev)
    wn = torch.rand(d, device=dev, dtype=bf) + 0.5
    for warps in (4, 8, 16):
        def call(i, warps=warps):
            r_out = torch.empty(m, d, device=dev)
            x_out = torch.empty(m, d, device=dev, dtype=bf)
            fs._norm_kernel[(m,)](parts[i], parts[i].stride(0), parts[i].stride(1), res, res.stride(0), r_out, x_out,
                                  wn, 1e-5, d, N_PARTS=n_parts, HAS_RES=True, BLOCK_K=triton.next_power_of_2(d),
                                  num_warps=warps)
        t = bench(call, reps)
        print(f"norm 32 rows, {n_parts} parts, {warps} warps: {t:.1f} us", flush=True)
        rows.append({"proj": "norm32", "variant": f"{n_parts} parts w{warps}", "us": t})

    WO = [torch.randn(d, k_in, device=dev, dtype=bf) * 0.02 for _ in range(8)]
    y = torch.randn(m, k_in, device=dev)
    ss = torch.ones(m, 1, device=dev) * k_in
    gw = torch.rand(k_in, device=dev, dtype=bf) + 0.5
    t_cublas = bench(lambda i: F.linear(y.to(bf), WO[i]), reps)
    rows.append({"proj": "out_proj32", "variant": "cuBLAS (y already normed, bf16)", "us": t_cublas})
    print(f"out_proj 32 rows cuBLAS {t_cublas:.1f} us", flush=True)
    for bn in (32, 64, 128):
        for bk in (64, 128):
            for split in (1, 2, 4, 8):
                for stages in (3, 4):
                    if k_in // split < bk:
                        continue

                    def call(i, bn=bn, bk=bk, split=split, stages=stages):
                        out = torch.empty(split, m, d, device=dev)
                        grid = (triton.cdiv(d, bn), 1, split)
                        fs._out_proj_dot_kernel[grid](y, ss, 1, gw, 1e-5, WO[i], out, m, d, k_in, k_in // split,
                                                      GEMV=False, IEEE=False, BLOCK_SS=1, BLOCK_M=32, BLOCK_N=bn,
                                                      BLOCK_K=bk, num_warps=4, num_stages=stages)
                    try:
                        t = bench(call, reps)
                    except Exception as e:  # noqa: BLE001
                        rows.append({"proj": "out_proj32", "variant": f"n{bn} k{bk} x{split} s{stages}",
                                     "error": repr(e)[:300]})
                        continue
                    committed = (bn, bk, split, stages) == (fs._DOT_TILE["BLOCK_N"], fs._DOT_TILE["BLOCK_K"],
                                                            n_parts, fs._DOT_TILE["num_stages"])
                    label = f"n{bn} k{bk} x{split} s{stages}" + (" (committed)" if committed else "")
                    print(f"out_proj 32 rows {label:<28} {t:6.1f} us", flush=True)
                    rows.append({"proj": "out_proj32", "variant": label, "us": t})


def run_fused(rows: list, reps: int, check: bool, dev: str) -> None:
    """The fused step's one-row projections (norm, conv / residual included) at other launches: in_proj with
    its conv windows read before or after its loop (EARLY_CONV), at 4 and 8 warps; out_proj at other tiles
    and warps. (Commit eadab11 also timed the rstd applied after the loop and out_proj without its norm
    weight's loads: results/gemv_variants_fused.json; neither helped the step, both were dropped.)"""
    bf = torch.float32 if check else torch.bfloat16
    d, n_in, k_out = (64, 200, 128) if check else (2048, 8512, 4096)
    conv_dim = (n_in - k_out) // 2 if check else 4352
    copies = 1 if check else 8
    W_in = [torch.randn(n_in, d, device=dev, dtype=bf) * 0.02 for _ in range(copies)]
    W_out = [torch.randn(d, k_out, device=dev, dtype=bf) * 0.02 for _ in range(copies)]
    h = torch.randn(1, d, device=dev)
    ss = h.pow(2).reshape(1, -1, 4).sum(-1)
    nw = torch.rand(d, device=dev, dtype=bf) + 0.5
    conv_w = torch.randn(conv_dim, 4, device=dev, dtype=bf)
    conv_b = torch.randn(conv_dim, device=dev, dtype=bf)
    conv0 = torch.randn(1, conv_dim, 4, device=dev, dtype=bf)
    conv_start = conv0.clone()  # the timed calls shift conv0's windows; each check starts from these
    y = torch.randn(1, k_out, device=dev)
    yss = y.pow(2).reshape(1, -1, 64 if not check else 16).sum(-1)
    gw = torch.rand(k_out, device=dev, dtype=bf) + 0.5

    def in_call(i, tile, fresh=False):  # fresh: from the same conv windows (timing: their values do not matter)
        conv = conv_start.clone() if fresh else conv0
        return fs.in_proj_gemv(h, ss, nw, 1e-5, W_in[i % copies], conv, conv_w, conv_b, k_out, tile=tile), conv

    def out_call(i, tile):
        return fs.out_proj_residual(y, yss, gw, 1e-5, W_out[i % copies], h, tile=tile)[0]

    base_in = dict(fs._IN_TILE_ONE_ROW)
    ref_in, ref_conv = in_call(0, base_in, fresh=True)
    for warps in (4, 8):
        for early in (False, True):
            tile = {**base_in, "num_warps": warps, "EARLY_CONV": early}
            out, conv = in_call(0, tile, fresh=True)
            err = max(float((out.float() - ref_in.float()).norm() / ref_in.float().norm()),
                      float((conv.float() - ref_conv.float()).norm() / ref_conv.float().norm()))
            t = bench(lambda i, tile=tile: in_call(i, tile), reps)
            label = f"fused in_proj n16 k256 w{warps}" + (" early-conv" if early else "") + (
                " (committed)" if tile == base_in else "")
            print(f"{label:<48} {t:6.1f} us  rel. diff {err:.1e}", flush=True)
            rows.append({"proj": "fused_in_proj", "variant": label, "us": t, "rel_diff": err})
            if err > 1e-3:  # a bf16 output rounded the other way here and there, no more
                raise SystemExit(f"{label}: differs by {err:.1e}")
    base_out = dict(fs._OUT_TILE_ONE_ROW)
    ref_out = out_call(0, base_out)
    for bn, bk in ((4, 1024), (8, 1024), (8, 512)):
        for warps in (4, 8):
            tile = {**base_out, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps}
            out = out_call(0, tile)
            err = float((out - ref_out).norm() / ref_out.norm())
            t = bench(lambda i, tile=tile: out_call(i, tile), reps)
            label = f"fused out_proj n{bn} k{bk} w{warps}" + (" (committed)" if tile == base_out else "")
            print(f"{label:<48} {t:6.1f} us  rel. diff {err:.1e}", flush=True)
            rows.append({"proj": "fused_out_proj", "variant": label, "us": t, "rel_diff": err})
            if err > 1e-3:
                raise SystemExit(f"{label}: differs by {err:.1e}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--check", action="store_true", help="small shapes, parity only (CPU: Triton's interpreter)")
    ap.add_argument("--only", choices=["all", "fused"], default="all",
                    help="fused: only the fused step's one-row projections at other launches")
    ap.add_argument("--out", default=None, help="JSON path (default: results/gemv_variants[_fused].json)")
    a = ap.parse_args()
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    if dev == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("no GPU: run with TRITON_INTERPRET=1 and --check")
    torch.manual_seed(0)
    rows: list = []
    shapes = [("in_proj", 8512, 2048), ("out_proj", 2048, 4096)]
    if a.check:
        shapes = [("in_proj", 200, 2048), ("out_proj", 64, 4096)]
    if a.only == "all":
        for proj, n, k in shapes:
            run_gemv(rows, proj, n, k, a.reps, a.check, dev)
    run_fused(rows, a.reps, a.check, dev)
    if not a.check:
        if a.only == "all":
            run_image_kernels(rows, a.reps, dev)
        out = a.out or str(RESULTS / ("gemv_variants.json" if a.only == "all" else "gemv_variants_fused.json"))
        Path(out).write_text(json.dumps({"command": f"python benchmarks/gemv_variants.py --only {a.only}",
                                           "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                           "triton": triton.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
