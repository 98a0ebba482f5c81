"""An ablation's records summarised: mean ± standard deviation over seeds per variant and score, the paper's
claims checked against them, written as ablation.json, ablation.md and ablation.png."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..fileio import writing

METRICS = {
    "test_mmu": "MMU test",
    "test_pope_f1": "POPE F1 test",
    "test_t2i": "T2I test (guided)",
    "test_t2i_unguided": "T2I test (unguided)",
    "heldout_mmu": "MMU held-out",
    "heldout_t2i": "T2I held-out (guided)",
    "test_mmu_loss": "MMU loss test",
    "test_t2i_loss": "T2I loss test",
    # a unified vocabulary's -log P(own modality) per target token: what it has yet to learn of which ids to emit
    "test_mmu_off_modality": "MMU off-modality nats",
    "test_t2i_off_modality": "T2I off-modality nats",
}
# Losses (nats per target token on the test split's ground truth): lower is better. They carry no sampling
# noise, so they separate variants whose sampled scores are still within noise of each other.
LOWER_IS_BETTER = {"test_mmu_loss", "test_t2i_loss", "test_mmu_off_modality", "test_t2i_off_modality"}

# (claim, [(better variant, worse variant, score), ...]): the paper says the first beats the second on each.
CLAIMS = [
    ("decoupled vocabularies help generation (Table 4)",
     [(a, b, k) for a, b in (("full", "unified-lora"), ("decoupled-nolora", "unified-nolora"))
      for k in ("test_t2i", "test_t2i_loss")]),
    ("task LoRA helps understanding (Table 4)",
     [(a, b, k) for a, b in (("full", "decoupled-nolora"), ("unified-lora", "unified-nolora"))
      for k in ("test_mmu", "test_mmu_loss")]),
    ("task LoRA helps generation (Table 4)",
     [(a, b, k) for a, b in (("full", "decoupled-nolora"), ("unified-lora", "unified-nolora"))
      for k in ("test_t2i", "test_t2i_loss")]),
    ("decoupled two-stage training beats one joint stage (Section 3.5)",
     [("full", "joint", k) for k in ("test_mmu", "test_t2i", "test_mmu_loss", "test_t2i_loss")]),
]


def _mean_std(values: list[float]) -> tuple[float, float]:
    m = sum(values) / len(values)
    if len(values) < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (len(values) - 1))


def summarise(records: list[dict]) -> dict:
    """{variant: {score: {mean, std (sample, n - 1), n, values}}} in the order variants first appear."""
    by_variant: dict[str, list[dict]] = {}
    for r in records:
        by_variant.setdefault(r["variant"], []).append(r)
    out = {}
    for variant, rows in by_variant.items():
        out[variant] = {}
        for key in METRICS:
            values = [r[key] for r in rows if key in r]
            if values:
                m, s = _mean_std(values)
                out[variant][key] = {"mean": m, "std": s, "n": len(values), "values": values}
    return out


def compare(summary: dict, better: str, worse: str, key: str) -> dict:
    """The difference of means (better minus worse) and whether it exceeds twice its standard error (Welch's),
    which is what 'beyond noise' means here; for a loss the claim holds when the difference is negative."""
    a, b = summary.get(better, {}).get(key), summary.get(worse, {}).get(key)
    if a is None or b is None:
        return {"verdict": "not run"}
    diff = a["mean"] - b["mean"]
    if a["n"] < 2 or b["n"] < 2:
        return {"diff": diff, "verdict": "cannot tell (one seed)"}
    se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    if abs(diff) <= 2 * se:
        verdict = "within noise"
    else:
        verdict = "agrees" if (diff < 0 if key in LOWER_IS_BETTER else diff > 0) else "disagrees"
    return {"diff": diff, "se": se, "verdict": verdict}


def check_claims(summary: dict) -> list[dict]:
    out = []
    for claim, pairs in CLAIMS:
        rows = [{"better": a, "worse": b, "score": k, **compare(summary, a, b, k)} for a, b, k in pairs]
        verdicts = {r["verdict"] for r in rows}
        if verdicts == {"not run"}:
            overall = "not run"
        elif verdicts == {"agrees"}:
            overall = "agrees"
        elif "disagrees" in verdicts and "agrees" not in verdicts:
            overall = "disagrees"
        elif "agrees" in verdicts and "disagrees" in verdicts:
            overall = "mixed"
        else:
            overall = "cannot tell"
        out.append({"claim": claim, "verdict": overall, "comparisons": rows})
    return out


def markdown(summary: dict, claims: list[dict], meta: dict) -> str:
    keys = [k for k in METRICS if any(k in s for s in summary.values())]
    lines = [f"# Ablation on Shapes\n", f"Command: `{meta.get('command', '')}`  ", f"Machine: {meta.get('machine', '')}  ",
             f"Seeds: {meta.get('seeds')}; scores: {meta.get('n_images')} test images' questions, "
             f"{meta.get('n_prompts')} prompts; mean ± standard deviation over seeds.\n",
             "| variant | " + " | ".join(METRICS[k] for k in keys) + " |",
             "|---|" + "---|" * len(keys)]
    for variant, scores in summary.items():
        cells = [f"{scores[k]['mean']:.3f} ± {scores[k]['std']:.3f}" if k in scores else "-" for k in keys]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += ["", "## The paper's claims", "",
              "A difference counts when it exceeds twice its standard error over seeds; otherwise it is within noise. "
              "Losses are nats per target token on the test split's ground truth (lower is better).",
              "", "| claim | verdict | comparisons (difference of means) |", "|---|---|---|"]
    for c in claims:
        parts = [f"{r['better']} − {r['worse']} on {METRICS[r['score']]}: "
                 + (f"{r['diff']:+.3f} ({r['verdict']})" if "diff" in r else r["verdict"]) for r in c["comparisons"]]
        lines.append(f"| {c['claim']} | **{c['verdict']}** | " + "; ".join(parts) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(summary: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    keys = [k for k in METRICS if any(k in s for s in summary.values())]
    variants = list(summary)
    cols = min(4, len(keys))
    rows = -(-len(keys) // cols)
    fig, grid = plt.subplots(rows, cols, figsize=(3.4 * cols, rows * (0.45 * len(variants) + 1.4)), sharey=True,
                             squeeze=False)
    for ax in grid.flat[len(keys):]:
        ax.set_visible(False)
    for ax, key in zip(grid.flat, keys):
        for y, v in enumerate(variants):
            s = summary[v].get(key)
            if s is None:
                continue
            colour = "C0" if v == "full" else "0.5"
            if key in LOWER_IS_BETTER:  # a loss: no natural zero, so a point on an axis fitted to the values
                ax.errorbar(s["mean"], y, xerr=s["std"], fmt="o", color=colour, capsize=3)
            else:
                ax.barh(y, s["mean"], xerr=s["std"], color=colour, capsize=3)
            ax.plot(s["values"], [y] * len(s["values"]), "k.", ms=4)
        ax.set(title=METRICS[key] + (" (lower is better)" if key in LOWER_IS_BETTER else ""))
        if key not in LOWER_IS_BETTER:
            ax.set_xlim(0, 1)
        ax.title.set_fontsize(9)
    for ax in grid[:, 0]:
        ax.set_yticks(range(len(variants)), variants)
    grid[0, 0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_report(records: list[dict], out: str | Path, meta: dict) -> dict:
    out = Path(out)
    summary = summarise(records)
    claims = check_claims(summary)
    report = {**meta, "records": records, "summary": summary, "claims": claims}
    with writing(out, "ablation report"):
        out.mkdir(parents=True, exist_ok=True)
        (out / "ablation.json").write_text(json.dumps(report, indent=1))
        (out / "ablation.md").write_text(markdown(summary, claims, meta))
        chart = bar_chart(summary, out / "ablation.png")
    report["chart"] = str(chart) if chart else None
    return report
