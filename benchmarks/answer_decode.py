"""What an answer's end-of-text check costs a decode step: the 1.3B preset decoding `--window` tokens after a
prompt of `--length` positions, as benchmarks (every token, no check: stop_at_eot=False) and as answers
(stop_at_eot=True: after each token, has every row ended?). One GPU, random weights, bf16, graphed.

Reading the check's flag used to wait for the GPU after every token (bool() of a CUDA tensor), so the host
launched each next step only once the GPU had run dry; generation.DoneFlag reads it one step late, with the
next step already queued. ratio = ms/token with the check over without it (1.00: the check is free).

    python benchmarks/answer_decode.py [--length 1024] [--window 256] [--batch 1 8] [--name answer_decode]
"""

from __future__ import annotations

import argparse

import gpu_common as gc
from mmu_long_generation import build_omnimamba, run_omnimamba

COLUMNS = ["batch", "stop_at_eot", "tokens", "ms_per_token", "ratio"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--length", type=int, default=1024)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--repeat", type=int, default=3, help="runs of each setting, the median kept")
    ap.add_argument("--name", default="answer_decode", help="results/<name>.json")
    args = ap.parse_args()
    model = build_omnimamba()
    rows = []
    for b in args.batch:
        run_omnimamba(model, args.length, 16, graph=True, batch=b)  # compile the kernels, capture the graphs
        base = None
        for stop in (False, True):
            runs = sorted((run_omnimamba(model, args.length, args.window, True, b, stop_at_eot=stop)
                           for _ in range(args.repeat)), key=lambda r: r["ms_per_token"])
            r = runs[len(runs) // 2]
            base = base or r["ms_per_token"]
            rows.append({"batch": b, "stop_at_eot": stop, "tokens": r["tokens"], "ms_per_token": r["ms_per_token"],
                         "ratio": r["ms_per_token"] / base})
            gc.print_table(rows[-1:], COLUMNS)
    print()
    gc.print_table(rows, COLUMNS)
    gc.write_json(args.name, {"benchmark": "answer decode: end-of-text check against none", "length": args.length,
                              "window": args.window, "weights": "random weights", **gc.device_info(), "rows": rows})


if __name__ == "__main__":
    main()
