"""What the verb modules share: argument types, the Shapes evaluation arguments, and loading a model from
--model / --device / --dtype."""

from __future__ import annotations

import argparse
import math

from .errors import UserError


def at_least(kind, minimum):
    """An argparse type: `kind` (int or float) no smaller than `minimum`."""

    def parse(text: str):
        value = kind(text)
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


positive_int = at_least(int, 1)
non_negative_float = at_least(float, 0)
non_negative_int = at_least(int, 0)


def probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def unit_interval(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def load_model(args: argparse.Namespace, need_tokenizer: bool = False):
    import torch

    from .model import OmniMamba

    model = OmniMamba.from_pretrained(args.model)
    if need_tokenizer and model.tokenizer is None:
        raise UserError(f"{args.model}: the model folder has no tokenizer.json")
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {args.device}: no CUDA device is available")
    dtype = getattr(args, "dtype", None)
    return model.to(device=device, dtype=getattr(torch, dtype) if dtype else None)


def shapes_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="runs/quickstart/stage2-unified",
                   help="model directory (default: runs/quickstart/stage2-unified)")
    p.add_argument("--n-images", type=positive_int, default=100, help="images for MMU questions (default: 100)")
    p.add_argument("--n-prompts", type=positive_int, default=48, help="T2I prompts (default: 48)")
    p.add_argument("--guidance", type=non_negative_float, default=3.0, help="CFG scale (default: 3.0)")
    p.add_argument("--top-k", type=non_negative_int, default=20, help="image-code top-k, 0 = all (default: 20)")
    p.add_argument("--temperature", type=non_negative_float, default=1.0,
                   help="image-code sampling temperature (default: 1.0)")
    epsilon_arg(p)
    p.add_argument("--seed", type=int, default=0, help="Shapes world seed (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    p.add_argument("--out", default="runs/evaluation", help="output directory (default: runs/evaluation)")


def epsilon_arg(p: argparse.ArgumentParser, *names: str, many: bool = False) -> None:
    p.add_argument(*(names or ("--epsilon",)), type=unit_interval, nargs="+" if many else None,
                   default=[0.0] if many else 0.0,
                   help="never sample an image code whose conditional probability is below this, in [0, 1) "
                        f"(epsilon sampling; with guidance, taken before the mix){'; several to sweep' if many else ''}"
                        " (default: 0, no floor)")


def sampling_args(p: argparse.ArgumentParser, temperature: float | None) -> None:
    """temperature None: the settings are left unset, to take the model's (OmniMambaConfig.image_sampling)."""
    from_model = temperature is None
    p.add_argument("--model", default="runs/quickstart/stage2-unified",
                   help="model directory (default: the quickstart's, runs/quickstart/stage2-unified)")
    p.add_argument("--temperature", type=non_negative_float, default=temperature,
                   help=f"sampling temperature, 0 = greedy (default: {1 if from_model else temperature:g})")
    p.add_argument("--top-k", type=non_negative_int, default=None if from_model else 0,
                   help="keep the k most likely tokens, 0 = all (default: "
                        f"{'0; 1 for official weights' if from_model else 0})")
    p.add_argument("--top-p", type=probability, default=None if from_model else 1.0,
                   help="nucleus sampling mass, in (0, 1] (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
