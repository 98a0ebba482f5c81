"""Scoring on the Shapes world.

MMU: normalised exact match per question type, and POPE's accuracy / precision / recall / F1 / yes-ratio
for existence questions, per negative-sampling kind.
T2I: a generated image is parsed (colour segmentation into connected components, shape from how much of its
bounding box a component fills) and checked against its prompt: the right objects in the right numbers with
the right colours, and the stated relation. A GenEval-style score per category and overall.
"""

from __future__ import annotations

import re
from collections import Counter, deque
from dataclasses import dataclass

import numpy as np

from ..data.shapes import PALETTE, POPE_KINDS, QUESTION_TYPES, RELATION_PHRASE, ShapesWorld
from ..data.vocabulary import COLORS, NUMBERS, SHAPES

T2I_CATEGORIES = ("single_object", "two_object", "counting", "position")


# --- MMU ---------------------------------------------------------------------------------------------
def normalize_answer(text: str) -> str:
    text = re.sub(r"\s+", " ", text.strip().lower())
    text = re.sub(r"\s+([.,?!])", r"\1", text)
    return text.rstrip(".!? ")


def pope_metrics(golds: list[str], preds: list[str]) -> dict[str, float]:
    """'yes' is the positive class. Predictions other than yes/no count as 'no' (and as wrong)."""
    g = np.array([normalize_answer(x) == "yes" for x in golds])
    p = np.array([normalize_answer(x) == "yes" for x in preds])
    valid = np.array([normalize_answer(x) in ("yes", "no") for x in preds])
    tp = int((g & p).sum())
    fp = int((~g & p).sum())
    fn = int((g & ~p).sum())
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "accuracy": float(((g == p) & valid).mean()) if len(g) else 0.0,
        "precision": precision, "recall": recall, "f1": f1,
        "yes_ratio": float(p.mean()) if len(p) else 0.0, "n": int(len(g)),
    }


@dataclass
class MMURecord:
    type: str
    answer: str       # gold
    prediction: str
    pope: str | None = None


def score_mmu(records: list[MMURecord]) -> dict:
    per_type: dict[str, list[bool]] = {}
    for r in records:
        per_type.setdefault(r.type, []).append(normalize_answer(r.prediction) == normalize_answer(r.answer))
    result = {"accuracy": {t: float(np.mean(v)) for t, v in per_type.items()}}
    result["accuracy"]["overall"] = float(np.mean([x for v in per_type.values() for x in v])) if records else 0.0
    existence = [r for r in records if r.type == "existence"]
    positives = [r for r in existence if r.pope is None]
    result["pope"] = {}
    for kind in POPE_KINDS:
        subset = positives + [r for r in existence if r.pope == kind]
        if subset:
            result["pope"][kind] = pope_metrics([r.answer for r in subset], [r.prediction for r in subset])
    result["n"] = len(records)
    return result


# --- T2I: parsing images -------------------------------------------------------------------------------
@dataclass
class Detected:
    color: str
    shape: str
    cx: float
    cy: float
    area: int


_PALETTE = np.array([PALETTE[c] for c in COLORS], dtype=np.float32)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as arrays of (y, x)."""
    seen = np.zeros_like(mask, dtype=bool)
    h, w = mask.shape
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        seen[y0, x0] = True
        queue, pixels = deque([(y0, x0)]), []
        while queue:
            y, x = queue.popleft()
            pixels.append((y, x))
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    queue.append((ny, nx))
        out.append(np.array(pixels))
    return out


def classify_shape(pixels: np.ndarray) -> str:
    ys, xs = pixels[:, 0], pixels[:, 1]
    box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
    fill = len(pixels) / box
    if fill > 0.88:
        return "square"
    if fill > 0.64:
        return "circle"
    return "triangle"


def parse_image(image: np.ndarray, min_area: int | None = None) -> list[Detected]:
    """(H, W, 3) uint8 -> the flat-coloured objects found in it."""
    img = image.astype(np.float32)
    h = img.shape[0]
    min_area = min_area if min_area is not None else max(8, int(12 * (h / 64) ** 2))
    border = np.concatenate([img[0], img[-1], img[:, 0], img[:, -1]])
    background = np.median(border, axis=0)
    d_pal = np.linalg.norm(img[:, :, None, :] - _PALETTE[None, None], axis=-1)  # (H, W, colours)
    nearest = d_pal.argmin(-1)
    d_near = d_pal.min(-1)
    d_bg = np.linalg.norm(img - background, axis=-1)
    foreground = (d_near < 90) & (d_near < d_bg)
    found = []
    for ci, color in enumerate(COLORS):
        for pixels in _components(foreground & (nearest == ci)):
            if len(pixels) < min_area:
                continue
            # the bounding-box centre is the drawn centre for every shape (a triangle's mass is not)
            ys, xs = pixels[:, 0], pixels[:, 1]
            found.append(Detected(color, classify_shape(pixels), (xs.min() + xs.max() + 1) / 2,
                                  (ys.min() + ys.max() + 1) / 2, len(pixels)))
    return found


# --- T2I: parsing prompts ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Requirement:
    counts: tuple[tuple[str, str, int], ...]          # (colour, shape, count)
    relation: tuple[str, str, str] | None = None       # (name a, relation, name b)

    @property
    def category(self) -> str:
        if self.relation:
            return "position"
        if len(self.counts) == 1:
            return "single_object" if self.counts[0][2] == 1 else "counting"
        return "two_object"


_COLOR = "|".join(COLORS)
_SHAPE = "|".join(SHAPES)
_NUM = "|".join(NUMBERS)
_NP = re.compile(rf"^(?:(a|an)\s+({_COLOR})\s+({_SHAPE})|({_NUM})\s+({_COLOR})\s+({_SHAPE})s)$")
_REL = re.compile(rf"^an? ({_COLOR}) ({_SHAPE}) (left of|right of|above|below) an? ({_COLOR}) ({_SHAPE})$")


def parse_prompt(prompt: str) -> Requirement:
    text = normalize_answer(prompt)
    m = _REL.match(text)
    if m:
        rel = {v: k for k, v in RELATION_PHRASE.items()}[m.group(3)]
        a, b = (m.group(1), m.group(2)), (m.group(4), m.group(5))
        counts = Counter([a, b])
        return Requirement(tuple((c, s, n) for (c, s), n in sorted(counts.items())),
                           (f"{a[0]} {a[1]}", rel, f"{b[0]} {b[1]}"))
    text = re.sub(r"^(an image of|there is|there are)\s+", "", text)
    parts = [p.strip() for p in re.split(r",\s*|\s+and\s+", text) if p.strip()]
    counts: Counter = Counter()
    for p in parts:
        m = _NP.match(p)
        if not m:
            raise ValueError(f"cannot read the Shapes prompt {prompt!r} (at {p!r})")
        if m.group(2):
            counts[(m.group(2), m.group(3))] += 1
        else:
            counts[(m.group(5), m.group(6))] += NUMBERS.index(m.group(4))
    return Requirement(tuple((c, s, n) for (c, s), n in sorted(counts.items())))


# Why a generated image fails its prompt, the first that applies (t2i_failure).
FAILURES = ("nothing drawn", "too few objects", "too many objects", "wrong colour", "wrong shape", "wrong relation")


def check_image(image: np.ndarray, requirement: Requirement) -> bool:
    return t2i_failure(image, requirement) is None


def t2i_failure(image: np.ndarray, requirement: Requirement) -> str | None:
    """None if the image meets its prompt, else why not (one of FAILURES): the scorer finds no object, fewer or
    more objects than asked, as many but of other colours (as multisets), the right colours on other shapes, or
    the right objects in the wrong layout."""
    found = parse_image(image)
    got = Counter((d.color, d.shape) for d in found)
    want = Counter({(c, s): n for c, s, n in requirement.counts})
    if got != want:
        n_got, n_want = sum(got.values()), sum(want.values())
        if n_got == 0:
            return "nothing drawn"
        if n_got != n_want:
            return "too few objects" if n_got < n_want else "too many objects"
        return "wrong colour" if _per_colour(got) != _per_colour(want) else "wrong shape"
    if requirement.relation:
        a_name, rel, b_name = requirement.relation
        a = next(d for d in found if f"{d.color} {d.shape}" == a_name)
        b = next(d for d in found if f"{d.color} {d.shape}" == b_name)
        if not relation_holds(a.cx - b.cx, a.cy - b.cy, rel):
            return "wrong relation"
    return None


def format_failures(failures: dict[str, int]) -> str:
    """'too many objects 5, wrong shape 2' (score_t2i's 'failures'), or 'none'."""
    return ", ".join(f"{why} {n}" for why, n in failures.items()) or "none"


def _per_colour(counts: Counter) -> Counter:
    """{(colour, shape): n} -> {colour: n}"""
    out: Counter = Counter()
    for (colour, _), n in counts.items():
        out[colour] += n
    return out


def relation_holds(dx: float, dy: float, rel: str) -> bool:
    """GenEval-like check of a generated layout: the stated axis dominates and points the right way.
    (Prompts are only written for clear layouts, see `omnimamba.data.shapes.relation`.)"""
    horizontal = abs(dx) >= abs(dy)
    return {"left": horizontal and dx < 0, "right": horizontal and dx > 0,
            "above": not horizontal and dy < 0, "below": not horizontal and dy > 0}[rel]


def score_t2i(images: list[np.ndarray], prompts: list[str]) -> dict:
    """GenEval-style: accuracy per category, their mean ('overall'), the plain mean over prompts, and how many
    images failed for each reason ('failures', see t2i_failure)."""
    per_cat: dict[str, list[bool]] = {}
    failures: Counter = Counter()
    for image, prompt in zip(images, prompts, strict=True):
        req = parse_prompt(prompt)
        why = t2i_failure(image, req)
        per_cat.setdefault(req.category, []).append(why is None)
        if why is not None:
            failures[why] += 1
    result: dict = {cat: float(np.mean(v)) for cat, v in per_cat.items()}
    result["overall"] = float(np.mean(list(result.values()))) if per_cat else 0.0
    result["per_prompt"] = float(np.mean([x for v in per_cat.values() for x in v])) if per_cat else 0.0
    result["n"] = len(prompts)
    result["failures"] = {why: failures[why] for why in FAILURES if failures[why]}
    return result


def colours_kept(originals: list, images: list[np.ndarray]) -> dict[str, float]:
    """Per colour, the share of drawn objects (`Shape`s of `originals`, one list per image) that the scorer
    finds again in `images` with their colour, near their centre (within their radius): how faithfully a
    tokenizer's round trip keeps each colour. A colour that comes back as another one scores 0 there."""
    kept: dict[str, list[bool]] = {c: [] for c in COLORS}
    for objects, image in zip(originals, images, strict=True):
        found = parse_image(image)
        for o in objects:
            kept[o.color].append(any(d.color == o.color and np.hypot(d.cx - o.cx, d.cy - o.cy) <= max(o.radius, 2.0)
                                     for d in found))
    return {c: float(np.mean(v)) for c, v in kept.items() if v}


# --- evaluation sets and chance baselines ------------------------------------------------------------------
def t2i_eval_set(world: ShapesWorld, split: str, n: int) -> list[tuple[str, int]]:
    """n (prompt, sample index) pairs of `split`, balanced over the four categories, deterministic."""
    per_cat = {c: [] for c in T2I_CATEGORIES}
    want = {c: n // 4 + (1 if i < n % 4 else 0) for i, c in enumerate(T2I_CATEGORIES)}
    index = 0
    while any(len(per_cat[c]) < want[c] for c in T2I_CATEGORIES):
        sample = world.sample(split, index)
        for caption in sample.captions:
            cat = parse_prompt(caption).category
            if len(per_cat[cat]) < want[cat] and (caption, index) not in per_cat[cat]:
                per_cat[cat].append((caption, index))
                break
        index += 1
        if index > 200 * n + 1000:
            raise RuntimeError("could not fill the T2I evaluation categories")
    return [pair for c in T2I_CATEGORIES for pair in per_cat[c]]


def mmu_eval_set(world: ShapesWorld, split: str, n_images: int) -> list[tuple[int, object]]:
    """Every question of the first n_images of `split`: [(sample index, Question)]."""
    return [(i, q) for i in range(n_images) for q in world.sample(split, i).questions]


def chance_baselines(world: ShapesWorld, split: str = "test", n: int = 200, seed: int = 0) -> dict:
    """Figures to read every later result against: 'always yes' (POPE), the most frequent training
    answer per question type, and T2I scores of a random ground-truth image of the split."""
    train_answers: dict[str, Counter] = {}
    for i in range(max(n, 200)):
        for q in world.sample("train", i).questions:
            train_answers.setdefault(q.type, Counter())[q.answer] += 1
    items = mmu_eval_set(world, split, n)
    always_yes = [MMURecord(q.type, q.answer, "yes", q.pope) for _, q in items]
    frequent = [MMURecord(q.type, q.answer, train_answers[q.type].most_common(1)[0][0], q.pope) for _, q in items]
    prompts = t2i_eval_set(world, split, n)
    rng = np.random.default_rng(seed)
    random_images = [world.sample(split, int(rng.integers(10 * n))).image for _ in prompts]
    return {
        "mmu_always_yes": score_mmu(always_yes),
        "mmu_most_frequent_answer": score_mmu(frequent),
        "t2i_random_image": score_t2i(random_images, [p for p, _ in prompts]),
        "t2i_ground_truth": score_t2i([world.sample(split, i).image for _, i in prompts], [p for p, _ in prompts]),
    }


def format_baselines(b: dict) -> str:
    lines = ["chance baselines (every later figure should be read against these):"]
    lines.append(f"  MMU, most frequent training answer per type: overall "
                 f"{b['mmu_most_frequent_answer']['accuracy']['overall']:.1%}")
    for t in QUESTION_TYPES:
        if t in b["mmu_most_frequent_answer"]["accuracy"]:
            lines.append(f"    {t:<14} {b['mmu_most_frequent_answer']['accuracy'][t]:.1%}")
    for kind, m in b["mmu_always_yes"]["pope"].items():
        lines.append(f"  POPE {kind:<12} always 'yes': acc {m['accuracy']:.1%}  F1 {m['f1']:.3f}  "
                     f"yes-ratio {m['yes_ratio']:.2f}")
    lines.append(f"  T2I, a random image of the split: overall {b['t2i_random_image']['overall']:.1%}")
    lines.append(f"  T2I, the ground-truth image (scorer check): overall {b['t2i_ground_truth']['overall']:.1%}")
    return "\n".join(lines)
