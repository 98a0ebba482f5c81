"""omnimamba: unified multimodal understanding and generation on Mamba-2.

Each verb parses its arguments, calls one library function and prints. Errors a user can cause print one
line and exit with status 2; bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import sys

from .errors import UserError


def cmd_presets(args: argparse.Namespace) -> int:
    from .mamba2 import PRESETS, Mamba2LM

    import torch

    print(f"{'preset':<14}{'d_model':>8}{'layers':>8}{'heads':>7}{'params':>16}")
    for name, cfg in PRESETS.items():
        with torch.device("meta"):
            n = sum(p.numel() for p in Mamba2LM(cfg, backend="reference").parameters())
        print(f"{name:<14}{cfg.d_model:>8}{cfg.n_layer:>8}{cfg.nheads:>7}{n:>16,}")
    return 0


def cmd_params(args: argparse.Namespace) -> int:
    from .model import parameter_report

    print(parameter_report(args.preset))
    return 0


def cmd_data_shapes(args: argparse.Namespace) -> int:
    from .data.formats import write_shapes_split
    from .data.shapes import ShapesConfig, ShapesWorld

    world = ShapesWorld(ShapesConfig(image_size=args.image_size), seed=args.seed)
    paths = write_shapes_split(world, args.split, args.n, args.out)
    for k, v in paths.items():
        print(f"{k:<9} {v}")
    return 0


def cmd_data_baselines(args: argparse.Namespace) -> int:
    from .data.shapes import ShapesConfig, ShapesWorld
    from .evaluation.shapes_scorer import chance_baselines, format_baselines

    world = ShapesWorld(ShapesConfig(image_size=args.image_size), seed=args.seed)
    print(f"Shapes {args.split} split, {args.n} images / prompts, seed {args.seed}")
    print(format_baselines(chance_baselines(world, args.split, args.n)))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .training.config import load_train_config
    from .training.loop import Trainer

    config = load_train_config(args.config, args.set or [])
    trainer = Trainer(config)
    results = trainer.run(resume=args.resume, only=args.stage)
    for stage, r in results.items():
        if r.get("mmu") or r.get("t2i"):
            print(f"{stage}: MMU {r.get('mmu', {}).get('accuracy', {}).get('overall', float('nan')):.1%}  "
                  f"T2I {r.get('t2i', {}).get('overall', float('nan')):.1%}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import backbone_demo

    r = backbone_demo(steps=args.steps, seed=args.seed)
    print(f"loss {r['first_loss']:.3f} -> {r['last_loss']:.3f} (chance {r['chance_loss']:.3f}) "
          f"in {r['train_seconds']:.1f}s over {r['steps']} steps")
    print(f"greedy continuation accuracy with the recurrent cache: {r['continuation_accuracy']:.1%}")
    print(f"prefill + decode vs full forward, relative error: {r['decode_vs_forward_rel_error']:.2e}")
    print(f"decoding cache: {r['cache_bytes']:,} bytes for 64 sequences, whatever their length")
    return 0


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="omnimamba", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("quickstart", help="the main job on the embedded default (today: the backbone demo)")
    p.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("train", help="train OmniMamba through named stages (see configs/)")
    p.add_argument("--config", help="YAML or TOML run config; every field has a default (the paper's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. --set stages.0.lr=1e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of run.out")
    p.add_argument("--stage", action="append", help="run only this stage (repeatable)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="train a tiny Mamba-2 on arithmetic progressions and decode with the cache")
    p.add_argument("--steps", type=int, default=300, help="training steps (default: 300)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("params", help="parameter count of an OmniMamba preset, per module, and the LoRA share")
    p.add_argument("--preset", default="omnimamba-1.3b", help="preset name (default: omnimamba-1.3b)")
    p.set_defaults(func=cmd_params)

    data = sub.add_parser("data", help="the embedded Shapes data set").add_subparsers(
        dest="data_verb", required=True, metavar="DATA_VERB")
    p = data.add_parser("shapes", help="write a Shapes split as PNGs + LLaVA JSON + COCO captions + a grid")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--n", type=_positive_int, default=1000, help="number of images (default: 1000)")
    p.add_argument("--split", choices=("train", "val", "test", "heldout"), default="train")
    p.add_argument("--seed", type=int, default=0, help="world seed (default: 0)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels (default: 64)")
    p.set_defaults(func=cmd_data_shapes)
    p = data.add_parser("baselines", help="print the chance baselines of the Shapes scorer")
    p.add_argument("--n", type=_positive_int, default=200, help="images / prompts (default: 200)")
    p.add_argument("--split", choices=("val", "test", "heldout"), default="test")
    p.add_argument("--seed", type=int, default=0, help="world seed (default: 0)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels (default: 64)")
    p.set_defaults(func=cmd_data_baselines)

    p = sub.add_parser("presets", help="list the Mamba-2 presets and their parameter counts")
    p.set_defaults(func=cmd_presets)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as e:
        print(f"omnimamba {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
