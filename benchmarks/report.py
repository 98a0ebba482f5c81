"""Turn the GPU benchmarks' JSON (benchmarks/results/*.json) into Markdown tables and a plot of tokens/s and
decode memory against sequence length. Runs anywhere (no GPU); the plot needs matplotlib.

    python benchmarks/report.py [--results benchmarks/results]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def _table(rows: list[dict], columns: list[tuple[str, str, str]]) -> list[str]:
    """columns: (key, header, format spec); missing values print as '-', failures keep their note."""
    out = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for r in rows:
        cells = []
        for key, _, spec in columns:
            v = r.get(key)
            cells.append("-" if v is None else format(v, spec) if spec else str(v))
        out.append("| " + " | ".join(cells) + " |")
    return out


def _value(rows, system, key, **match):
    for r in rows:
        if r["system"] == system and all(r.get(k) == v for k, v in match.items()) and r.get(key) is not None:
            return r[key]
    return None


def _header(d: dict) -> str:
    return (f"{d['device']} ({d['memory_GiB']} GiB), torch {d['torch']}, triton {d['triton']}, transformers "
            f"{d['transformers']}, flash-linear-attention {d['flash-linear-attention']}; {d['weights']}.")


def mmu_section(d: dict) -> list[str]:
    rows = d["rows"]
    batch = rows[0].get("batch", 1)
    title = "Long multimodal-understanding generation (paper Fig. 1 c-d)" + (f", batch {batch}" if batch > 1 else "")
    lines = [f"## {title}", "", _header(d), "",
             f"Decode phase at each total sequence length: {d['window']} greedy tokens timed after the prefill, "
             f"batch {batch}, bf16. Roofline: bytes one step must read (weights, state or KV cache) over the measured "
             f"copy bandwidth, {d['copy_bandwidth_TBps']:.2f} TB/s.", ""]
    lines += _table(rows, [("system", "system", ""), ("length", "length", ",d"),
                           ("tokens_per_s", "tokens/s", ".1f"), ("ms_per_token", "ms/token", ".2f"),
                           ("roofline_ms", "roofline ms", ".2f"), ("peak_decode_GiB", "decode peak GiB", ".2f"),
                           ("peak_prefill_GiB", "prefill peak GiB", ".2f"), ("prefill_s", "prefill s", ".2f"),
                           ("note", "note", "")])
    lengths = sorted({r["length"] for r in rows})
    # the graphed row; runs at large batch have only the chunked-prefill one (the same decode step)
    ours_system = "omnimamba" if any(r["system"] == "omnimamba" for r in rows) else "omnimamba-chunked"
    ratio_rows = []
    for n in lengths:
        ours = _value(rows, ours_system, "tokens_per_s", length=n)
        row = {"length": n}
        for base in ("llama-stock", "llama-static-compile"):
            theirs = _value(rows, base, "tokens_per_s", length=n)
            row[base] = None if not (ours and theirs) else ours / theirs
        mem_ours = _value(rows, ours_system, "peak_decode_GiB", length=n)
        mem_base = _value(rows, "llama-static-compile", "peak_decode_GiB", length=n)
        row["memory"] = None if not (mem_ours and mem_base) else 1 - mem_ours / mem_base
        ratio_rows.append(row)
    lines += ["", "OmniMamba's tokens/s over the baselines', and its decode memory saving, from the rows above:", ""]
    lines += _table(ratio_rows, [("length", "length", ",d"), ("llama-stock", "x stock generate", ".1f"),
                                 ("llama-static-compile", "x static cache + compile", ".2f"),
                                 ("memory", "memory saved vs static", ".0%")])
    return lines


def image_section(d: dict) -> list[str]:
    n = d["rows"][0]["images"]
    lines = [f"## Image generation (paper Table 3), {n} images", "", _header(d), "", d["benchmark"] + ".", ""]
    lines += _table(d["rows"], [("system", "system", ""), ("images", "images", "d"),
                                ("seconds", "seconds", ".3f"), ("images_per_s", "images/s", ".2f"),
                                ("codes_seconds", "codes only s", ".3f"), ("ms_per_step", "ms/step", ".2f"),
                                ("roofline_ms_per_step", "roofline ms/step", ".2f"), ("peak_GiB", "peak GiB", ".2f"),
                                ("note", "note", "")])
    return lines


def training_section(d: dict) -> list[str]:
    title = "## Stage-2 training throughput (1.3B preset)"
    if d.get("options", "none") != "none":
        title += f", {d['options']}"
    lines = [title, "", _header(d), "", *([f"`{d['command']}`", ""] if "command" in d else []),
             f"{d['benchmark']}; MMU sequences of {d['mmu_sequence']} tokens, T2I sequences of "
             f"{d['t2i_sequence']}; scan backward: {d['scan_backward']}.", ""]
    lines += _table(d["rows"], [("system", "system", ""), ("mmu_batch", "MMU batch", "d"),
                                ("t2i_batch", "T2I batch", "d"), ("tokens_per_step", "tokens/step", ",d"),
                                ("step_s", "step s", ".3f"), ("tokens_per_s", "tokens/s", ",.0f"),
                                ("peak_GiB", "peak GiB", ".1f"), ("note", "note", "")])
    return lines


def plot(d: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for system in dict.fromkeys(r["system"] for r in d["rows"]):
        pts = [(r["length"], r["tokens_per_s"], r["peak_decode_GiB"]) for r in d["rows"]
               if r["system"] == system and r.get("tokens_per_s")]
        if pts:
            x, tps, mem = zip(*pts)
            left.plot(x, tps, marker="o", label=system)
            right.plot(x, mem, marker="o", label=system)
    for ax, label in ((left, "decode tokens/s"), (right, "decode peak memory (GiB)")):
        ax.set_xscale("log")
        ax.set_xlabel("total sequence length (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    left.set_yscale("log")
    left.legend(fontsize=8)
    fig.suptitle(f"Long MMU generation, batch 1, bf16 - {d['device']}, random weights", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    lines = ["# GPU benchmarks", "", "Generated by `python benchmarks/report.py` from the JSON files beside it; "
             "measured by `bash benchmarks/run_gpu.sh` (the scripts' docstrings say what each row is).", ""]
    sections = (("mmu_long_generation", mmu_section), ("mmu_long_generation_batch16", mmu_section),
                ("mmu_long_generation_batch64", mmu_section), ("image_generation", image_section),
                ("image_generation_64", image_section), ("image_generation_128", image_section),
                ("training_throughput", training_section), ("training_throughput_loss_chunk", training_section),
                ("training_throughput_checkpointing", training_section),
                *((f"training_scaling_{n}", training_section) for n in ("1gpu", "2gpu_ddp", "2gpu_fsdp", "2gpu_fsdp_shard_frozen")))
    for name, section in sections:
        path = args.results / f"{name}.json"
        if path.is_file():
            data = json.loads(path.read_text())
            lines += section(data) + [""]
            if name == "mmu_long_generation" and plot(data, args.results / "mmu_long_generation.png"):
                lines += ["![tokens/s and memory vs length](mmu_long_generation.png)", ""]
    out = args.results / "gpu_benchmarks.md"
    out.write_text("\n".join(lines))
    print(out.read_text())


if __name__ == "__main__":
    main()
