"""Multiple-choice benchmarks: MMBench-style TSV (index, question, hint, A..D, answer, category, image as
base64) and SEED-Bench-style JSON ({"questions": [{"question_id", "question", "choice_a".., "answer",
"data_id"}]}, images in a folder).

The prompt lists the options as LLaVA's MMBench script does ("A. ..." per line, then the instruction). A free
answer is read as an option in this order: a letter at the start ("B", "(B)", "B." or "B. cat"), the only
capital option letter standing alone anywhere ("I think B"), the one option whose text the answer contains (or that contains the answer); an
answer none of these reads is wrong.
"""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import sys
from pathlib import Path

from ..errors import UserError
from .predict import Item

LETTERS = "ABCDEFGHI"
INSTRUCTION = "Answer with the option's letter from the given choices directly."


def build_prompt(question: str, options: dict[str, str], hint: str = "", instruction: str = INSTRUCTION) -> str:
    lines = ([hint] if hint else []) + [question] + [f"{k}. {v}" for k, v in options.items()]
    if instruction:
        lines.append(instruction)
    return "\n".join(lines)


def _decode_image(data: str, where: str):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(base64.b64decode(data, validate=False))) as im:
            return np.asarray(im.convert("RGB"))
    except (ValueError, UnidentifiedImageError, OSError):
        raise UserError(f"{where}: the image column is not a base64-encoded image") from None


def read_mmbench(path: Path, instruction: str) -> list[Item]:
    csv.field_size_limit(min(sys.maxsize, 2 ** 31 - 1))  # base64 images are long fields
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    if not rows:
        return []
    need = {"index", "question", "A", "B", "answer", "image"}
    missing = need - set(rows[0])
    if missing:
        raise UserError(f"{path}: missing column(s) {sorted(missing)} (MMBench TSV: index, question, hint, A..D, "
                        "answer, category, image)")
    items = []
    for n, row in enumerate(rows, 2):
        options = {k: row[k] for k in LETTERS if row.get(k) not in (None, "", "nan")}
        if row["answer"] not in options:
            raise UserError(f"{path}: line {n}: answer {row['answer']!r} is not one of the options {list(options)}")
        hint = row.get("hint") or ""
        hint = "" if hint == "nan" else hint
        items.append(Item(f"mmbench/{row['index']}", _decode_image(row["image"], f"{path}: line {n}"),
                          build_prompt(row["question"], options, hint, instruction),
                          {"options": options, "answer": row["answer"], "category": row.get("category", "")}))
    return items


def read_seed(path: Path, image_root: Path, instruction: str) -> list[Item]:
    data = json.loads(path.read_text())
    questions = data["questions"] if isinstance(data, dict) else data
    items = []
    for rec in questions:
        try:
            options = {L: rec[f"choice_{L.lower()}"] for L in LETTERS if f"choice_{L.lower()}" in rec}
            qid, answer = rec["question_id"], rec["answer"]
            image = image_root / rec["data_id"]
        except (KeyError, TypeError) as e:
            raise UserError(f"{path}: a question lacks {e} (SEED-Bench JSON: question_id, question, choice_a.., "
                            "answer, data_id)") from None
        if answer not in options:
            raise UserError(f"{path}: question {qid!r}: answer {answer!r} is not one of {list(options)}")
        items.append(Item(f"seed/{qid}", image, build_prompt(rec["question"], options, "", instruction),
                          {"options": options, "answer": answer,
                           "category": str(rec.get("question_type_id", ""))}))
    return items


def read_mcq(path: str | Path, image_root: str | Path | None = None, instruction: str = INSTRUCTION) -> list[Item]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"multiple-choice file not found: {path}")
    if path.suffix.lower() in (".tsv", ".csv"):
        return read_mmbench(path, instruction)
    if image_root is None:
        raise UserError("SEED-style JSON names its images by file: give --images")
    try:
        return read_seed(path, Path(image_root), instruction)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: neither an MMBench TSV nor a SEED JSON ({e})") from None


def _words(text: str) -> str:
    """Lower-cased words separated by single spaces, padded with one space each side (whole-word matching)."""
    return " " + " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split()) + " "


def parse_option(text: str, options: dict[str, str]) -> str | None:
    """The option letter a free answer names, or None. Letters are read in capitals only, so the article in
    "a red circle" is not taken for option A."""
    letters = "".join(options)
    t = text.strip()
    m = re.match(rf"^\(?([{letters}])\)?(?:[.:)]|$)", t)
    if m:
        return m.group(1)
    alone = set(re.findall(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])", t))
    if len(alone) == 1:
        return alone.pop()
    said = _words(t)
    if said.strip():
        named = [k for k, v in options.items() if _words(v) in said]  # the answer quotes one option
        if len(named) == 1:
            return named[0]
        within = [k for k, v in options.items() if said in _words(v)]  # the answer is part of one option
        if len(within) == 1:
            return within[0]
    return None


def score_mcq(items: list[Item], predictions: dict[str, str]) -> dict:
    per_cat: dict[str, list[bool]] = {}
    unparsed = 0
    for it in items:
        choice = parse_option(predictions[it.id], it.meta["options"])
        unparsed += choice is None
        per_cat.setdefault(it.meta["category"] or "all", []).append(choice == it.meta["answer"])
    everything = [x for v in per_cat.values() for x in v]
    return {"accuracy": 100 * sum(everything) / len(everything) if everything else 0.0,
            "per_category": {k: 100 * sum(v) / len(v) for k, v in per_cat.items()},
            "unparsed": unparsed, "n": len(everything)}
