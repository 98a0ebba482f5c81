"""The causal depthwise conv + SiLU of a Mamba-2 block on the CPU, forward + backward, at the Shapes models'
training shapes (width 17: one image row and one code).

`ops.reference.causal_conv` runs it as conv2d on a channels-last view of the (b, l, c) input; the baseline in the
same run is the formulation it replaced, conv1d on a (b, c, l) copy (as mamba_ssm's reference writes it).
Interleaved repeats, median milliseconds. Prints a table, writes JSON.

    python benchmarks/conv_cpu.py [--shapes 16x282x320 16x90x320] [--width 17] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F
from backbone_cpu import timed

from omnimamba.ops.reference import causal_conv
from omnimamba.training.ablation import machine


def conv1d_baseline(x, weight, bias):
    """The conv1d formulation: the input transposed to (b, c, l) and padded, the output transposed back."""
    k = weight.size(-1)
    out = F.conv1d(F.pad(x.transpose(1, 2), (k - 1, 0)), weight[:, None, :], bias, groups=weight.size(0))
    return F.silu(out).transpose(1, 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", nargs="+", default=["16x282x320", "16x90x320"],
                    help="batch x length x channels (the quickstart's T2I and MMU sequences, d_inner + 2 d_state)")
    ap.add_argument("--width", type=int, default=17)
    ap.add_argument("--repeat", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds of both formulations")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "conv_cpu.json"))
    a = ap.parse_args()
    gen = torch.Generator().manual_seed(0)
    rows = []
    print(f"{'shape':>14} {'conv1d ms':>10} {'channels-last ms':>17} {'speed-up':>9}")
    for shape in a.shapes:
        b, l, c = (int(v) for v in shape.split("x"))
        # a slice of a wider tensor, strided as in_proj's output is
        x = torch.randn(b, l, c + 64, generator=gen)[..., 32:32 + c].requires_grad_()
        w = torch.randn(c, a.width, generator=gen).requires_grad_()
        bias = torch.randn(c, generator=gen).requires_grad_()
        grad = torch.randn(b, l, c, generator=gen)
        runs = {"conv1d": lambda: conv1d_baseline(x, w, bias).backward(grad),
                "channels-last": lambda: causal_conv(x, w, bias)[0].backward(grad)}
        times = {name: [] for name in runs}
        for _ in range(a.rounds):
            for name, fn in runs.items():
                times[name].append(timed(fn, a.repeat) * 1e3)
        base, ours = statistics.median(times["conv1d"]), statistics.median(times["channels-last"])
        rows.append({"shape": [b, l, c], "width": a.width, "conv1d_ms": base, "channels_last_ms": ours,
                     "speedup": base / ours, "rounds_ms": times})
        print(f"{shape:>14} {base:>10.2f} {ours:>17.2f} {base / ours:>8.2f}x")
    out = {"command": "python benchmarks/conv_cpu.py " + " ".join(f"--shapes {s}" for s in a.shapes),
           "machine": machine(), "seed": 0, "what": "causal depthwise conv + SiLU, forward + backward, float32",
           "rows": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
