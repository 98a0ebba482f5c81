"""The embedded "Shapes" world: procedural images of flat shapes with captions and questions whose answers
are known exactly. Deterministic: a sample depends only on (seed, split, index), never on a file.

Splits: train / val / test never share an image (each split draws from its own random stream), and none
of them contains a held-out (colour, shape) combination; the `heldout` split puts at least one such
combination in every image (compositional generalisation).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from .vocabulary import COLORS, NUMBERS, SHAPES

PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 200, 30),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
BACKGROUND = (232, 232, 232)
SPLITS = ("train", "val", "test", "heldout")
# (colour, shape) pairs never seen in training; each colour and each shape still appears in training.
HELDOUT_PAIRS = frozenset({("red", "triangle"), ("blue", "circle"), ("yellow", "square")})
QUESTION_TYPES = ("existence", "counting", "false_premise", "color", "spatial", "description")
POPE_KINDS = ("random", "popular", "adversarial")


@dataclass(frozen=True)
class ShapesConfig:
    image_size: int = 64
    min_objects: int = 1
    max_objects: int = 4
    textured_background: float = 0.3  # probability of a lightly textured background

    def __post_init__(self) -> None:
        if self.image_size < 32:
            raise ValueError(f"ShapesConfig.image_size must be >= 32, got {self.image_size}")
        if not 1 <= self.min_objects <= self.max_objects <= 5:
            raise ValueError(f"ShapesConfig needs 1 <= min_objects <= max_objects <= 5, got "
                             f"{self.min_objects}, {self.max_objects}")


@dataclass(frozen=True)
class Shape:
    shape: str
    color: str
    size: str      # "small" | "large"
    cx: float      # centre, in pixels
    cy: float
    radius: float  # half the extent, in pixels

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Question:
    type: str
    question: str
    answer: str
    pope: str | None = None  # for existence questions: "random" | "popular" | "adversarial" | None (positive)


@dataclass
class ShapesSample:
    split: str
    index: int
    objects: list[Shape]
    textured: bool
    texture_seed: int
    image: np.ndarray            # (H, W, 3) uint8
    captions: list[str]
    questions: list[Question] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"{self.split}-{self.index:06d}"


# --- scenes ------------------------------------------------------------------------------------------
def _rng(seed: int, split: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, SPLITS.index(split), index])


def _seen_pairs() -> list[tuple[str, str]]:
    """The (colour, shape) pairs of the training distribution: all but the held-out ones."""
    return [(c, s) for c in COLORS for s in SHAPES if (c, s) not in HELDOUT_PAIRS]


def _pair_weights(pairs: list[tuple[str, str]]) -> np.ndarray:
    # Zipf-like frequencies over a fixed shuffle of the pairs, so some objects are "popular" (POPE).
    order = np.random.default_rng(1234).permutation(len(pairs))
    w = 1.0 / (1.0 + order) ** 0.7
    return w / w.sum()


def sample_scene(cfg: ShapesConfig, rng: np.random.Generator, split: str) -> list[Shape]:
    n = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
    seen_pairs = _seen_pairs()
    weights = _pair_weights(seen_pairs)
    kinds = []
    if split == "heldout":
        kinds.append(sorted(HELDOUT_PAIRS)[int(rng.integers(len(HELDOUT_PAIRS)))])
    # Repeats of one kind make counting questions interesting.
    while len(kinds) < n:
        if kinds and rng.random() < 0.35:
            kinds.append(kinds[int(rng.integers(len(kinds)))])
        else:
            kinds.append(seen_pairs[int(rng.choice(len(seen_pairs), p=weights))])
    rng.shuffle(kinds)
    s = cfg.image_size / 64
    objects: list[Shape] = []
    for color, shape in kinds:
        for _ in range(200):
            size = "large" if rng.random() < 0.5 else "small"
            r = (9.0 if size == "large" else 6.0) * s
            cx, cy = rng.uniform(r + 2, cfg.image_size - r - 2, size=2)
            # a gap of 3 px between shapes keeps them separate components for the scorer
            if all(max(abs(cx - o.cx), abs(cy - o.cy)) > r + o.radius + 3 * s for o in objects):
                objects.append(Shape(shape, color, size, float(cx), float(cy), float(r)))
                break
    return objects


def render(objects: list[Shape], cfg: ShapesConfig, textured: bool = False, texture_seed: int = 0) -> np.ndarray:
    """(H, W, 3) uint8. Circles, axis-aligned squares, upward triangles, flat colours."""
    size = cfg.image_size
    img = np.empty((size, size, 3), dtype=np.float32)
    img[:] = BACKGROUND
    if textured:
        noise = np.random.default_rng(texture_seed).integers(-10, 11, size=(size, size, 1))
        img += noise
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    for o in objects:
        dx, dy = xx - o.cx, yy - o.cy
        if o.shape == "circle":
            mask = dx ** 2 + dy ** 2 <= o.radius ** 2
        elif o.shape == "square":
            mask = (np.abs(dx) <= o.radius * 0.89) & (np.abs(dy) <= o.radius * 0.89)
        else:  # apex up, base at the bottom
            h = o.radius
            mask = (dy <= h) & (dy >= -h) & (np.abs(dx) <= (dy + h) / 2 * 1.15)
        img[mask] = PALETTE[o.color]
    return np.clip(img, 0, 255).astype(np.uint8)


# --- language ------------------------------------------------------------------------------------------
def number_word(n: int) -> str:
    return NUMBERS[n] if n < len(NUMBERS) else str(n)


def plural(shape: str) -> str:
    return shape + "s"


def _group(objects: list[Shape]) -> list[tuple[str, str, int]]:
    """[(color, shape, count)] in order of first appearance, left to right."""
    groups: dict[tuple[str, str], int] = {}
    for o in sorted(objects, key=lambda o: o.cx):
        groups[(o.color, o.shape)] = groups.get((o.color, o.shape), 0) + 1
    return [(c, s, n) for (c, s), n in groups.items()]


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def noun_phrase(color: str, shape: str, count: int) -> str:
    if count == 1:
        return f"{article(color)} {color} {shape}"
    return f"{number_word(count)} {color} {plural(shape)}"


def join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def relation(a: Shape, b: Shape) -> str | None:
    """Where a is relative to b, along the clearly dominant axis; None when ambiguous."""
    dx, dy = a.cx - b.cx, a.cy - b.cy
    if abs(dx) > 1.5 * abs(dy) and abs(dx) > 6:
        return "left" if dx < 0 else "right"
    if abs(dy) > 1.5 * abs(dx) and abs(dy) > 6:
        return "above" if dy < 0 else "below"
    return None


RELATION_PHRASE = {"left": "left of", "right": "right of", "above": "above", "below": "below"}


def captions_for(objects: list[Shape]) -> list[str]:
    """Several phrasings of the same scene; the first is the canonical T2I prompt."""
    listing = join([noun_phrase(*g) for g in _group(objects)])
    caps = [listing, f"an image of {listing}", f"there is {listing}" if len(objects) == 1 or
            _group(objects)[0][2] == 1 else f"there are {listing}"]
    rel = relation_caption(objects)
    return caps + [rel] if rel else caps


def relation_caption(objects: list[Shape]) -> str | None:
    """'a red circle left of a blue square' for a scene of two differently named objects in a clear relation
    (the last of its captions), else None."""
    if len(objects) != 2 or objects[0].name == objects[1].name:
        return None
    a, b = objects
    rel = relation(a, b)
    return f"{article(a.color)} {a.name} {RELATION_PHRASE[rel]} {article(b.color)} {b.name}" if rel else None


def _location(o: Shape, size: int) -> str:
    col = ("left", "center", "right")[min(2, int(3 * o.cx / size))]
    row = ("top", "middle", "bottom")[min(2, int(3 * o.cy / size))]
    if (row, col) == ("middle", "center"):
        return "in the center"
    if row == "middle":
        return f"on the {col}"
    if col == "center":
        return f"at the {row}"
    return f"at the {row} {col}"


def description(objects: list[Shape], textured: bool, size: int) -> str:
    parts = [f"{article(o.size)} {o.size} {o.name} {_location(o, size)}" for o in sorted(objects, key=lambda o: (o.cy, o.cx))]
    bg = "textured" if textured else "plain"
    return f"the image shows {join(parts)} on a {bg} background."


# --- questions ---------------------------------------------------------------------------------------
def popular_pairs() -> list[tuple[str, str]]:
    """(colour, shape) pairs from the most to the least frequent in training: POPE's "popular" ranking."""
    pairs = _seen_pairs()
    return [pairs[i] for i in np.argsort(-_pair_weights(pairs), kind="stable")]


def existence_questions(objects: list[Shape], rng: np.random.Generator) -> list[Question]:
    present = {(o.color, o.shape) for o in objects}
    all_pairs = [(c, s) for c in COLORS for s in SHAPES]
    absent = [p for p in all_pairs if p not in present]
    qs = []
    pos = sorted(present)[int(rng.integers(len(present)))]
    qs.append(Question("existence", f"is there {article(pos[0])} {pos[0]} {pos[1]} in the image?", "yes"))
    # random: any absent pair; popular: the most common absent pair; adversarial: an absent pair sharing
    # a colour or a shape with an object that is present (the confusable one).
    choices = {
        "random": absent[int(rng.integers(len(absent)))] if absent else None,
        "popular": next((p for p in popular_pairs() if p not in present), None),
        "adversarial": None,
    }
    confusable = [p for p in absent if any(p[0] == c or p[1] == s for c, s in present)]
    if confusable:
        choices["adversarial"] = confusable[int(rng.integers(len(confusable)))]
    for kind, pair in choices.items():
        if pair is not None:
            qs.append(Question("existence", f"is there {article(pair[0])} {pair[0]} {pair[1]} in the image?", "no",
                               pope=kind))
    return qs


def questions_for(objects: list[Shape], textured: bool, size: int, rng: np.random.Generator) -> list[Question]:
    qs = existence_questions(objects, rng)
    shapes_present = [o.shape for o in objects]
    # counting
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    qs.append(Question("counting", f"how many {plural(shape)} are there?",
                       number_word(shapes_present.count(shape))))
    qs.append(Question("counting", "how many shapes are there?", number_word(len(objects))))
    # counting with a false premise: the claim names a shape that is absent
    absent_shapes = [s for s in SHAPES if s not in shapes_present]
    if absent_shapes:
        s = absent_shapes[int(rng.integers(len(absent_shapes)))]
        real = _group_by_shape(objects)
        qs.append(Question("false_premise",
                           f"the shapes look like {plural(s)}. how many {plural(s)} are there?",
                           f"zero. there are no {plural(s)}, there are {real}."))
    # colour of a shape that occurs exactly once
    unique = [o for o in objects if shapes_present.count(o.shape) == 1]
    if unique:
        o = unique[int(rng.integers(len(unique)))]
        qs.append(Question("color", f"what color is the {o.shape}?", o.color))
    # spatial relation between two uniquely named objects
    names = [o.name for o in objects]
    named = [o for o in objects if names.count(o.name) == 1]
    pairs = [(a, b) for a in named for b in named if a is not b and relation(a, b)]
    if pairs:
        a, b = pairs[int(rng.integers(len(pairs)))]
        qs.append(Question("spatial", f"where is the {a.name} relative to the {b.name}?", relation(a, b)))
    qs.append(Question("description", "describe the image in detail.", description(objects, textured, size)))
    return qs


def _group_by_shape(objects: list[Shape]) -> str:
    counts: dict[str, int] = {}
    for o in objects:
        counts[o.shape] = counts.get(o.shape, 0) + 1
    return join([f"{number_word(n)} {plural(s) if n > 1 else s}" for s, n in sorted(counts.items())])


# --- the data set ------------------------------------------------------------------------------------
class ShapesWorld:
    """Indexable, infinite, deterministic: `world.sample("train", i)`."""

    def __init__(self, config: ShapesConfig = ShapesConfig(), seed: int = 0, cache: bool = False):
        self.config = config
        self.seed = seed
        # Training revisits the same images every epoch: keep them (about 13 KB each at 64 px).
        self._cache: dict[tuple[str, int], ShapesSample] | None = {} if cache else None

    def sample(self, split: str, index: int) -> ShapesSample:
        if self._cache is None:
            return self._make(split, index)
        key = (split, index)
        if key not in self._cache:
            self._cache[key] = self._make(split, index)
        return self._cache[key]

    def _make(self, split: str, index: int) -> ShapesSample:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        if index < 0:
            raise ValueError(f"index must be >= 0, got {index}")
        rng = _rng(self.seed, split, index)
        objects = sample_scene(self.config, rng, split)
        textured = bool(rng.random() < self.config.textured_background)
        texture_seed = int(rng.integers(2 ** 31))
        image = render(objects, self.config, textured, texture_seed)
        sample = ShapesSample(split, index, objects, textured, texture_seed, image, captions_for(objects))
        sample.questions = questions_for(objects, textured, self.config.image_size, rng)
        return sample

    def plain_image(self, split: str, index: int) -> np.ndarray:
        """Sample `index`'s scene drawn on a plain background (its image when not textured)."""
        sample = self.sample(split, index)
        return render(sample.objects, self.config) if sample.textured else sample.image

    def samples(self, split: str, n: int, start: int = 0) -> list[ShapesSample]:
        return [self.sample(split, i) for i in range(start, start + n)]


def image_hash(image: np.ndarray) -> str:
    return hashlib.sha1(image.tobytes()).hexdigest()
