"""Launch tiles of the fused decode step's few-rows projections (ops/fused_step.py) at the 1.3B shape, bf16:
in_proj (K 2048 -> N 8512, with the RMSNorm and the conv step) and out_proj (K 4096 -> N 2048, with the gated
norm, the residual and the column sums of squares), 1-8 rows, each tile on CUDA cores ("gemv") or tensor cores
("dot"), against cuBLAS's plain GEMM (F.linear, nothing fused) of the same weights.

Timing: eight calls, one per weight copy (so that L2 holds none of them), captured in a CUDA graph and
replayed; microseconds per call. Correctness: the plain columns against a float32 product of the same rounded
inputs (relative error), out_proj's sums of squares against the output's.

    python benchmarks/fused_step_tiles.py [--reps 50]      (one CUDA GPU; JSON to benchmarks/results/)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from omnimamba.ops import fused_step as fs

RESULTS = Path(__file__).resolve().parent / "results"


def bench(fn, reps: int) -> float:
    """Microseconds per call of fn(i), i = 0..7, graphed (on a CPU: called once each, nan; parity runs only)."""
    for i in range(8):
        fn(i)
    if not torch.cuda.is_available():
        return float("nan")
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(8):
            fn(i)
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / (reps * 8) * 1e3


def tiles(in_proj: bool, m: int) -> dict:
    """Candidate launches for m rows: CUDA-core tiles (one row) and tensor-core tiles."""
    out = {"gemv": fs._IN_TILE_ONE_ROW if in_proj else fs._OUT_TILE_ONE_ROW}  # the committed CUDA-core tiles
    if m == 1:
        for bn in (16, 32, 64) if in_proj else (4, 8, 16):
            for bk in (128, 256, 512, 1024):
                for warps, stages in ((4, 2), (4, 3), (8, 3)):
                    if 2048 <= bn * bk <= 16384:
                        out[f"gemv n{bn} k{bk} w{warps} s{stages}"] = {
                            "DOT": False, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": warps, "num_stages": stages}
    for bn in ((16, 32, 64) if in_proj else (16, 32)) if m > 1 else ():  # one row: tensor cores lose (2026-11)
        for bk in (64, 128, 256) if in_proj else (128, 256):
            for st in (3, 4):
                if bn * bk <= 8192 and (m <= 16 or bk <= 128 or bn <= 32):
                    out[f"dot n{bn} k{bk} s{st}"] = {"DOT": True, "BLOCK_N": bn, "BLOCK_K": bk, "num_warps": 4,
                                                     "num_stages": st}
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--out", default=str(RESULTS / "fused_step_tiles.json"))
    a = ap.parse_args()
    fs.PDL = False  # each launch timed on its own; what PDL changes is measured on whole steps (profile_decode.py)
    torch.manual_seed(0)
    dev, bf = "cuda", torch.bfloat16
    rows = []

    def report(row):
        rows.append(row)
        if "error" in row:
            print(f"{row['proj']:<8} {row['m']} {row['tile']:<18} failed: {row['error']}", flush=True)
        else:
            print(f"{row['proj']:<8} {row['m']} {row['tile']:<18} {row['us']:7.1f} us {row['GB_s']:6.0f} GB/s   "
                  f"cuBLAS {row['cublas_us']:5.1f} us   rel. err {row['rel_err']:.1e}", flush=True)

    K, N, C, LO = 2048, 8512, 4352, 4096  # in_proj; the conv channels are [4096, 8448)
    W = [torch.randn(N, K, device=dev, dtype=bf) * 0.02 for _ in range(8)]
    nw, cw, cb = torch.rand(K, device=dev) + 0.5, torch.randn(C, 4, device=dev), torch.randn(C, device=dev)
    for m in a.rows:
        h = torch.randn(m, K, device=dev)
        ss = h.pow(2).sum(-1, keepdim=True)
        pristine = torch.randn(m, C, 4, device=dev, dtype=bf)
        states = [pristine.clone() for _ in range(8)]
        x = (h * torch.rsqrt(ss / K + 1e-5) * nw).to(bf)
        t_cublas = bench(lambda i: F.linear(x, W[i]), a.reps)
        exact = F.linear(x.float(), W[0].float())
        plain = torch.cat([exact[:, :LO], exact[:, LO + C:]], 1)
        for name, tile in tiles(True, m).items():
            try:
                y = fs.in_proj_gemv(h, ss, nw, 1e-5, W[0], pristine.clone(), cw, cb, LO, tile=tile).float()
                got = torch.cat([y[:, :LO], y[:, LO + C:]], 1)
                t = bench(lambda i: fs.in_proj_gemv(h, ss, nw, 1e-5, W[i], states[i], cw, cb, LO, tile=tile), a.reps)
            except Exception as e:  # noqa: BLE001 - a tile that does not compile is a row, not a stop
                report({"proj": "in_proj", "m": m, "tile": name, "error": repr(e)[:200]})
                continue
            report({"proj": "in_proj", "m": m, "tile": name, "us": t, "GB_s": N * K * 2 / t / 1e3,
                    "cublas_us": t_cublas, "rel_err": float((got - plain).norm() / plain.norm())})

    KO, NO = 4096, 2048
    WO = [torch.randn(NO, KO, device=dev, dtype=bf) * 0.02 for _ in range(8)]
    gw = torch.rand(KO, device=dev) + 0.5
    for m in a.rows:
        y = torch.randn(m, KO, device=dev, dtype=bf)
        ss = y.float().pow(2).sum(-1, keepdim=True)
        h = torch.randn(m, NO, device=dev)
        xo = (y.float() * torch.rsqrt(ss / KO + 1e-5) * gw).to(bf)
        truth = h + F.linear(xo.float(), WO[0].float())
        t_cublas = bench(lambda i: F.linear(xo, WO[i]), a.reps)
        for name, tile in tiles(False, m).items():
            try:
                out, sso = fs.out_proj_residual(y, ss, gw, 1e-5, WO[0], h, tile=tile)
                t = bench(lambda i: fs.out_proj_residual(y, ss, gw, 1e-5, WO[i], h, tile=tile), a.reps)
            except Exception as e:  # noqa: BLE001
                report({"proj": "out_proj", "m": m, "tile": name, "error": repr(e)[:200]})
                continue
            squares = out.pow(2).sum(-1)
            report({"proj": "out_proj", "m": m, "tile": name, "us": t, "GB_s": NO * KO * 2 / t / 1e3,
                    "cublas_us": t_cublas, "rel_err": float((out - truth).norm() / truth.norm()),
                    "sumsq_rel_err": float(((sso.sum(-1) - squares).abs() / squares).max())})
    Path(a.out).write_text(json.dumps({"command": "python benchmarks/fused_step_tiles.py --rows "
                                       + " ".join(map(str, a.rows)),
                                       "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                                       "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
