"""The evaluation verbs: `omnimamba evaluate` (the Shapes world) and `omnimamba eval BENCHMARK` (standard
benchmarks read from their own release files). Kept beside cli.py, which registers them."""

from __future__ import annotations

import argparse

from .cli_common import load_model, non_negative_float, non_negative_int, positive_int, shapes_eval_args


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .data.shapes import ShapesConfig, ShapesWorld
    from .quickstart import final_report, write_report

    model = load_model(args)
    world = ShapesWorld(ShapesConfig(image_size=model.config.understanding.image_size), seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = final_report(model, model.tokenizer, world, out, n_images=args.n_images, n_prompts=args.n_prompts,
                          guidance=args.guidance, top_k=args.top_k, temperature=args.temperature,
                          epsilon=args.epsilon)
    write_report(report, out / "results.json")
    print(f"wrote {out / 'results.json'} and {out / 'quickstart.png'}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .evaluation import benchmarks as b

    if args.benchmark == "shapes":
        return cmd_evaluate(args)
    model = load_model(args, need_tokenizer=True)
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


def add_parser(sub) -> None:
    p = sub.add_parser("evaluate", help="score a model on the Shapes test and held-out splits, with baselines")
    shapes_eval_args(p)
    p.set_defaults(func=cmd_evaluate)

    bench = sub.add_parser("eval", help="evaluate on a standard benchmark read from its own files "
                                        "(pope, mme, vqa, mcq, fid) or on the Shapes world (shapes)")
    bench_sub = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")

    def bench_parser(name: str, help: str, generation: bool = False) -> argparse.ArgumentParser:
        p = bench_sub.add_parser(name, help=help)
        p.add_argument("--model", default="runs/quickstart/stage2-unified",
                       help="model directory (default: runs/quickstart/stage2-unified)")
        p.add_argument("--out", help=f"output folder (default: runs/eval/{name}); a rerun resumes from it")
        p.add_argument("--limit", type=positive_int, help="only the first N questions (captions for fid)")
        p.add_argument("--batch-size", type=positive_int, default=16, help="questions per batch (default: 16)")
        p.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (default: auto)")
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        if not generation:
            p.add_argument("--max-new-tokens", type=positive_int, default=32, help="longest answer (default: 32)")
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
    p.add_argument("--guidance", type=non_negative_float, default=3.0, help="CFG scale (default: 3.0)")
    p.add_argument("--temperature", type=non_negative_float, default=1.0, help="sampling temperature (default: 1)")
    p.add_argument("--top-k", type=non_negative_int, default=0, help="image-code top-k, 0 = all (default: 0)")
    p.add_argument("--seed", type=int, default=0, help="caption choice and sampling seed (default: 0)")
    p = bench_sub.add_parser("shapes", help="the Shapes scorer on the test and held-out splits (= evaluate)")
    shapes_eval_args(p)
    p.set_defaults(func=cmd_eval)
