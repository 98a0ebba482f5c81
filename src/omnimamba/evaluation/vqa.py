"""Open-ended VQA: VQAv2 / TextVQA-style question + annotation files, and GQA's question files.

VQAv2: questions {"questions": [{"question_id", "image_id", "question"}]} and annotations
{"annotations": [{"question_id", "answers": [{"answer"}, ...] (10), "answer_type", ...}]}; images named by a
pattern over image_id (COCO's `COCO_val2014_{image_id:012d}.jpg` by default). Accuracy is the official
VQAEval's: the prediction goes through its punctuation and digit/article normalisation, then for each of the
10 human answers min(1, matches among the other 9 / 3), averaged.
GQA: {qid: {"imageId", "question", "answer", ...}}, images `{image_id}.jpg` by default; exact match after the same
normalisation of both sides.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from ..errors import UserError
from .predict import Item

# VQAEval's tables (GT-Vision-Lab/VQA, PythonEvaluationTools/vqaEvaluation/vqaEval.py).
_PUNCT = (";", ":", "/", "'", "[", "]", '"', "(", ")", "=", "+", "\\", "_", ">", "<", "@", "`", ",", "?")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: the official pattern
_COMMA = re.compile(r"(\d)(,)(\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = ("a", "an", "the")
# Words written without their apostrophe, as the punctuation step leaves them, back to the contraction.
# VQAEval writes most of them with a typographic apostrophe (U+2019), a few with a plain one; kept as it is.
_PLAIN = {"aint", "arent", "cant", "couldve", "couldnt", "weve", "wheres", "whove"}
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itll": "it'll", "maam": "ma'am",
    "mightnt": "mightn't", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't",
    "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't", "shant": "shan't", "shouldve": "should've",
    "shouldnt": "shouldn't", "somebodyd": "somebody'd", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't",
    "wouldve": "would've", "wouldnt": "wouldn't", "yall": "y'all", "youd": "you'd", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
_CONTRACTIONS = {k: v if k in _PLAIN else v.replace("'", "\u2019") for k, v in _CONTRACTIONS.items()}


def process_punctuation(text: str) -> str:
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD.sub("", out)


def process_digit_article(text: str) -> str:
    words = [_NUMBERS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def normalize_answer(text: str) -> str:
    """VQAEval's treatment of a predicted answer."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """VQAv2's accuracy of one prediction against its (usually 10) human answers."""
    pred = normalize_answer(prediction)
    if len(set(answers)) > 1:  # as VQAEval: human answers are only punctuation-normalised, and only then
        answers = [process_punctuation(a) for a in answers]
    accs = []
    for i in range(len(answers)):
        others = answers[:i] + answers[i + 1:]
        accs.append(min(1.0, sum(a == pred for a in others) / 3))
    return sum(accs) / len(accs) if accs else 0.0


def _load_json(path: str | Path, what: str):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not JSON ({e})") from None


IMAGE_PATTERNS = {"vqav2": "COCO_val2014_{image_id:012d}.jpg", "gqa": "{image_id}.jpg"}


def _image(root: Path, pattern: str, image_id, questions) -> Path:
    try:
        return root / pattern.format(image_id=image_id)
    except (KeyError, IndexError, ValueError) as e:
        raise UserError(f"image pattern {pattern!r} does not format image id {image_id!r} from {questions} ({e}); "
                        "use {{image_id}} in it") from None


def read_vqa(questions: str | Path, annotations: str | Path | None, image_root: str | Path,
             image_pattern: str | None = None, suffix: str = "") -> tuple[list[Item], str]:
    """Items and the style ('vqav2' or 'gqa'), told apart by the question file's shape. `image_pattern` names
    an image file from its id (default: COCO's for VQAv2, "{image_id}.jpg" for GQA)."""
    q = _load_json(questions, "question file")
    root = Path(image_root)

    def prompt(text: str) -> str:
        return f"{text} {suffix}".strip() if suffix else text

    if isinstance(q, dict) and "questions" not in q:  # GQA: {qid: {...}}
        items = []
        for qid, rec in q.items():
            try:
                image = _image(root, image_pattern or IMAGE_PATTERNS["gqa"], rec["imageId"], questions)
                items.append(Item(f"gqa/{qid}", image, prompt(rec["question"]), {"answer": rec["answer"]}))
            except (KeyError, TypeError):
                raise UserError(f"{questions}: question {qid!r} lacks imageId, question or answer") from None
        return items, "gqa"
    if not isinstance(q, dict) or not isinstance(q.get("questions"), list):
        raise UserError(f"{questions}: expected VQAv2's {{'questions': [...]}} or GQA's {{qid: {{...}}}}")
    if annotations is None:
        raise UserError("VQAv2-style questions need --annotations (the answers)")
    a = _load_json(annotations, "annotation file")
    try:
        answers = {ann["question_id"]: ann for ann in a["annotations"]}
    except (KeyError, TypeError):
        raise UserError(f"{annotations}: expected {{'annotations': [{{'question_id', 'answers'}}, ...]}}") from None
    items = []
    for rec in q["questions"]:
        try:
            qid, image_id = rec["question_id"], rec["image_id"]
            ann = answers[qid]
            gold = [x["answer"] for x in ann["answers"]]
        except KeyError as e:
            raise UserError(f"{questions}: question {rec.get('question_id')!r}: missing {e} (or no annotation)") from None
        items.append(Item(f"vqa/{qid}", _image(root, image_pattern or IMAGE_PATTERNS["vqav2"], image_id, questions),
                          prompt(rec["question"]),
                          {"answers": gold, "answer_type": ann.get("answer_type", "other")}))
    return items, "vqav2"


def score_vqa(items: list[Item], predictions: dict[str, str], style: str) -> dict:
    per_type: dict[str, list[float]] = {}
    for it in items:
        pred = predictions[it.id]
        if style == "gqa":
            acc = float(normalize_answer(pred) == normalize_answer(it.meta["answer"]))
            key = "all"
        else:
            acc = vqa_accuracy(pred, it.meta["answers"])
            key = it.meta["answer_type"]
        per_type.setdefault(key, []).append(acc)
    everything = [x for v in per_type.values() for x in v]
    return {"accuracy": 100 * sum(everything) / len(everything) if everything else 0.0,
            "per_answer_type": {k: 100 * sum(v) / len(v) for k, v in per_type.items()}, "n": len(everything),
            "style": style}
