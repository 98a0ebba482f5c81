"""Mean and standard deviation of the quickstart's scores over seeds 0-2 (writes the table in summary.txt):
    python docs/results/quickstart-cpu/seeds/summarise.py > docs/results/quickstart-cpu/seeds/summary.txt
    python docs/results/quickstart-cpu/seeds/summarise.py DIR_SEED0 DIR_SEED1 ...   # other runs' results.json
"""
import json
import statistics as st
import sys

# the three runs as committed here (seed 0 is the run one folder up), unless run folders are given
runs = dict(enumerate(sys.argv[1:])) or {0: "docs/results/quickstart-cpu", 1: "docs/results/quickstart-cpu/seeds/seed1",
                                         2: "docs/results/quickstart-cpu/seeds/seed2"}
rows = {}
for s, d in runs.items():
    try:
        r = json.load(open(f"{d}/results.json"))
    except OSError:
        continue
    t, h = r["test"], r["heldout"]
    rows[s] = {"MMU test": t["mmu"]["accuracy"]["overall"] * 100,
               **{f"POPE F1 {k}": v["f1"] for k, v in t["mmu"]["pope"].items()},
               "T2I guided": t["t2i_guided"]["overall"] * 100, "T2I unguided": t["t2i_unguided"]["overall"] * 100,
               "MMU held-out": h["mmu"]["accuracy"]["overall"] * 100, "T2I held-out": h["t2i_guided"]["overall"] * 100,
               "round trip": r["vq_round_trip"]["overall"] * 100, "wall s": r["total_seconds"]}
    if "vq_colours_kept" in r:  # recorded since the quickstart lists what its tokenizer keeps of each colour
        rows[s].update({f"kept {c}": v * 100 for c, v in r["vq_colours_kept"].items()})
for k in next(iter(rows.values())):
    vals = [rows[s][k] for s in sorted(rows)]
    sd = st.stdev(vals) if len(vals) > 1 else float("nan")
    print(f"{k:14s} " + "  ".join(f"{v:7.3f}" for v in vals) + f"   mean {st.mean(vals):.3f} sd {sd:.3f}")
