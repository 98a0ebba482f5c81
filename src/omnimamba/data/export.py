"""The Shapes world written in the standard benchmarks' own file formats, so `omnimamba eval` runs on data
whose answers are known exactly: POPE question files, MME task folders, VQAv2 (and GQA) question/annotation
JSON, an MMBench TSV. Questions are built from each scene's objects; phrasings follow each benchmark's.
"""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import numpy as np

from .shapes import RELATION_PHRASE, ShapesWorld, article, number_word, plural, relation
from .vocabulary import COLORS, NUMBERS, SHAPES

FORMATS = ("pope", "mme", "vqa", "mcq")


def _save_png(image: np.ndarray, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path)


def _capitalised(text: str) -> str:
    return text[:1].upper() + text[1:]


def write_pope(world: ShapesWorld, split: str, n: int, out: Path) -> dict:
    """coco_pope_{random,popular,adversarial}.json (JSONL) + images/: per image and setting its positive
    question and the setting's negative, as POPE pairs them."""
    files = {s: [] for s in ("random", "popular", "adversarial")}
    qid = 0
    for i in range(n):
        s = world.sample(split, i)
        name = f"{s.key}.png"
        _save_png(s.image, out / "images" / name)
        positive = next(q for q in s.questions if q.type == "existence" and q.pope is None)
        for q in s.questions:
            if q.type == "existence" and q.pope in files:
                for rec in (positive, q):
                    qid += 1
                    files[q.pope].append({"question_id": qid, "image": name, "text": _capitalised(rec.question),
                                          "label": rec.answer})
    paths = {}
    for setting, recs in files.items():
        p = out / f"coco_pope_{setting}.json"
        p.write_text("".join(json.dumps(r) + "\n" for r in recs))
        paths[setting] = str(p)
    return {**paths, "images": str(out / "images")}


def _mme_pairs(objects, rng) -> dict[str, tuple[str, str] | None]:
    """task -> (question whose answer is yes, question whose answer is no), where the scene allows one."""
    present = {(o.color, o.shape) for o in objects}
    absent = [(c, sh) for c in COLORS for sh in SHAPES if (c, sh) not in present]
    pairs: dict[str, tuple[str, str] | None] = {}
    yes = sorted(present)[int(rng.integers(len(present)))]
    no = absent[int(rng.integers(len(absent)))]
    pairs["existence"] = (f"Is there {article(yes[0])} {yes[0]} {yes[1]} in this image?",
                          f"Is there {article(no[0])} {no[0]} {no[1]} in this image?")
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    count = sum(o.shape == shape for o in objects)
    wrong = count + 1 if count < 2 or rng.random() < 0.5 else count - 1

    def count_q(k: int) -> str:
        return f"Is there one {shape} in this image?" if k == 1 else \
            f"Are there {number_word(k)} {plural(shape)} in this image?"
    pairs["count"] = (count_q(count), count_q(wrong)) if count else None
    names = [o.name for o in objects]
    named = [o for o in objects if names.count(o.name) == 1]
    rel = [(a, b, relation(a, b)) for a in named for b in named if a is not b and relation(a, b)]
    if rel:
        a, b, r = rel[int(rng.integers(len(rel)))]
        opposite = {"left": "right", "right": "left", "above": "below", "below": "above"}[r]
        pairs["position"] = (f"Is the {a.name} {RELATION_PHRASE[r]} the {b.name}?",
                             f"Is the {a.name} {RELATION_PHRASE[opposite]} the {b.name}?")
    else:
        pairs["position"] = None
    shapes = [o.shape for o in objects]
    unique = [o for o in objects if shapes.count(o.shape) == 1]
    if unique:
        o = unique[int(rng.integers(len(unique)))]
        other = [c for c in COLORS if c != o.color][int(rng.integers(len(COLORS) - 1))]
        pairs["color"] = (f"Is the {o.shape} {o.color}?", f"Is the {o.shape} {other}?")
    else:
        pairs["color"] = None
    return pairs


def write_mme(world: ShapesWorld, split: str, n: int, out: Path, seed: int = 0) -> dict:
    """existence/, count/, position/, color/: NAME.png beside NAME.txt with a yes and a no question, each
    ending "Please answer yes or no." as MME's do."""
    counts = {}
    for i in range(n):
        s = world.sample(split, i)
        rng = np.random.default_rng([seed, 53, i])
        for task, pair in _mme_pairs(s.objects, rng).items():
            if pair is None:
                continue
            _save_png(s.image, out / task / f"{s.key}.png")
            lines = [f"{pair[0]} Please answer yes or no.\tYes", f"{pair[1]} Please answer yes or no.\tNo"]
            (out / task / f"{s.key}.txt").write_text("\n".join(lines) + "\n")
            counts[task] = counts.get(task, 0) + 1
    return {task: f"{out / task} ({k} images)" for task, k in counts.items()}


VQA_TYPES = ("counting", "color", "spatial", "existence")


def write_vqa(world: ShapesWorld, split: str, n: int, out: Path) -> dict:
    """VQAv2's question and annotation files (10 identical human answers, normalised as VQAv2 stores them)
    over images/shapes_{image_id:06d}.png, and the same questions as a GQA file."""
    questions, annotations, gqa = [], [], {}
    for i in range(n):
        s = world.sample(split, i)
        _save_png(s.image, out / "images" / f"shapes_{i:06d}.png")
        for q in s.questions:
            if q.type not in VQA_TYPES:
                continue
            qid = len(questions) + 1
            # VQAv2 stores answers normalised as its scorer normalises predictions: numbers as digits
            answer = str(NUMBERS.index(q.answer)) if q.answer in NUMBERS else q.answer
            questions.append({"question_id": qid, "image_id": i, "question": q.question})
            annotations.append({"question_id": qid, "image_id": i, "question_type": q.type,
                                "answer_type": "yes/no" if q.type == "existence" else
                                "number" if q.type == "counting" else "other",
                                "multiple_choice_answer": answer,
                                "answers": [{"answer": answer, "answer_confidence": "yes", "answer_id": k + 1}
                                            for k in range(10)]})
            gqa[str(qid)] = {"imageId": f"shapes_{i:06d}", "question": q.question, "answer": q.answer,
                             "types": {"semantic": q.type}}
    paths = {"questions": out / "questions.json", "annotations": out / "annotations.json", "gqa": out / "gqa.json"}
    paths["questions"].write_text(json.dumps({"questions": questions}) + "\n")
    paths["annotations"].write_text(json.dumps({"annotations": annotations}) + "\n")
    paths["gqa"].write_text(json.dumps(gqa) + "\n")
    return {k: str(v) for k, v in paths.items()} | {"images": str(out / "images"),
                                                     "image_pattern": "shapes_{image_id:06d}.png"}


def write_mcq(world: ShapesWorld, split: str, n: int, out: Path, seed: int = 0) -> dict:
    """mmbench.tsv: colour and counting questions with four options each, images as base64 PNG."""
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        s = world.sample(split, i)
        rng = np.random.default_rng([seed, 59, i])
        buf = io.BytesIO()
        Image.fromarray(s.image).save(buf, format="PNG")
        image = base64.b64encode(buf.getvalue()).decode()
        for q in s.questions:
            if q.type == "color":
                pool = [c for c in COLORS if c != q.answer]
            elif q.type == "counting":
                pool = [number_word(k) for k in range(6) if number_word(k) != q.answer]
            else:
                continue
            options = [q.answer] + [pool[k] for k in rng.permutation(len(pool))[:3]]
            options = [options[k] for k in rng.permutation(4)]
            rows.append({"index": len(rows), "question": q.question, "hint": "", "A": options[0], "B": options[1],
                         "C": options[2], "D": options[3], "answer": "ABCD"[options.index(q.answer)],
                         "category": q.type, "image": image})
    path = out / "mmbench.tsv"
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="\t")
        writer.writeheader()
        writer.writerows(rows)
    return {"mcq": str(path), "questions": str(len(rows))}


def export_shapes(world: ShapesWorld, fmt: str, split: str, n: int, out: str | Path) -> dict:
    writers = {"pope": write_pope, "mme": write_mme, "vqa": write_vqa, "mcq": write_mcq}
    return writers[fmt](world, split, n, Path(out))
