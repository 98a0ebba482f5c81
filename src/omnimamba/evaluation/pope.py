"""POPE (Li et al., 2023): object-hallucination yes/no questions in three negative-sampling settings.

Files: one JSONL per setting (coco_pope_random.json, coco_pope_popular.json, coco_pope_adversarial.json), a
record per line: {"question_id", "image", "text", "label": "yes"|"no"}; images in one folder. Answers are read
as POPE's own evaluate.py reads them: the first sentence, commas dropped, "no" if it has the word "no", "No" or
"not", otherwise "yes"; "yes" is the positive class.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import UserError
from .predict import Item

SETTINGS = ("random", "popular", "adversarial")


def setting_of(path: Path) -> str:
    """'random' for coco_pope_random.json, else the file's stem."""
    stem = path.stem
    return next((s for s in SETTINGS if stem.endswith(s)), stem)


def read_pope(question_files: list[str | Path], image_root: str | Path, suffix: str = "") -> list[Item]:
    items = []
    for qf in question_files:
        qf = Path(qf)
        if not qf.is_file():
            raise UserError(f"POPE question file not found: {qf}")
        setting = setting_of(qf)
        for n, line in enumerate(qf.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                qid, image, text, label = rec["question_id"], rec["image"], rec["text"], rec["label"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise UserError(f"{qf}:{n}: not a POPE record ({e}); expected question_id, image, text, label") from None
            if str(label).lower() not in ("yes", "no"):
                raise UserError(f"{qf}:{n}: label must be yes or no, got {label!r}")
            prompt = f"{text} {suffix}".strip() if suffix else text
            items.append(Item(f"{setting}/{qid}", Path(image_root) / image, prompt,
                              {"setting": setting, "label": str(label).lower()}))
    return items


def parse_answer(text: str) -> str:
    """POPE's evaluate.py: 'yes' or 'no'."""
    if "." in text:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(labels: list[str], answers: list[str]) -> dict:
    """Accuracy, precision, recall, F1 and yes-ratio with 'yes' as the positive class (POPE's definitions)."""
    pred = [parse_answer(a) == "yes" for a in answers]
    gold = [x == "yes" for x in labels]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    tn = sum(not p and not g for p, g in zip(pred, gold))
    fn = sum(not p and g for p, g in zip(pred, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(gold)
    return {"accuracy": (tp + tn) / n if n else 0.0, "precision": precision, "recall": recall, "f1": f1,
            "yes_ratio": sum(pred) / n if n else 0.0, "n": n}


def score_pope(items: list[Item], predictions: dict[str, str]) -> dict:
    """Metrics per setting and their mean F1 and accuracy (what papers report as 'POPE')."""
    by_setting: dict[str, tuple[list, list]] = {}
    for it in items:
        labels, answers = by_setting.setdefault(it.meta["setting"], ([], []))
        labels.append(it.meta["label"])
        answers.append(predictions[it.id])
    result = {s: pope_metrics(*v) for s, v in by_setting.items()}
    result["mean"] = {k: sum(r[k] for r in result.values()) / len(result) for k in ("accuracy", "f1")}
    return result
