"""Issue 11's CPU targets against the data a 15-minute CPU run can see: validation scores and training losses of
the committed runs (CPU quickstart, CPU 4x steps, GPU recipe) against the examples each task has seen, from the
metrics.jsonl and train_config.json in their folders. Writes budget.png and budget.json beside this script.

    python docs/results/quickstart-cpu/budget/plot.py
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from omnimamba.evaluation import curves

HERE = Path(__file__).resolve().parent
RESULTS = HERE.parents[1]
RUNS = {  # label: (folders, colour); each folder holds metrics.jsonl, its train_config.json here or one level up
    "CPU quickstart, 750 stage-2 steps (d8d89eb, seeds 0-2)": (
        ["quickstart-cpu/vq-seeded", "quickstart-cpu/vq-seeded/seed1", "quickstart-cpu/vq-seeded/seed2"], "tab:red"),
    "CPU, 3,000 stage-2 steps (long-3000, seeds 0-1)": (
        ["quickstart-cpu/long-3000", "quickstart-cpu/long-3000/seed1"], "tab:orange"),
    "GPU recipe, shapes-small (4ae8fa5, seeds 0-1)": (["shapes-gpu/conv-row/seed0", "shapes-gpu/conv-row/seed1"],
                                                      "tab:blue"),
    "GPU recipe at 6f043da (stopped at step ~1,000)": (["shapes-gpu/vq-seeded"], "tab:cyan"),
}


def examples_seen(folder: Path) -> list[dict]:
    """The run's metrics rows with the examples each task has seen (omnimamba.evaluation.curves); a seed's
    folder may keep its train_config.json one level up."""
    config_dir = folder if (folder / "train_config.json").exists() else folder.parent
    return curves.examples_seen(curves.read_metrics(folder), curves.read_stages(config_dir))


def main() -> None:
    fig, axes = plt.subplots(2, 2, figsize=(12, 8.5))
    panels = [("eval_mmu", "mmu", "validation MMU accuracy"), ("eval_t2i", "t2i", "validation T2I score, guided"),
              ("mmu_loss", "mmu", "MMU training loss (nats per answer token)"),
              ("t2i_loss", "t2i", "T2I training loss (nats per image code)")]
    summary = {"command": "python docs/results/quickstart-cpu/budget/plot.py", "runs": {}}
    for label, (folders, colour) in RUNS.items():
        summary["runs"][label] = []
        for n, name in enumerate(folders):
            rows = examples_seen(RESULTS / name)
            last = [r for r in rows if "eval_mmu" in r][-1]
            summary["runs"][label].append({"folder": name, "seen_mmu": last["seen_mmu"], "seen_t2i": last["seen_t2i"],
                                           "last_eval_mmu": last["eval_mmu"], "last_eval_t2i": last["eval_t2i"]})
            for ax, (key, task, title) in zip(axes.flat, panels):
                pts = [(r[f"seen_{task}"], r[key]) for r in rows if key in r and r[f"seen_{task}"] > 0]
                if pts:
                    xs, ys = zip(*pts)
                    style = "o-" if key.startswith("eval") else "-"
                    ax.plot(xs, ys, style, color=colour, alpha=0.85 if key.startswith("eval") else 0.45,
                            markersize=4, lw=1.2, label=label if n == 0 else None)
                ax.set_title(title, fontsize=10)
    quickstart = summary["runs"][next(iter(RUNS))][0]
    for ax, (key, task, _) in zip(axes.flat, panels):
        ax.set_xscale("log")
        ax.axvline(quickstart[f"seen_{task}"], color="grey", ls=":", lw=1)
        ax.set_xlabel(f"{task.upper()} examples seen")
        ax.grid(alpha=0.3)
    axes[0, 0].axhline(0.80, color="tab:red", ls="--", lw=0.8)
    axes[0, 0].axhline(0.432, color="black", ls="--", lw=0.8)
    axes[0, 0].text(1.2e3, 0.81, "CPU target 80 %", fontsize=8, color="tab:red")
    axes[0, 0].text(1.2e3, 0.44, "most frequent answer 43.2 %", fontsize=8)
    axes[0, 1].axhline(0.50, color="tab:red", ls="--", lw=0.8)
    axes[0, 1].text(1.2e3, 0.51, "CPU target 50 %", fontsize=8, color="tab:red")
    for ax in axes[1]:
        ax.set_yscale("log")
    axes[0, 0].legend(fontsize=8, loc="lower right")
    fig.suptitle("What a task has seen decides the score: the dotted line is the 15-minute CPU quickstart's "
                 "budget", fontsize=11)
    fig.tight_layout()
    fig.savefig(HERE / "budget.png", dpi=110)
    (HERE / "budget.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
