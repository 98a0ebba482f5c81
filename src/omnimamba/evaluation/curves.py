"""Training curves: `omnimamba plot RUN_DIR` reads the run's metrics.jsonl and draws the tokenizer's
reconstruction loss, each task's training loss and the validation scores against steps, the stages laid end to
end, into one PNG; `omnimamba plot RUN_DIR RUN_DIR ...` (or `--by examples`) draws several runs' losses and
scores against the examples each task has seen, so that runs of different batch sizes compare."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..errors import UserError


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of `run_dir/metrics.jsonl`; a resumed run's repeated steps keep their last record."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.jsonl (is it a training run's directory, run.out?)")
    records: dict[tuple, dict] = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{n}: not a JSON record") from None
        kind = "eval" if any(k.startswith("eval_") for k in rec) else "train"
        records[(rec.get("stage"), rec.get("step"), kind)] = rec
    return list(records.values())


VQ_STAGE = "vq-tokenizer"  # the tokenizer's records: its own step axis
UNDERSTANDING_VQ_STAGE = "understanding-tokenizer"  # the understanding encoder's own tokenizer, where it has one
TOKENIZER_STAGES = (VQ_STAGE, UNDERSTANDING_VQ_STAGE)


def stage_offsets(records: list[dict]) -> dict[str, int]:
    """Global step at which each model stage starts, stages in the order they first appear (the tokenizer's
    steps are counted apart)."""
    last: dict[str, int] = {}
    for r in records:
        last[r["stage"]] = max(last.get(r["stage"], 0), int(r["step"]) + 1)
    offsets, total = {stage: 0 for stage in TOKENIZER_STAGES}, 0
    for stage, steps in last.items():
        if stage not in TOKENIZER_STAGES:
            offsets[stage] = total
            total += steps
    return offsets


def smooth(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average (window clipped at the start), for noisy per-step losses."""
    if window <= 1 or len(values) < 2:
        return values
    c = np.cumsum(np.insert(values, 0, 0.0))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(0, idx - window)
    return (c[idx] - c[lo]) / (idx - lo)


def read_stages(run_dir: str | Path) -> list[dict]:
    """The stages (name, steps, batch) of the run's train_config.json, which `omnimamba train` writes at its start."""
    path = Path(run_dir) / "train_config.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: no train_config.json (`omnimamba train` writes it into run.out at its start); "
                        f"runs compare by examples seen, which needs each stage's batch")
    try:
        return [{"name": s["name"], "steps": int(s["steps"]), "batch": list(s["batch"])}
                for s in json.loads(path.read_text())["stages"]]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: not a training config ({e})") from None


def examples_seen(records: list[dict], stages: list[dict]) -> list[dict]:
    """The model stages' records, each with `seen_mmu` and `seen_t2i`: the examples of each task trained on once
    its step is done (every step of the stages before it, in the config's order, plus this stage's steps so far
    times its batch; batches are global, whatever the processes or micro-batches)."""
    before, total, batch = {}, [0, 0], {}
    for s in stages:
        before[s["name"]], batch[s["name"]] = list(total), s["batch"]
        total = [total[i] + s["steps"] * s["batch"][i] for i in (0, 1)]
    out = []
    for r in records:
        if r.get("stage") in TOKENIZER_STAGES:
            continue
        if r.get("stage") not in batch:
            raise UserError(f"metrics name stage {r.get('stage')!r}, which the run's train_config.json does not "
                            f"(stages: {list(batch)})")
        done = int(r["step"]) + 1
        out.append({**r, "seen_mmu": before[r["stage"]][0] + done * batch[r["stage"]][0],
                    "seen_t2i": before[r["stage"]][1] + done * batch[r["stage"]][1]})
    return out


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install 'omnimamba[plot]'") from None
    return plt


COMPARED = (("eval_mmu", "mmu", "validation MMU accuracy"), ("eval_t2i", "t2i", "validation T2I score, guided"),
            ("mmu_loss", "mmu", "MMU training loss (per answer token)"),
            ("t2i_loss", "t2i", "T2I training loss (per image code)"))


def plot_runs(run_dirs: list[str | Path], out: str | Path, smoothing: int = 5) -> Path:
    """Several runs' validation scores and training losses against the examples each task has seen (log axis),
    one colour a run, into `out`."""
    plt = _pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    for n, run in enumerate(run_dirs):
        rows = examples_seen(read_metrics(run), read_stages(run))
        colour = f"C{n % 10}"
        for ax, (key, task, title) in zip(axes.flat, COMPARED):
            pts = sorted((r[f"seen_{task}"], r[key]) for r in rows if r.get(key) is not None and r[f"seen_{task}"])
            if pts:
                x, y = np.array([p[0] for p in pts]), np.array([p[1] for p in pts], dtype=float)
                if key.startswith("eval"):
                    ax.plot(x, y, "o-", color=colour, markersize=4, label=str(run))
                else:
                    ax.plot(x, smooth(y, smoothing), color=colour, alpha=0.8, label=str(run))
            ax.set_title(title, fontsize=10)
    for ax, (key, task, _) in zip(axes.flat, COMPARED):
        ax.set_xscale("log")
        ax.set_xlabel(f"{task.upper()} examples seen")
        ax.grid(alpha=0.3)
        if key.startswith("eval"):
            ax.set_ylim(0, 1)
        else:
            ax.set_yscale("log")
    axes[0, 0].legend(fontsize=8)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_run(run_dir: str | Path, out: str | Path | None = None, smoothing: int = 5) -> Path:
    """Draw the run's curves; returns the PNG's path (default RUN_DIR/curves.png)."""
    plt = _pyplot()
    records = read_metrics(run_dir)
    offsets = stage_offsets(records)
    out = Path(out) if out else Path(run_dir) / "curves.png"
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.2))
    ax_vq, ax_loss, ax_eval = axes

    def series(key: str, stages=None):
        rows = sorted((offsets[r["stage"]] + r["step"], r[key]) for r in records
                      if r.get(key) is not None and (stages is None or r["stage"] in stages))
        return (np.array([x for x, _ in rows]), np.array([y for _, y in rows], dtype=float)) if rows else None

    drawn = 0
    for stage, label in ((VQ_STAGE, "generation (VQ)"), (UNDERSTANDING_VQ_STAGE, "understanding encoder's")):
        vq = series("recon_loss", {stage})
        if vq is not None:
            ax_vq.plot(vq[0], smooth(vq[1], smoothing), label=label)
            ax_vq.set_yscale("log")
            drawn += 1
    if drawn > 1:
        ax_vq.legend(fontsize=8)
    ax_vq.set(title="tokenizers: reconstruction loss", xlabel="step")
    for key, label in (("mmu_loss", "MMU (answer tokens)"), ("t2i_loss", "T2I (image codes)")):
        s = series(key)
        if s is not None:
            ax_loss.plot(s[0], smooth(s[1], smoothing), label=label)
    ax_loss.set(title="training loss (cross-entropy per target token)", xlabel="step")
    ax_loss.set_yscale("log")
    for key, label in (("eval_mmu", "MMU accuracy (val)"), ("eval_t2i", "T2I score (val, guided)"),
                       ("eval_t2i_unguided", "T2I score (val, unguided)")):
        s = series(key)
        if s is not None:
            ax_eval.plot(s[0], s[1], marker="o", label=label)
    ax_eval.set(title="validation scores", xlabel="step", ylim=(0, 1))
    for ax in (ax_loss, ax_eval):
        for stage, start in offsets.items():
            if stage in TOKENIZER_STAGES:
                continue
            ax.axvline(start, color="0.8", lw=0.8)
            # Vertical labels: short stages (stage 1 warms new modules only) would overlap side by side.
            ax.text(start, 0.98, f"{stage} ", transform=ax.get_xaxis_transform(), fontsize=7, va="top",
                    ha="right", rotation=90, color="0.4")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.suptitle(str(run_dir), fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
