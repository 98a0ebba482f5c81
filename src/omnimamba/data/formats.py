"""The real data formats, so the same training code runs on real data: LLaVA-style conversation JSON (MMU)
and COCO captions JSON (T2I). Readers name the file and the record of anything malformed; with
`skip_bad=True` bad records are counted, logged and skipped instead."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import UserError

log = logging.getLogger(__name__)


class DataError(UserError):
    """A malformed record: the message names the file and the line or record."""


@dataclass
class ConversationSample:
    image: Path
    turns: list[tuple[str, str]]          # (question, answer)
    meta: dict = field(default_factory=dict)


@dataclass
class CaptionSample:
    image: Path
    caption: str


@dataclass
class ReadResult:
    samples: list
    skipped: list[str]  # one message per skipped record


def images_to_tensor(images: list[np.ndarray]):
    """[(H, W, 3) uint8] -> (b, 3, H, W) float tensor in [0, 1]."""
    import torch

    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)


def pil_to_array(im, size: int | None = None) -> np.ndarray:
    """A PIL image of any mode as (H, W, 3) uint8 RGB, turned upright by its EXIF orientation (as a phone
    photo is shown), resized (bicubic) to size x size when given."""
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(im) or im
    im = im.convert("RGB")
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), Image.BICUBIC)
    return np.asarray(im, dtype=np.uint8).copy()


def load_image(path: str | Path, size: int | None = None) -> np.ndarray:
    """An RGB image file as (H, W, 3) uint8 (see pil_to_array)."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            return pil_to_array(im, size)
    except Image.DecompressionBombError as e:
        raise DataError(f"{path}: image too large to read safely ({e})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{path}: not a readable image ({e})") from None


def _records(path: Path) -> list[tuple[str, object]]:
    """[(where, record)] from a JSON array or JSON-lines file; where = 'file:line N' or 'file[record N]'."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    text = path.read_text()
    if path.suffix == ".jsonl":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    out.append((f"{path}:{n}", json.loads(line)))
                except json.JSONDecodeError as e:
                    out.append((f"{path}:{n}", DataError(f"{path}:{n}: malformed JSON line ({e.msg})")))
        return out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from e
    return data


def _resolve(image: str, root: Path) -> Path:
    p = Path(image)
    return p if p.is_absolute() else root / p


def _collect(items, parse, skip_bad: bool) -> ReadResult:
    samples, skipped = [], []
    for where, raw in items:
        try:
            if isinstance(raw, Exception):
                raise raw
            samples.append(parse(where, raw))
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append(str(e))
            log.warning("skipping bad sample: %s", e)
    return ReadResult(samples, skipped)


def read_llava(path: str | Path, image_root: str | Path | None = None, skip_bad: bool = False,
               check_images: bool = True) -> ReadResult:
    """LLaVA conversations: [{"image": "x.jpg", "conversations": [{"from": "human", "value": "<image>\\nQ"},
    {"from": "gpt", "value": "A"}, ...]}, ...] as a JSON array or JSON lines."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    data = _records(path)
    items = data if path.suffix == ".jsonl" else [(f"{path}[record {i}]", r) for i, r in enumerate(_as_list(data, path))]

    def parse(where, rec):
        if not isinstance(rec, dict) or "image" not in rec or "conversations" not in rec:
            raise DataError(f"{where}: needs 'image' and 'conversations'")
        conv = rec["conversations"]
        if not isinstance(conv, list) or len(conv) < 2 or len(conv) % 2:
            raise DataError(f"{where}: 'conversations' must alternate human and gpt turns")
        turns = []
        for q, a in zip(conv[::2], conv[1::2]):
            if q.get("from") != "human" or a.get("from") != "gpt":
                raise DataError(f"{where}: turns must go human, gpt, human, gpt...")
            turns.append((q["value"].replace("<image>", "").strip(), a["value"].strip()))
        image = _resolve(rec["image"], root)
        if check_images and not image.is_file():
            raise DataError(f"{where}: image file not found: {image}")
        return ConversationSample(image, turns, {k: v for k, v in rec.items() if k not in ("image", "conversations")})

    return _collect(items, parse, skip_bad)


def read_coco_captions(path: str | Path, image_root: str | Path | None = None, skip_bad: bool = False,
                       check_images: bool = True) -> ReadResult:
    """COCO captions: {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}."""
    path = Path(path)
    root = Path(image_root) if image_root is not None else path.parent
    data = _records(path)
    if not isinstance(data, dict) or "annotations" not in data or "images" not in data:
        raise DataError(f"{path}: a COCO captions file needs 'images' and 'annotations'")
    files = {}
    for i, im in enumerate(data["images"]):
        if "id" not in im or "file_name" not in im:
            raise DataError(f"{path}[images {i}]: needs 'id' and 'file_name'")
        files[im["id"]] = im["file_name"]

    def parse(where, ann):
        if not isinstance(ann, dict) or "image_id" not in ann or not isinstance(ann.get("caption"), str):
            raise DataError(f"{where}: needs 'image_id' and a 'caption' string")
        if ann["image_id"] not in files:
            raise DataError(f"{where}: caption with no image (image_id {ann['image_id']} is not in 'images')")
        image = _resolve(files[ann["image_id"]], root)
        if check_images and not image.is_file():
            raise DataError(f"{where}: image file not found: {image}")
        return CaptionSample(image, ann["caption"].strip())

    items = [(f"{path}[annotations {i}]", a) for i, a in enumerate(data["annotations"])]
    return _collect(items, parse, skip_bad)


def _as_list(data, path: Path) -> list:
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON array of records")
    return data


# --- writing the Shapes world in those formats -------------------------------------------------------------
def write_shapes_split(world, split: str, n: int, out: str | Path, grid: int = 16, progress: bool = True) -> dict:
    """images/*.png, llava.json, captions.json and grid.png under `out`. Returns the paths written."""
    from PIL import Image
    from tqdm import tqdm

    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    llava, images, annotations = [], [], []
    shown = []
    for i in tqdm(range(n), desc=f"shapes {split}", disable=not progress):
        s = world.sample(split, i)
        rel = f"images/{s.key}.png"
        Image.fromarray(s.image).save(out / rel, optimize=False)
        llava.append({
            "id": s.key, "image": rel,
            "conversations": [t for q in s.questions for t in (
                {"from": "human", "value": f"<image>\n{q.question}"}, {"from": "gpt", "value": q.answer})],
            "question_types": [q.type for q in s.questions],
            "pope": [q.pope for q in s.questions],
        })
        images.append({"id": i, "file_name": rel, "height": s.image.shape[0], "width": s.image.shape[1]})
        annotations += [{"id": len(annotations), "image_id": i, "caption": c} for c in s.captions]
        if len(shown) < grid:
            shown.append((s.image, s.captions[0]))
    (out / "llava.json").write_text(json.dumps(llava, indent=1) + "\n")
    (out / "captions.json").write_text(json.dumps({"images": images, "annotations": annotations}, indent=1) + "\n")
    picture_grid(shown, out / "grid.png")
    return {"images": str(out / "images"), "llava": str(out / "llava.json"),
            "captions": str(out / "captions.json"), "grid": str(out / "grid.png")}


def picture_grid(items: list[tuple[np.ndarray, str]], path: str | Path, columns: int = 4, scale: int = 3,
                 max_lines: int = 8) -> None:
    """A grid of images, each with its text underneath (wrapped; past `max_lines` lines cut with '...'), saved
    as PNG. Each row's text is as tall as that row's longest text needs."""
    import textwrap

    from PIL import Image, ImageDraw

    if not items:
        return
    h, w = items[0][0].shape[:2]
    cw, ch = w * scale, h * scale
    width, texts = max(10, cw // 6), []  # characters a line
    for _, text in items:
        lines = textwrap.wrap(text, width=width) or [""]
        if len(lines) > max_lines:
            lines[max_lines - 1:] = [textwrap.shorten(" ".join(lines[max_lines - 1:]), width, placeholder=" ...")]
        texts.append("\n".join(lines))
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    heights = [probe.multiline_textbbox((0, 0), t)[3] + 6 for t in texts]
    tops = [8]  # each row's top: the rows above it, each as tall as its image and its longest text
    for r in range(0, len(items), columns):
        tops.append(tops[-1] + ch + max(heights[r:r + columns]) + 8)
    sheet = Image.new("RGB", (columns * (cw + 8) + 8, tops[-1]), "white")
    draw = ImageDraw.Draw(sheet)
    for k, ((img, _), text) in enumerate(zip(items, texts)):
        x, y = 8 + (k % columns) * (cw + 8), tops[k // columns]
        sheet.paste(Image.fromarray(img).resize((cw, ch), Image.NEAREST), (x, y))
        draw.multiline_text((x, y + ch + 2), text, fill="black")
    sheet.save(path)
