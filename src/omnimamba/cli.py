"""omnimamba: unified multimodal understanding and generation on Mamba-2.

Each verb parses its arguments, calls one library function and prints. Errors a user can cause print one
line and exit with status 2; bugs keep their traceback.
"""

from __future__ import annotations

import argparse
import math
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
    trainer = Trainer(config)
    results = trainer.run(resume=args.resume, only=args.stage)
    for stage, r in results.items():
        if r.get("mmu") or r.get("t2i"):
            print(f"{stage}: MMU {r.get('mmu', {}).get('accuracy', {}).get('overall', float('nan')):.1%}  "
                  f"T2I {r.get('t2i', {}).get('overall', float('nan')):.1%}")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from .quickstart import run_quickstart

    run_quickstart(args.out, args.set or [], resume=args.resume)
    return 0


def _load_model(args: argparse.Namespace, need_tokenizer: bool = False):
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


def _stream(pieces) -> str:
    text = ""
    for piece in pieces:
        print(piece, end="", flush=True)
        text += piece
    print()
    return text


def cmd_answer(args: argparse.Namespace) -> int:
    from .inference import to_pixels

    model = _load_model(args)
    to_pixels([args.image], model.config.understanding.image_size)  # a bad file fails before any work
    _stream(model.answer(args.image, args.question, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                         stream=True))
    return 0


def cmd_chat(args: argparse.Namespace) -> int:
    from .inference import to_pixels

    model = _load_model(args)
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

    model = _load_model(args)
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


def _sampling_args(p: argparse.ArgumentParser, temperature: float | None) -> None:
    """temperature None: the settings are left unset, to take the model's (OmniMambaConfig.image_sampling)."""
    from_model = temperature is None
    p.add_argument("--model", default="runs/quickstart/stage2-unified",
                   help="model directory (default: the quickstart's, runs/quickstart/stage2-unified)")
    p.add_argument("--temperature", type=_non_negative_float, default=temperature,
                   help=f"sampling temperature, 0 = greedy (default: {1 if from_model else temperature:g})")
    p.add_argument("--top-k", type=_non_negative_int, default=None if from_model else 0,
                   help="keep the k most likely tokens, 0 = all (default: "
                        f"{'0; 1 for official weights' if from_model else 0})")
    p.add_argument("--top-p", type=_probability, default=None if from_model else 1.0,
                   help="nucleus sampling mass, in (0, 1] (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .data.shapes import ShapesConfig, ShapesWorld
    from .quickstart import final_report, write_report

    model = _load_model(args)
    world = ShapesWorld(ShapesConfig(image_size=model.config.understanding.image_size), seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = final_report(model, model.tokenizer, world, out, n_images=args.n_images, n_prompts=args.n_prompts,
                          guidance=args.guidance, top_k=args.top_k, temperature=args.temperature)
    write_report(report, out / "results.json")
    print(f"wrote {out / 'results.json'} and {out / 'quickstart.png'}")
    return 0


def cmd_plot(args: argparse.Namespace) -> int:
    from .evaluation.curves import plot_run

    print(f"wrote {plot_run(args.run, args.out, smoothing=args.smoothing)}")
    return 0


def cmd_guidance(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from .data.shapes import ShapesConfig, ShapesWorld
    from .evaluation.shapes_eval import guidance_sweep

    model = _load_model(args)
    world = ShapesWorld(ShapesConfig(image_size=model.config.understanding.image_size), seed=args.world_seed)
    print(f"{args.split} split, {args.n_prompts} prompts, temperature {args.temperature:g}, top-k {args.top_k}")
    result = guidance_sweep(model, model.tokenizer, world, args.split, args.n_prompts, tuple(args.scales),
                            tuple(range(args.seed, args.seed + args.seeds)), args.temperature, args.top_k)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"split": args.split, "n_prompts": args.n_prompts,
                                              "temperature": args.temperature, "top_k": args.top_k,
                                              "scales": result}, indent=1))
        print(f"wrote {args.out}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from .serving.app import create_app
    except ImportError as e:
        raise UserError(f"serving needs FastAPI and uvicorn: pip install 'omnimamba[serve]' ({e})") from None
    model = _load_model(args, need_tokenizer=True)
    app = create_app(model, max_batch=args.max_batch, max_queue=args.max_queue, request_timeout=args.request_timeout,
                     use_cuda_graph=False if args.eager else None)
    if args.verb == "demo":
        print(f"the demo: open http://{args.host}:{args.port}/ in a browser (Ctrl-C stops it)")
    else:
        print(f"serving {args.model} on http://{args.host}:{args.port} (POST /v1/chat/completions, "
              "/v1/images/generations; GET /health, /metrics; the demo page at /)")
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
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


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .evaluation import benchmarks as b

    if args.benchmark == "shapes":
        return cmd_evaluate(args)
    model = _load_model(args, need_tokenizer=True)
    opt = b.EvalOptions(Path(args.out or f"runs/eval/{args.benchmark}"), args.limit, args.batch_size,
                        getattr(args, "max_new_tokens", 32), progress=not args.quiet,
                        data=" ".join(str(x) for x in _benchmark_inputs(args)))
    if args.benchmark == "pope":
        summary = b.eval_pope(model, args.questions, args.images, opt, args.suffix)
    elif args.benchmark == "mme":
        summary = b.eval_mme(model, args.root, opt, tuple(args.tasks) if args.tasks else None, args.suffix)
    elif args.benchmark == "vqa":
        summary = b.eval_vqa(model, args.questions, args.annotations, args.images, opt, args.image_pattern,
                             args.suffix)
    elif args.benchmark == "mcq":
        summary = b.eval_mcq(model, args.file, args.images, opt, args.suffix)
    else:
        summary = b.eval_fid(model, args.captions, args.reference, args.inception_weights, opt, args.guidance,
                             args.temperature, args.top_k, args.seed, args.clip)
    print(summary["report"], end="")
    print(f"wrote {opt.out / 'predictions.jsonl'}, {opt.out / 'summary.json'} and {opt.out / 'report.txt'}")
    return 0


def _benchmark_inputs(args: argparse.Namespace) -> list:
    names = {"pope": ("questions",), "mme": ("root",), "vqa": ("questions",), "mcq": ("file",), "fid": ("captions",)}
    out = []
    for name in names[args.benchmark]:
        value = getattr(args, name)
        out += value if isinstance(value, list) else [value]
    return out


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import backbone_demo

    r = backbone_demo(steps=args.steps, seed=args.seed)
    print(f"loss {r['first_loss']:.3f} -> {r['last_loss']:.3f} (chance {r['chance_loss']:.3f}) "
          f"in {r['train_seconds']:.1f}s over {r['steps']} steps")
    print(f"greedy continuation accuracy with the recurrent cache: {r['continuation_accuracy']:.1%}")
    print(f"prefill + decode vs full forward, relative error: {r['decode_vs_forward_rel_error']:.2e}")
    print(f"decoding cache: {r['cache_bytes']:,} bytes for 64 sequences, whatever their length")
    return 0


def _at_least(kind, minimum):
    """An argparse type: `kind` (int or float) no smaller than `minimum`."""

    def parse(text: str):
        value = kind(text)
        if kind is float and not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


_positive_int = _at_least(int, 1)
_non_negative_float = _at_least(float, 0)
_non_negative_int = _at_least(int, 0)


def _probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _shapes_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="runs/quickstart/stage2-unified",
                   help="model directory (default: runs/quickstart/stage2-unified)")
    p.add_argument("--n-images", type=_positive_int, default=100, help="images for MMU questions (default: 100)")
    p.add_argument("--n-prompts", type=_positive_int, default=48, help="T2I prompts (default: 48)")
    p.add_argument("--guidance", type=_non_negative_float, default=3.0, help="CFG scale (default: 3.0)")
    p.add_argument("--top-k", type=_non_negative_int, default=20, help="image-code top-k, 0 = all (default: 20)")
    p.add_argument("--temperature", type=_non_negative_float, default=1.0,
                   help="image-code sampling temperature (default: 1.0)")
    p.add_argument("--seed", type=int, default=0, help="Shapes world seed (default: 0)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
    p.add_argument("--out", default="runs/evaluation", help="output directory (default: runs/evaluation)")


def build_parser() -> argparse.ArgumentParser:
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
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, help="longest answer (default: 64)")
    _sampling_args(p, temperature=0.0)
    p.set_defaults(func=cmd_answer)

    p = sub.add_parser("chat", help="several questions about one image, one per line on standard input")
    p.add_argument("--image", required=True, help="image file (PNG, JPEG, ...)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=64, help="longest answer (default: 64)")
    _sampling_args(p, temperature=0.0)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("generate", help="generate images from a text prompt (PNGs and a grid)")
    p.add_argument("prompt", help="the text prompt, e.g. \"two red circles\"")
    p.add_argument("--n", type=_positive_int, default=4, help="number of images (default: 4)")
    p.add_argument("--guidance", type=_non_negative_float, default=None,
                   help="classifier-free guidance scale, 1 = off (default: 3.0; 1 for official weights)")
    p.add_argument("--batch-size", type=_positive_int, default=16, help="images per batch (default: 16)")
    p.add_argument("--out", default="generated", help="output directory (default: generated)")
    _sampling_args(p, temperature=None)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("evaluate", help="score a model on the Shapes test and held-out splits, with baselines")
    _shapes_eval_args(p)
    p.set_defaults(func=cmd_evaluate)

    bench = sub.add_parser("eval", help="evaluate on a standard benchmark read from its own files "
                                        "(pope, mme, vqa, mcq, fid) or on the Shapes world (shapes)")
    bench_sub = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")

    def bench_parser(name: str, help: str, generation: bool = False) -> argparse.ArgumentParser:
        p = bench_sub.add_parser(name, help=help)
        p.add_argument("--model", default="runs/quickstart/stage2-unified",
                       help="model directory (default: runs/quickstart/stage2-unified)")
        p.add_argument("--out", help=f"output folder (default: runs/eval/{name}); a rerun resumes from it")
        p.add_argument("--limit", type=_positive_int, help="only the first N questions (captions for fid)")
        p.add_argument("--batch-size", type=_positive_int, default=16, help="questions per batch (default: 16)")
        p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        if not generation:
            p.add_argument("--max-new-tokens", type=_positive_int, default=32, help="longest answer (default: 32)")
        p.set_defaults(func=cmd_eval)
        return p

    def suffix(p: argparse.ArgumentParser, default: str) -> None:
        p.add_argument("--suffix", default=None, help=f"text appended to each question (default: {default!r}; "
                                                       "'' for none)")

    p = bench_parser("pope", "POPE: question files (JSONL) + image folder")
    p.add_argument("--questions", nargs="+", required=True, help="coco_pope_{random,popular,adversarial}.json")
    p.add_argument("--images", required=True, help="folder of the images the questions name")
    suffix(p, "Answer the question using a single word or phrase.")
    p = bench_parser("mme", "MME: the release folder of per-task sub-folders")
    p.add_argument("--root", required=True, help="MME_Benchmark_release_version/")
    p.add_argument("--tasks", nargs="+", help="only these tasks (default: every task folder present)")
    suffix(p, "")
    p = bench_parser("vqa", "VQAv2 / TextVQA (questions + annotations JSON) or GQA (questions JSON)")
    p.add_argument("--questions", required=True, help="VQAv2 questions JSON or GQA questions JSON")
    p.add_argument("--annotations", help="VQAv2 annotations JSON (not for GQA)")
    p.add_argument("--images", required=True, help="image folder")
    p.add_argument("--image-pattern", help="image file name from its id (default: COCO_val2014_{image_id:012d}.jpg "
                                           "for VQAv2, {image_id}.jpg for GQA)")
    suffix(p, "Answer the question using a single word or phrase.")
    p = bench_parser("mcq", "multiple choice: MMBench TSV (base64 images) or SEED JSON + image folder")
    p.add_argument("--file", required=True, help="MMBench .tsv or SEED-Bench .json")
    p.add_argument("--images", help="image folder (SEED JSON)")
    p.add_argument("--suffix", default=None, help="instruction after the options (default: \"Answer with the "
                                                  "option's letter from the given choices directly.\"; '' for none)")
    p = bench_parser("fid", "FID (and CLIP score) of images generated from COCO captions", generation=True)
    p.add_argument("--captions", required=True, help="COCO captions JSON (one caption per image id) or a text file")
    p.add_argument("--reference", required=True, help="folder of reference images")
    p.add_argument("--inception-weights", required=True,
                   help="torch-fidelity's FID InceptionV3 weights (a local .pth; nothing is downloaded)")
    p.add_argument("--clip", help="a local transformers CLIP folder: also report the CLIP score")
    p.add_argument("--guidance", type=_non_negative_float, default=3.0, help="CFG scale (default: 3.0)")
    p.add_argument("--temperature", type=_non_negative_float, default=1.0, help="sampling temperature (default: 1)")
    p.add_argument("--top-k", type=_non_negative_int, default=0, help="image-code top-k, 0 = all (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="caption choice and sampling seed (default: 0)")
    p = bench_sub.add_parser("shapes", help="the Shapes scorer on the test and held-out splits (= evaluate)")
    _shapes_eval_args(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("train", help="train OmniMamba through named stages (see configs/)")
    p.add_argument("--config", help="YAML or TOML run config; every field has a default (the paper's)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field, e.g. --set stages.0.lr=1e-4 (repeatable)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint of run.out")
    p.add_argument("--stage", action="append", help="run only this stage (repeatable)")
    p.set_defaults(func=cmd_train)

    for verb, text in (("serve", "an OpenAI-style HTTP API with continuous batching (FastAPI + uvicorn)"),
                       ("demo", "the web demo in a browser: chat about an image, generate images (= serve)")):
        p = sub.add_parser(verb, help=text)
        p.add_argument("--model", default="runs/quickstart/stage2-unified", help="model directory (default: the quickstart's)")
        p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
        p.add_argument("--port", type=_positive_int, default=8000, help="port (default: 8000)")
        p.add_argument("--max-batch", type=_positive_int, default=32, help="answers decoded together (default: 32)")
        p.add_argument("--max-queue", type=_positive_int, default=256,
                       help="requests that may wait for a place; more get 429 (default: 256)")
        p.add_argument("--request-timeout", type=_non_negative_float, default=300.0,
                       help="seconds an answer may take, queueing included; then it is cancelled (default: 300)")
        p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
        p.add_argument("--dtype", choices=("float32", "bfloat16"),
                       help="cast the weights (default: as loaded, float32); bfloat16 halves a GPU's memory traffic")
        p.add_argument("--eager", action="store_true",
                       help="decode without CUDA graphs (slower on a GPU; for debugging)")
        p.set_defaults(func=cmd_serve)

    p = sub.add_parser("ablate", help="the paper's ablations on Shapes: each variant trained and scored over seeds")
    p.add_argument("--config", required=True, help="the base run config (Shapes data, stage 1 and stage 2)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a field of the base config")
    p.add_argument("--variants", nargs="+", help="unified-nolora decoupled-nolora unified-lora full joint ratio-A:B "
                   "(default: the four of Table 4, joint, ratio-1:3, ratio-3:1)")
    p.add_argument("--seeds", type=_positive_int, default=3, help="training seeds per variant (default: 3)")
    p.add_argument("--seed", type=int, default=0, help="the first seed (default: 0)")
    p.add_argument("--n-images", type=_positive_int, default=50, help="test images whose questions score MMU (default: 50)")
    p.add_argument("--n-prompts", type=_positive_int, default=48, help="T2I prompts per split (default: 48)")
    p.add_argument("--out", default="runs/ablation", help="output folder; a rerun reuses finished runs (default: runs/ablation)")
    p.add_argument("--jobs", type=_positive_int, default=1,
                   help="runs trained at once, each in its own process, spread over the visible GPUs, for runs too "
                        "small to fill a GPU (default: 1, one after another in this process)")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: write the report from the runs that have finished (the others are named)")
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("guidance", help="T2I score against the guidance scale, over sampling seeds (Shapes)")
    p.add_argument("--scales", type=_non_negative_float, nargs="+", default=[1.0, 1.5, 2.0, 3.0, 5.0],
                   help="guidance scales to try, 1 = none (default: 1 1.5 2 3 5)")
    p.add_argument("--seeds", type=_positive_int, default=3, help="sampling seeds per scale, from --seed on (default: 3)")
    p.add_argument("--split", choices=("val", "test", "heldout"), default="val")
    p.add_argument("--n-prompts", type=_positive_int, default=48, help="T2I prompts (default: 48)")
    p.add_argument("--world-seed", type=int, default=0, help="Shapes world seed (default: 0)")
    p.add_argument("--out", help="also write the table as JSON here")
    _sampling_args(p, temperature=1.0)
    p.set_defaults(func=cmd_guidance)

    p = sub.add_parser("plot", help="training curves of a run (losses per task, validation scores) as a PNG")
    p.add_argument("run", help="the run's directory (run.out), holding metrics.jsonl")
    p.add_argument("--out", help="PNG to write (default: RUN/curves.png)")
    p.add_argument("--smoothing", type=_positive_int, default=5,
                   help="moving average over this many logged points (default: 5)")
    p.set_defaults(func=cmd_plot)

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
    p.add_argument("--n", type=_positive_int, default=1000, help="number of images (default: 1000)")
    p.add_argument("--split", choices=("train", "val", "test", "heldout"), default="train")
    p.add_argument("--seed", type=int, default=0, help="world seed (default: 0)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels (default: 64)")
    p.add_argument("--format", choices=("llava", "coco", "pope", "mme", "vqa", "mcq"), default="llava",
                   help="llava/coco: PNGs + LLaVA conversations + COCO captions (training data, FID references); "
                        "pope, mme, vqa, mcq: those benchmarks' own file layouts (default: llava)")
    p.set_defaults(func=cmd_data_shapes)
    p = data.add_parser("baselines", help="print the chance baselines of the Shapes scorer")
    p.add_argument("--n", type=_positive_int, default=200, help="images / prompts (default: 200)")
    p.add_argument("--split", choices=("val", "test", "heldout"), default="test")
    p.add_argument("--seed", type=int, default=0, help="world seed (default: 0)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels (default: 64)")
    p.set_defaults(func=cmd_data_baselines)

    p = sub.add_parser("presets", help="list the Mamba-2 presets and their parameter counts")
    p.set_defaults(func=cmd_presets)

    from .cli_convert import add_parser as add_convert

    add_convert(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = argv
    try:
        return args.func(args)
    except UserError as e:
        print(f"omnimamba {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
