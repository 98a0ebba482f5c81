"""`omnimamba convert`: the official release's checkpoint to our folder layout (safetensors, config, tokenizer)
and back. Kept beside cli.py, which registers it."""

from __future__ import annotations

import argparse


def cmd_from_official(args: argparse.Namespace) -> int:
    from .fileio import read_json
    from .model import OmniMambaConfig
    from .model.official import find_checkpoint, load_official

    config = None
    if args.config:
        raw = read_json(args.config, "model config")
        config = OmniMambaConfig.from_dict(raw.get("omnimamba", raw) if isinstance(raw, dict) else raw)
    ckpt = find_checkpoint(args.src)
    print(f"reading {ckpt}")
    model = load_official(ckpt, config=config, vq_path=args.vq, tokenizer_path=args.tokenizer, backend="reference")
    model.save_pretrained(args.out)
    note = "" if model.tokenizer else " (no tokenizer.json: add GPT-NeoX-20B's with --tokenizer to answer and generate)"
    print(f"wrote {args.out}: config.json, model.safetensors{', tokenizer.json' if model.tokenizer else ''}{note}")
    return 0


def cmd_to_official(args: argparse.Namespace) -> int:
    from .model import OmniMamba
    from .model.official import save_official

    model = OmniMamba.from_pretrained(args.model, backend="reference")
    path = save_official(model, args.out)
    print(f"wrote {path} (the release's key layout; load it with its scripts, or with omnimamba)")
    return 0


def add_parser(sub) -> None:
    convert = sub.add_parser("convert", help="convert the official release's checkpoint to ours, and back")
    verbs = convert.add_subparsers(dest="direction", required=True, metavar="DIRECTION")
    p = verbs.add_parser("official", help="official checkpoint (OmniMamba-1.3b.pth, or its folder) -> our folder")
    p.add_argument("src", help="OmniMamba-1.3b.pth or the folder holding it (with tokenizer.json, vq_ds16_t2i.pt)")
    p.add_argument("out", help="output model folder")
    p.add_argument("--vq", help="LlamaGen's vq_ds16_t2i.pt, when the checkpoint holds no VQ weights")
    p.add_argument("--tokenizer", help="GPT-NeoX-20B's tokenizer.json (default: beside the checkpoint)")
    p.add_argument("--config", help="a model config JSON, for a checkpoint other than the 1.3B release")
    p.set_defaults(func=cmd_from_official)
    p = verbs.add_parser("to-official", help="our model folder -> a checkpoint in the release's key layout")
    p.add_argument("model", help="model folder (official conventions)")
    p.add_argument("out", help="output .pth file")
    p.set_defaults(func=cmd_to_official)
