"""`omnimamba eval BENCHMARK`: read a benchmark in its own files, answer (or generate) with one shared loop,
score it as its reference script does, and write predictions.jsonl, summary.json and report.txt, the report
next to the paper's figure for the same benchmark."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError
from . import fid as fid_mod
from .mcq import read_mcq, score_mcq
from .mme import read_mme, score_mme
from .pope import read_pope, score_pope
from .predict import Item, predict
from .vqa import read_vqa, score_vqa

# OmniMamba-1.3B in the paper (Tables 1 and 2); MMBench and SEED are not reported there.
PAPER = {"pope": ("POPE", 86.3), "mme": ("MME-P", 1290.6), "vqav2": ("VQAv2 test", 77.7), "gqa": ("GQA", 60.8),
         "fid": ("FID-30K (MS-COCO)", 5.50)}
# LLaVA-1.5's evaluation prompts, which Cobra (and so OmniMamba's MMU side) follow.
SUFFIXES = {"pope": "Answer the question using a single word or phrase.", "mme": "",
            "vqa": "Answer the question using a single word or phrase."}


@dataclass
class EvalOptions:
    out: Path
    limit: int | None = None
    batch_size: int = 16
    max_new_tokens: int = 32
    progress: bool = True
    data: str = ""  # what was evaluated, for the report


def _limited(items: list[Item], limit: int | None) -> list[Item]:
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1, got {limit}")
    if not items:
        raise UserError("the benchmark files hold no questions")
    return items[:limit] if limit else items


def _answer(model, items: list[Item], opt: EvalOptions) -> dict[str, str]:
    return predict(model, model.tokenizer, items, opt.out / "predictions.jsonl", opt.batch_size,
                   opt.max_new_tokens, opt.progress)


def eval_pope(model, questions: list[str], images: str, opt: EvalOptions, suffix: str | None = None) -> dict:
    items = _limited(read_pope(questions, images, SUFFIXES["pope"] if suffix is None else suffix), opt.limit)
    result = score_pope(items, _answer(model, items, opt))
    rows = [(f"POPE {s}", f"acc {r['accuracy']:.1%}  P {r['precision']:.3f}  R {r['recall']:.3f}  "
             f"F1 {r['f1']:.3f}  yes {r['yes_ratio']:.2f}  (n={r['n']})") for s, r in result.items() if s != "mean"]
    rows.append(("POPE mean F1 (x100)", f"{100 * result['mean']['f1']:.1f}"))
    return _finish("pope", result, rows, 100 * result["mean"]["f1"], opt)


def eval_mme(model, root: str, opt: EvalOptions, tasks: tuple[str, ...] | None = None,
             suffix: str | None = None) -> dict:
    items = _limited(read_mme(root, tasks, SUFFIXES["mme"] if suffix is None else suffix), opt.limit)
    result = score_mme(items, _answer(model, items, opt))
    rows = [(f"MME {t}", f"acc {r['acc']:.1f}  acc+ {r['acc_plus']:.1f}  score {r['score']:.1f}  "
             f"({r['images']} images)") for t, r in result["tasks"].items()]
    rows += [("MME perception", f"{result['perception']:.1f} over {len(result['perception_tasks'])} task(s)"),
             ("MME cognition", f"{result['cognition']:.1f} over {len(result['cognition_tasks'])} task(s)")]
    return _finish("mme", result, rows, result["perception"], opt)


def eval_vqa(model, questions: str, annotations: str | None, images: str, opt: EvalOptions,
             image_pattern: str | None = None, suffix: str | None = None) -> dict:
    items, style = read_vqa(questions, annotations, images, image_pattern,
                            SUFFIXES["vqa"] if suffix is None else suffix)
    items = _limited(items, opt.limit)
    result = score_vqa(items, _answer(model, items, opt), style)
    rows = [(f"{style} {k}", f"{v:.1f}") for k, v in result["per_answer_type"].items()]
    rows.append((f"{style} accuracy", f"{result['accuracy']:.1f}  (n={result['n']})"))
    return _finish(style, result, rows, result["accuracy"], opt)


def eval_mcq(model, path: str, images: str | None, opt: EvalOptions, instruction: str | None = None) -> dict:
    from .mcq import INSTRUCTION

    items = _limited(read_mcq(path, images, INSTRUCTION if instruction is None else instruction), opt.limit)
    result = score_mcq(items, _answer(model, items, opt))
    rows = [(f"MCQ {k}", f"{v:.1f}") for k, v in result["per_category"].items()]
    rows.append(("MCQ accuracy", f"{result['accuracy']:.1f}  (n={result['n']}, unparsed {result['unparsed']})"))
    return _finish("mcq", result, rows, result["accuracy"], opt)


def eval_fid(model, captions: str, reference: str, weights: str, opt: EvalOptions, guidance: float = 3.0,
             temperature: float = 1.0, top_k: int = 0, seed: int = 0, clip: str | None = None) -> dict:
    weights = fid_mod.check_weights_file(weights)  # before an hour of generation, not after
    reference_files = fid_mod.image_files(reference)
    pairs = fid_mod.read_captions(captions, opt.limit, seed)
    device = next(model.parameters()).device
    generated = fid_mod.generate_for_captions(model, model.tokenizer, pairs, opt.out / "images", opt.batch_size,
                                              guidance, temperature, top_k, seed, opt.progress)
    with (opt.out / "predictions.jsonl").open("w") as f:
        for (image_id, caption), path in zip(pairs, generated):
            f.write(json.dumps({"id": image_id, "caption": caption, "image": str(path)}) + "\n")
    value = fid_mod.compute_fid(reference_files, generated, weights, device=device, progress=opt.progress)
    result = {"fid": value, "generated": len(generated), "reference": len(reference_files), "guidance": guidance,
              "temperature": temperature, "top_k": top_k, "seed": seed}
    rows = [("FID", f"{value:.2f}  ({len(generated)} generated vs {len(reference_files)} reference images)")]
    if clip:
        result["clip_score"] = fid_mod.compute_clip_score(generated, [c for _, c in pairs], clip, device=device)
        rows.append(("CLIP score", f"{result['clip_score']:.2f}"))
    return _finish("fid", result, rows, value, opt)


def _finish(name: str, result: dict, rows: list[tuple[str, str]], headline: float, opt: EvalOptions) -> dict:
    """Write summary.json and report.txt (with the paper's figure for this benchmark, where it has one)."""
    label, paper = PAPER.get(name, (name, None))
    summary = {"benchmark": name, "headline": headline, "paper": paper, "result": result}
    opt.out.mkdir(parents=True, exist_ok=True)
    (opt.out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    width = max(len(r[0]) for r in rows)
    lines = [f"{k:<{width}}  {v}" for k, v in rows]
    lines.append("")
    reference = (f"OmniMamba-1.3B in the paper, on the real benchmark: {paper}" if paper is not None
                 else "not reported in the paper")
    lines.append(f"{label}: this model {headline:.2f} on {opt.data or 'these files'}; {reference}")
    report = "\n".join(lines) + "\n"
    (opt.out / "report.txt").write_text(report)
    summary["report"] = report
    return summary
