"""`omnimamba quickstart`: the first thing a new user runs. On a CPU, in minutes: train the tiny VQ tokenizer
and the shapes-tiny OmniMamba through both stages on the Shapes world, then score it on the test and
held-out splits against the chance baselines, and draw a picture of generated images and answers."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from .training.config import config_from_dict

# Mirrors configs/shapes-tiny.yaml (a test keeps the two equal).
QUICKSTART = {
    "model": {"preset": "shapes-tiny"},
    # Existence questions half "yes" (one "no" kept of an image's three): without it the CPU model answers every
    # existence question "no" (POPE F1 0.00; 0.24-0.83 over three runs with it: docs/results/quickstart-cpu/README.md).
    "data": {"source": "shapes", "shapes": {"seed": 0, "image_size": 64, "train_images": 10000, "max_turns": 4,
                                            "balance_existence": True, "t2i_plain": True}},
    # Small batches, many steps: on two cores the tokenizer gains more from updates than from images per update.
    "vq_train": {"steps": 1500, "lr": 0.005, "batch": 8, "foreground_weight": 10.0, "restart": "split"},
    # The embedded default has no pretrained Mamba-2 (the paper starts from one), so stage 1, which freezes
    # the backbone, can only warm up the new modules; stage 2, which trains the backbone, does the learning.
    "stages": [
        {"name": "stage1-mmu", "steps": 50, "lr": 0.002, "warmup": 10, "batch": [32, 0]},
        {"name": "stage1-t2i", "steps": 50, "lr": 0.002, "warmup": 10, "batch": [0, 32]},
        {"name": "stage2-unified", "steps": 750, "lr": 0.002, "warmup": 20, "batch": [16, 16], "min_lr_ratio": 0.05},
    ],
    "run": {"out": "runs/quickstart", "log_every": 10, "ckpt_every": 250, "eval_images": 40, "eval_prompts": 24,
            "eval_guidance": 2.0, "eval_top_k": 0, "eval_temperature": 1.0},
}


def final_report(model, tokenizer, world, out: Path, n_images: int = 100, n_prompts: int = 48,
                 guidance: float = 3.0, top_k: int = 20, temperature: float = 1.0, log=print,
                 epsilon: float = 0.0) -> dict:
    """Scores on the test and held-out splits (T2I with and without guidance), the baselines, the VQ
    round trip's scorer rate, and a picture."""
    from .evaluation.shapes_eval import (caption_information, evaluate_mmu, evaluate_t2i, save_evaluation_picture,
                                         tokenizer_round_trip)
    from .evaluation.shapes_scorer import T2I_CATEGORIES, chance_baselines, format_baselines, format_failures

    model.eval()
    report: dict = {"baselines": chance_baselines(world, "test", n_images)}
    log(format_baselines(report["baselines"]))
    trip = tokenizer_round_trip(model.vq, world, "test", n_prompts)
    report["vq_round_trip"], report["vq_colours_kept"] = trip["round_trip"], trip["colours_kept"]
    # the held-out split's ceiling too: whether a held-out pair fails in the tokenizer or in the generator
    report["vq_round_trip_heldout"] = tokenizer_round_trip(model.vq, world, "heldout", n_prompts)["round_trip"]
    log(f"T2I scorer on ground-truth renders after the VQ round trip: {report['vq_round_trip']['overall']:.1%} "
        f"(held-out split {report['vq_round_trip_heldout']['overall']:.1%}); objects that keep their colour: "
        f"{', '.join(f'{c} {v:.0%}' for c, v in report['vq_colours_kept'].items())}")
    info = report["caption_information"] = caption_information(model, tokenizer, world, "test", min(n_images, 50))
    gap = "" if info["guidance_gap"] is None else (f", null caption {info['null']:.3f} "
                                                    f"(guidance has {info['guidance_gap']:.3f} to amplify)")
    log(f"T2I nats per code on test images: own caption {info['own']:.3f}, another image's {info['other']:.3f} "
        f"(the caption tells {info['information']:.3f}){gap}")
    for split in ("test", "heldout"):
        mmu, answered = evaluate_mmu(model, tokenizer, world, split, n_images)
        t2i_cfg, generated = evaluate_t2i(model, tokenizer, world, split, n_prompts, guidance_scale=guidance,
                                          temperature=temperature, top_k=top_k, epsilon=epsilon)
        t2i_plain, _ = evaluate_t2i(model, tokenizer, world, split, n_prompts, guidance_scale=1.0,
                                    temperature=temperature, top_k=top_k, epsilon=epsilon)
        report[split] = {"mmu": mmu, "t2i_guided": t2i_cfg, "t2i_unguided": t2i_plain}
        log(f"\n{split} split: MMU accuracy {mmu['accuracy']['overall']:.1%} "
            f"({', '.join(f'{k} {v:.0%}' for k, v in mmu['accuracy'].items() if k != 'overall')})")
        for kind, m in mmu["pope"].items():
            log(f"  POPE {kind:<12} acc {m['accuracy']:.1%}  F1 {m['f1']:.3f}  yes-ratio {m['yes_ratio']:.2f}")
        # each category both ways: guidance can fix one kind of prompt and break another (relations, counts)
        kinds = ", ".join(f"{k} {t2i_cfg[k]:.0%} / {t2i_plain[k]:.0%}" for k in T2I_CATEGORIES if k in t2i_cfg)
        log(f"  T2I score with guidance {guidance:g}: {t2i_cfg['overall']:.1%}   without: {t2i_plain['overall']:.1%}  "
            f"(with / without: {kinds})")
        log(f"  T2I failures of {t2i_cfg['n']} prompts, guided: {format_failures(t2i_cfg['failures'])}; "
            f"unguided: {format_failures(t2i_plain['failures'])}")
        if split == "test":
            save_evaluation_picture(out / "quickstart.png", generated, answered, world, split, n=8)
    return report


def run_quickstart(out: str | None = None, overrides: list[str] = (), log=print, resume: bool = False) -> dict:
    from .training.config import apply_overrides
    from .training.data import shapes_world
    from .training.loop import Trainer

    raw = apply_overrides(QUICKSTART, [f"run.out={out}"] if out else [])
    config = config_from_dict(apply_overrides(raw, list(overrides)))
    start = time.perf_counter()
    trainer = Trainer(config)
    trainer.run(resume=resume)
    train_s = time.perf_counter() - start
    out_dir = Path(config.run.out)
    report = final_report(trainer.model, trainer.tokenizer, shapes_world(config), out_dir,
                          guidance=config.run.eval_guidance, top_k=config.run.eval_top_k,
                          temperature=config.run.eval_temperature, log=log, epsilon=config.run.eval_epsilon)
    report["train_seconds"] = train_s
    report["total_seconds"] = time.perf_counter() - start
    report["device"] = str(trainer.device)
    write_report(report, out_dir / "results.json")
    log(f"\ntrained in {train_s / 60:.1f} min, evaluated in {(report['total_seconds'] - train_s) / 60:.1f} min "
        f"on {trainer.device}; model in {out_dir / 'stage2-unified'}, picture {out_dir / 'quickstart.png'}, "
        f"figures {out_dir / 'results.json'}")
    return report


def write_report(report: dict, path: Path) -> None:
    path.write_text(json.dumps(report, indent=1, default=_jsonable))


def _jsonable(x):
    if isinstance(x, (np.floating, np.integer)):
        return x.item()
    return str(x)
