"""The table of results.jsonl (one line per tokenizer and seed, written by run.sh):
    python docs/results/quickstart-cpu/tokenizer/summarise.py > docs/results/quickstart-cpu/tokenizer/summary.txt"""
import json
import statistics as st
from collections import defaultdict
from pathlib import Path

rows = defaultdict(dict)
for line in (Path(__file__).parent / "results.jsonl").read_text().splitlines():
    r = json.loads(line)
    rows[r["variant"]][r["seed"]] = r  # a rerun of a seed replaces the earlier line
colours = ("red", "orange", "yellow", "green", "blue", "purple")
print(f"{'variant':18s} {'seeds':8s} {'round trip %':>16s}  " + " ".join(f"{c:>7s}" for c in colours))
for variant, by_seed in rows.items():
    trips = [by_seed[s]["round_trip"]["overall"] * 100 for s in sorted(by_seed)]
    spread = f"{st.mean(trips):5.1f} ± {st.stdev(trips):4.1f}" if len(trips) > 1 else f"{trips[0]:5.1f}"
    kept = [st.mean(by_seed[s]["colours_kept"][c] for s in by_seed) * 100 for c in colours]
    print(f"{variant:18s} {','.join(map(str, sorted(by_seed))):8s} {spread:>16s}  " + " ".join(f"{k:6.0f}%" for k in kept))
print("\nround trip: T2I scorer on 96 ground-truth test renders after encode + decode (mean ± sd over seeds);")
print("colours: share of drawn objects of that colour found again with it near their centre (mean over seeds)")
