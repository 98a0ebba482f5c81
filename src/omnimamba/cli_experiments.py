"""The experiment verbs: `omnimamba ablate` (the paper's ablations), `guidance` (a CFG sweep) and `plot`
(training curves). Kept beside cli.py, which registers them."""

from __future__ import annotations

import argparse
import sys

from .cli_common import epsilon_arg, load_model, non_negative_float, positive_int, sampling_args
from .errors import UserError


def cmd_plot(args: argparse.Namespace) -> int:
    from .evaluation.curves import plot_run, plot_runs

    by = args.by or ("step" if len(args.run) == 1 else "examples")
    if by == "step" and len(args.run) > 1:
        raise UserError("plot --by step draws one run; several runs compare --by examples (their batches may differ)")
    if by == "step":
        print(f"wrote {plot_run(args.run[0], args.out, smoothing=args.smoothing)}")
    else:
        print(f"wrote {plot_runs(args.run, args.out or 'runs_compared.png', smoothing=args.smoothing)}")
    return 0


def cmd_guidance(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .data.shapes import ShapesConfig, ShapesWorld
    from .evaluation.shapes_eval import guidance_sweep

    model = load_model(args)
    world = ShapesWorld(ShapesConfig(image_size=model.config.understanding.image_size), seed=args.world_seed)
    by_epsilon = {}
    for epsilon in args.epsilons:
        print(f"{args.split} split, {args.n_prompts} prompts, temperature {args.temperature:g}, top-k {args.top_k}, "
              f"epsilon {epsilon:g}")
        by_epsilon[str(epsilon)] = guidance_sweep(model, model.tokenizer, world, args.split, args.n_prompts,
                                                  tuple(args.scales), tuple(range(args.seed, args.seed + args.seeds)),
                                                  args.temperature, args.top_k, epsilon=epsilon)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        table = {"split": args.split, "n_prompts": args.n_prompts, "temperature": args.temperature,
                 "top_k": args.top_k}
        if len(by_epsilon) == 1:  # the one-setting layout: {"epsilon": e, "scales": {scale: row}}
            ((epsilon, result),) = by_epsilon.items()
            table.update(epsilon=float(epsilon), scales=result)
        else:
            table["by_epsilon"] = by_epsilon
        Path(args.out).write_text(json.dumps(table, indent=1))
        print(f"wrote {args.out}")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .evaluation.ablation_report import write_report
    from .training.ablation import DEFAULT_VARIANTS, Ablation
    from .training.config import apply_overrides, read_config_file

    base = apply_overrides(read_config_file(args.config), args.set or [])
    seeds = list(range(args.seed, args.seed + args.seeds))
    ablation = Ablation(base, args.out, args.variants or DEFAULT_VARIANTS, seeds, args.n_images, args.n_prompts)
    records = ablation.run(jobs=args.jobs, train=not args.report_only)
    if not records:
        raise UserError(f"ablate --report-only: no finished run under {args.out}/runs (each writes score.json)")
    # The machines the runs recorded (a report of runs finished elsewhere names theirs, not this one).
    machines = sorted({r.get("machine", "not recorded by the run") for r in records})
    argv = sys.argv[1:] if args.argv is None else args.argv
    meta = {"command": "omnimamba " + " ".join(argv), "machine": "; ".join(machines), "seeds": seeds,
            "n_images": args.n_images, "n_prompts": args.n_prompts}
    report = write_report(records, args.out, meta)
    print((Path(args.out) / "ablation.md").read_text())
    print(f"wrote {args.out}/ablation.json, ablation.md" + (", ablation.png" if report["chart"] else
                                                            " (pip install matplotlib for the chart)"))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("ablate", help="the paper's ablations on Shapes: each variant trained and scored over seeds")
    p.add_argument("--config", required=True, help="the base run config (Shapes data, stage 1 and stage 2)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field of the base config")
    p.add_argument("--variants", nargs="+", help="unified-nolora decoupled-nolora unified-lora full joint ratio-A:B "
                   "(default: the four of Table 4, joint, ratio-1:3, ratio-3:1)")
    p.add_argument("--seeds", type=positive_int, default=3, help="training seeds per variant (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="the first seed (default: 0)")
    p.add_argument("--n-images", type=positive_int, default=50, help="test images whose questions score MMU (default: 50)")
    p.add_argument("--n-prompts", type=positive_int, default=48, help="T2I prompts per split (default: 48)")
    p.add_argument("--out", default="runs/ablation", help="output folder; a rerun reuses finished runs (default: runs/ablation)")
    p.add_argument("--jobs", type=positive_int, default=1,
                   help="runs trained at once, each in its own process, spread over the visible GPUs, for runs too "
                        "small to fill a GPU (default: 1, one after another in this process)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the report from the runs that have finished (the others are named)")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("guidance", help="T2I score against the guidance scale, over sampling seeds (Shapes)")
    p.add_argument("--scales", type=non_negative_float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 5.0],
                   help="guidance scales to try, 1 = none (default: 1 1.5 2 3 5)")
    p.add_argument("--seeds", type=positive_int, default=3, help="sampling seeds per scale, from --seed on (default: 3)")
    p.add_argument("--split", choices=("val", "test", "heldout"), default="val")
    p.add_argument("--n-prompts", type=positive_int, default=48, help="T2I prompts (default: 48)")
    p.add_argument("--world-seed", type=int, default=0, help="Shapes world seed (default: 0)")
    p.add_argument("--out", help="also write the table as JSON here")
    sampling_args(p, temperature=1.0)
    epsilon_arg(p, "--epsilons", many=True)
    p.set_defaults(func=cmd_guidance)

    p = sub.add_parser("plot", help="training curves of a run (losses per task, validation scores) as a PNG; "
                                    "of several runs against examples seen")
    p.add_argument("run", nargs="+", help="the run's directory (run.out), holding metrics.jsonl; several: "
                                          "compared against the examples each task has seen")
    p.add_argument("--by", choices=("step", "examples"), help="x axis: the run's steps (one run's default) or the "
                   "examples each task has seen (several runs'; needs each run's train_config.json)")
    p.add_argument("--out", help="PNG to write (default: RUN/curves.png, or runs_compared.png for several runs)")
    p.add_argument("--smoothing", type=positive_int, default=5,
                   help="moving average over this many logged points (default: 5)")
    p.set_defaults(func=cmd_plot)
