"""omnimamba: unified multimodal understanding and generation on Mamba-2.

Each verb parses its arguments, calls one library function and prints. Errors a user can cause print one
line and exit with status 2; bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import sys

from .cli_common import load_model, non_negative_float, positive_int, sampling_args
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
    if args.format in ("llava", "coco"):
        paths = write_shapes_split(world, args.split, args.n, args.out)
    else:
        from .data.export import export_shapes

        paths = export_shapes(world, args.format, args.split, args.n, args.out)
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
    names = [s.name for s in config.stages]
    unknown = [s for s in args.stage or [] if s not in names]
    if unknown:
        raise UserError(f"--stage {unknown[0]}: not a stage of this config; its stages are {names}")
    if args.tokenizers_only and args.stage:
        raise UserError("--tokenizers-only runs no stage; drop --stage")
    trainer = Trainer(config)
    results = trainer.run(resume=args.resume, only=[] if args.tokenizers_only else args.stage)
    for stage, r in results.items():
        if r.get("mmu") or r.get("t2i"):
            print(f"{stage}: MMU {r.get('mmu', {}).get('accuracy', {}).get('overall', float('nan')):.1%}  "
                  f"T2I {r.get('t2i', {}).get('overall', float('nan')):.1%}")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import run_quickstart

    run_quickstart(args.out, args.set or [], resume=args.resume)
    return 0


def _stream(pieces) -> str:
    text = ""
    for piece in pieces:
        print(piece, end="", flush=True)
        text += piece
    print()
    return text


def cmd_answer(args: argparse.Namespace) -> int:
    from .inference import to_pixels

    model = load_model(args)
    to_pixels([args.image], model.config.understanding.image_size)  # a bad file fails before any work
    _stream(model.answer(args.image, args.question, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                         stream=True))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .inference import to_pixels

    model = load_model(args)
    to_pixels([args.image], model.config.understanding.image_size)
    history: list[tuple[str, str]] = []
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting about {args.image}; an empty line, 'exit' or Ctrl-D ends")
    while True:
        if interactive:
            print("you: ", end="", flush=True)
        line = sys.stdin.readline()
        question = line.strip()
        if not line or question in ("", "exit", "quit"):
            return 0
        if interactive:
            print("omnimamba: ", end="", flush=True)
        reply = _stream(model.answer(args.image, question, max_new_tokens=args.max_new_tokens,
                                     temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                     seed=args.seed, stream=True, history=history))
        history.append((question, reply))


def cmd_generate(args: argparse.Namespace) -> int:
    from pathlib import Path

    import numpy as np

    from .data.formats import picture_grid
    from .fileio import writing

    model = load_model(args)
    # Settings left unset take the model's defaults (the official release's are greedy, without guidance).
    images = model.generate_images([args.prompt] * args.n, guidance_scale=args.guidance, temperature=args.temperature,
                                   top_k=args.top_k, top_p=args.top_p, seed=args.seed, batch_size=args.batch_size,
                                   progress=True)
    out = Path(args.out)
    with writing(out, "output folder"):
        out.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            tmp = out / f".image-{i:03d}.png.tmp"
            im.save(tmp, format="PNG")
            tmp.replace(out / f"image-{i:03d}.png")  # no half-written PNG under the final name
        picture_grid([(np.asarray(im), args.prompt) for im in images], out / "grid.png")
    print(f"wrote {len(images)} image(s) and grid.png to {out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .serving.app import create_app
    except ImportError as e:
        raise UserError(f"serving needs FastAPI and uvicorn: pip install 'omnimamba[serve]' ({e})") from None
    model = load_model(args, need_tokenizer=True)
    app = create_app(model, max_batch=args.max_batch, max_queue=args.max_queue, request_timeout=args.request_timeout,
                     use_cuda_graph=False if args.eager else None)
    if args.verb == "demo":
        print(f"the demo: open http://{args.host}:{args.port}/ in a browser (Ctrl-C stops it)")
    else:
        print(f"serving {args.model} on http://{args.host}:{args.port} (POST /v1/chat/completions, "
              "/v1/images/generations; GET /health, /metrics; the demo page at /)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
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


def build_parser() -> argparse.ArgumentParser:
    from .cli_bench import add_parser as add_bench
    from .cli_convert import add_parser as add_convert
    from .cli_experiments import add_parser as add_experiments

    parser = argparse.ArgumentParser(prog="omnimamba", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")

    p = sub.add_parser("quickstart", help="train shapes-tiny through both stages on the Shapes world, then score it")
    p.add_argument("--out", default="runs/quickstart", help="output directory (default: runs/quickstart)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field of the quickstart config")
    p.add_argument("--resume", action="store_true", help="continue an interrupted quickstart from its checkpoints")
    p.set_defaults(func=cmd_quickstart)

    p = sub.add_parser("answer", help="answer a question about an image (streams the answer)")
    p.add_argument("question", help="the question, e.g. \"how many circles are there?\"")
    p.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="longest answer (default: 64)")
    sampling_args(p, temperature=0.0)
    p.set_defaults(func=cmd_answer)

    p = sub.add_parser("chat", help="several questions about one image, one per line on standard input")
    p.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="longest answer (default: 64)")
    sampling_args(p, temperature=0.0)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="generate images from a text prompt (PNGs and a grid)")
    p.add_argument("prompt", help="the text prompt, e.g. \"two red circles\"")
    p.add_argument("--n", type=positive_int, default=4, help="number of images (default: 4)")
    p.add_argument("--guidance", type=non_negative_float, default=None,
                   help="classifier-free guidance scale, 1 = off (default: 3.0; 1 for official weights)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="images per batch (default: 16)")
    p.add_argument("--out", default="generated", help="output directory (default: generated)")
    sampling_args(p, temperature=None)
    p.set_defaults(func=cmd_generate)

    add_bench(sub)

    p = sub.add_parser("train", help="train OmniMamba through named stages (see configs/)")
    p.add_argument("--config", help="YAML or TOML run config; every field has a default (the paper's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. --set stages.0.lr=1e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of run.out")
    p.add_argument("--stage", action="append", help="run only this stage (repeatable)")
    p.add_argument("--tokenizers-only", action="store_true",
                   help="train (or load) the tokenizers and cache the training images' codes into run.out, then "
                        "stop; a later run reuses them (--set model.vq=OUT/vq --set model.understanding_vq=...)")
    p.set_defaults(func=cmd_train)

    for verb, text in (("serve", "an OpenAI-style HTTP API with continuous batching (FastAPI + uvicorn)"),
                       ("demo", "the web demo in a browser: chat about an image, generate images (= serve)")):
        p = sub.add_parser(verb, help=text)
        p.add_argument("--model", default="runs/quickstart/stage2-unified", help="model directory (default: the quickstart's)")
        p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
        p.add_argument("--port", type=positive_int, default=8000, help="port (default: 8000)")
        p.add_argument("--max-batch", type=positive_int, default=32, help="answers decoded together (default: 32)")
        p.add_argument("--max-queue", type=positive_int, default=256,
                       help="requests that may wait for a place; more get 429 (default: 256)")
        p.add_argument("--request-timeout", type=non_negative_float, default=300.0,
                       help="seconds an answer may take, queueing included; then it is cancelled (default: 300)")
        p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
        p.add_argument("--dtype", choices=("float32", "bfloat16"),
                       help="cast the weights (default: as loaded, float32); bfloat16 halves a GPU's memory traffic")
        p.add_argument("--eager", action="store_true",
                       help="decode without CUDA graphs (slower on a GPU; for debugging)")
        p.set_defaults(func=cmd_serve)

    add_experiments(sub)

    p = sub.add_parser("backbone-demo", help="backbone only: a tiny Mamba-2 learns arithmetic progressions, decodes with the cache")
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
    p.add_argument("--n", type=positive_int, default=1000, help="number of images (default: 1000)")
    p.add_argument("--split", choices=("train", "val", "test", "heldout"), default="train")
    p.add_argument("--seed", type=int, default=0, help="world seed (default: 0)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels (default: 64)")
    p.add_argument("--format", choices=("llava", "coco", "pope", "mme", "vqa", "mcq"), default="llava",
                   help="llava/coco: PNGs + LLaVA conversations + COCO captions (training data, FID references); "
                        "pope, mme, vqa, mcq: those benchmarks' own file layouts (default: llava)")
    p.set_defaults(func=cmd_data_shapes)
    p = data.add_parser("baselines", help="print the chance baselines of the Shapes scorer")
    p.add_argument("--n", type=positive_int, default=200, help="images / prompts (default: 200)")
    p.add_argument("--split", choices=("val", "test", "heldout"), default="test")
    p.add_argument("--seed", type=int, default=0, help="world seed (default: 0)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels (default: 64)")
    p.set_defaults(func=cmd_data_baselines)

    p = sub.add_parser("presets", help="list the Mamba-2 presets and their parameter counts")
    p.set_defaults(func=cmd_presets)


    add_convert(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except UserError as e:
        # one line, even where the message quotes a user's path holding a line break or carriage return
        print(f"omnimamba {args.verb}: error: " + " ".join(str(e).splitlines()), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
