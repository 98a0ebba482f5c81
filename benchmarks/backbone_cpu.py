"""Prefill and per-token decode of a Mamba-2 preset on the CPU, with random weights.

Baseline in the same run: producing the next token without the recurrent cache, i.e. one full forward over the
whole sequence so far (what a model without a decoding state must do). Prints a table, writes JSON.

    python benchmarks/backbone_cpu.py [--preset mamba2-130m] [--lengths 128 512 2048] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from omnimamba.mamba2 import Mamba2LM, preset


def timed(fn, repeat: int) -> float:
    """Median seconds of `repeat` calls after one warm-up."""
    fn()
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return statistics.median(samples)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mamba2-130m")
    ap.add_argument("--lengths", type=int, nargs="+", default=[128, 512, 2048])
    ap.add_argument("--decode-tokens", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "backbone_cpu.json"))
    args = ap.parse_args()

    torch.manual_seed(0)
    config = preset(args.preset)
    model = Mamba2LM(config, backend="reference").eval()
    rows = []
    for length in args.lengths:
        ids = torch.randint(0, config.vocab_size, (1, length))
        prefill_s = timed(lambda: model(ids, cache=model.allocate_cache(1)), args.repeat)
        cache = model.allocate_cache(1)
        model(ids, cache=cache)
        token = ids[:, -1]

        def decode():
            for _ in range(args.decode_tokens):
                model.step(token, cache)

        decode_s = timed(decode, args.repeat) / args.decode_tokens
        recompute_s = timed(lambda: model(ids), 1)  # next token without a cache: the whole sequence again
        rows.append({
            "length": length,
            "prefill_ms": prefill_s * 1e3,
            "prefill_tokens_per_s": length / prefill_s,
            "decode_ms_per_token": decode_s * 1e3,
            "no_cache_ms_per_token": recompute_s * 1e3,
            "cache_speedup": recompute_s / decode_s,
            "cache_bytes": cache.nbytes,
        })

    header = f"{'length':>7} {'prefill ms':>11} {'prefill tok/s':>14} {'decode ms/tok':>14} " \
             f"{'no-cache ms/tok':>16} {'speedup':>8} {'cache MiB':>10}"
    print(f"{args.preset}, random weights, reference kernels, {torch.get_num_threads()} CPU threads")
    print(header)
    for r in rows:
        print(f"{r['length']:>7} {r['prefill_ms']:>11.1f} {r['prefill_tokens_per_s']:>14.0f} "
              f"{r['decode_ms_per_token']:>14.2f} {r['no_cache_ms_per_token']:>16.1f} "
              f"{r['cache_speedup']:>7.1f}x {r['cache_bytes'] / 2**20:>10.2f}")
    result = {
        "benchmark": "backbone_cpu",
        "weights": "random",
        "device": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "settings": vars(args),
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
