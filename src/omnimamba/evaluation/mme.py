"""MME (Fu et al., 2023): 14 tasks of yes/no question pairs, two questions per image (one true, one false).

The release folder holds one sub-folder per task, in one of two layouts: `TASK/images/NAME.png` with
`TASK/questions_answers_YN/NAME.txt`, or `TASK/NAME.png` beside `TASK/NAME.txt`; each text file has one
"question<TAB>answer" line per question. Scoring follows MME's eval_tool/calculation.py: a prediction is read as
"yes"/"no" if it is exactly that, else by the word in its first four characters, else "other" (wrong);
acc = correct questions / questions, acc+ = images with both questions right / images, a task's score is
100 * (acc + acc+), Perception and Cognition are sums over their tasks.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .predict import Item

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def _pairs(task_dir: Path):
    """(image path, question file) for each image of a task folder, in either layout."""
    qa_dir = task_dir / "questions_answers_YN"
    if qa_dir.is_dir():
        for txt in sorted(qa_dir.glob("*.txt")):
            image = next((task_dir / "images" / (txt.stem + s) for s in IMAGE_SUFFIXES
                          if (task_dir / "images" / (txt.stem + s)).is_file()), None)
            if image is None:
                raise UserError(f"{txt}: no image {txt.stem}.png/.jpg in {task_dir / 'images'}")
            yield image, txt
    else:
        for txt in sorted(task_dir.glob("*.txt")):
            image = next((task_dir / (txt.stem + s) for s in IMAGE_SUFFIXES if (task_dir / (txt.stem + s)).is_file()),
                         None)
            if image is None:
                raise UserError(f"{txt}: no image {txt.stem}.png/.jpg beside it")
            yield image, txt


def read_mme(root: str | Path, tasks: tuple[str, ...] | None = None, suffix: str = "") -> list[Item]:
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"MME folder not found: {root}")
    present = [t for t in PERCEPTION + COGNITION if (root / t).is_dir()]
    if tasks:
        missing = [t for t in tasks if t not in present]
        if missing:
            raise UserError(f"{root}: no task folder(s) {missing}; found {present}")
        present = list(tasks)
    if not present:
        raise UserError(f"{root}: no MME task folder (expected some of {list(PERCEPTION + COGNITION)})")
    items = []
    for task in present:
        for image, txt in _pairs(root / task):
            for k, line in enumerate(ln for ln in txt.read_text().splitlines() if ln.strip()):
                parts = line.split("\t")
                if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
                    raise UserError(f"{txt}: line {k + 1} is not 'question<TAB>Yes|No': {line!r}")
                question = parts[0].strip()
                prompt = f"{question} {suffix}".strip() if suffix else question
                items.append(Item(f"{task}/{txt.stem}/{k}", image, prompt,
                                  {"task": task, "image_name": txt.stem, "answer": parts[1].strip().lower()}))
    return items


def parse_answer(text: str) -> str:
    """MME's parse_pred_ans on the lower-cased prediction: 'yes', 'no' or 'other'."""
    text = text.lower()
    if text in ("yes", "no"):
        return text
    head = text[:4]
    return "yes" if "yes" in head else "no" if "no" in head else "other"


def score_mme(items: list[Item], predictions: dict[str, str]) -> dict:
    tasks: dict[str, dict[str, list[bool]]] = {}
    for it in items:
        right = parse_answer(predictions[it.id]) == it.meta["answer"]
        tasks.setdefault(it.meta["task"], {}).setdefault(it.meta["image_name"], []).append(right)
    result: dict = {"tasks": {}}
    for task, images in tasks.items():
        answers = [r for rs in images.values() for r in rs]
        acc = sum(answers) / len(answers)
        acc_plus = sum(all(rs) for rs in images.values()) / len(images)
        result["tasks"][task] = {"acc": 100 * acc, "acc_plus": 100 * acc_plus, "score": 100 * (acc + acc_plus),
                                 "questions": len(answers), "images": len(images)}
    for name, group in (("perception", PERCEPTION), ("cognition", COGNITION)):
        scored = [t for t in group if t in result["tasks"]]
        result[name] = sum(result["tasks"][t]["score"] for t in scored)
        result[f"{name}_tasks"] = scored
    return result
