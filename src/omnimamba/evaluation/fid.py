"""FID (and CLIP score) of text-to-image generation, COCO-30k style: one caption per image id, chosen with a
fixed seed; images generated with a fixed seed and saved as PNGs (a rerun skips the ones already written);
FID against a folder of reference images through torchmetrics' FrechetInceptionDistance (torch-fidelity's
InceptionV3, the network of the FID paper's TensorFlow release), its weights read from a local file.

Both sides are centre-cropped to a square and resized to 299 x 299 (bicubic) before the network, so
reference photographs and generated images of any size meet on equal terms.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError

INCEPTION_SIZE = 299
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def read_captions(path: str | Path, limit: int | None = None, seed: int = 0) -> list[tuple[str, str]]:
    """[(image id, caption)]: COCO captions JSON (one caption per image id, picked with `seed`; `limit` image
    ids drawn with `seed`, the COCO-30k protocol) or a text file (one caption per line, id = line number)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"caption file not found: {path}")
    rng = np.random.default_rng(seed)
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(path.read_text())
            by_image: dict = {}
            for ann in data["annotations"]:
                by_image.setdefault(ann["image_id"], []).append(ann["caption"].strip())
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise UserError(f"{path}: not a COCO captions file ({e}); expected "
                            "{'annotations': [{'image_id', 'caption'}, ...]}") from None
        ids = sorted(by_image)
        pairs = [(str(i), by_image[i][int(rng.integers(len(by_image[i])))]) for i in ids]
    else:
        pairs = [(f"{n:06d}", line.strip()) for n, line in enumerate(path.read_text().splitlines()) if line.strip()]
    if not pairs:
        raise UserError(f"{path}: no captions")
    if limit is not None and limit < len(pairs):
        keep = sorted(rng.choice(len(pairs), size=limit, replace=False).tolist())
        pairs = [pairs[k] for k in keep]
    return pairs


def generate_for_captions(model, tokenizer, pairs: list[tuple[str, str]], out_dir: str | Path, batch_size: int = 16,
                          guidance: float = 3.0, temperature: float = 1.0, top_k: int = 0, seed: int = 0,
                          progress: bool = True) -> list[Path]:
    """One PNG per caption, named by its image id. Captions go in fixed blocks of `batch_size`, block k seeded
    with seed + k * batch_size, so a resumed run (which skips blocks whose files all exist) writes the same
    images as an uninterrupted one."""
    from tqdm import tqdm

    from ..inference import generate_images

    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / f"{image_id}.png" for image_id, _ in pairs]
    bar = tqdm(total=len(pairs), desc="generating", unit="img", disable=not progress)
    for start in range(0, len(pairs), batch_size):
        block = range(start, min(len(pairs), start + batch_size))
        if not all(paths[k].is_file() for k in block):
            images = generate_images(model, tokenizer, [pairs[k][1] for k in block], guidance_scale=guidance,
                                     temperature=temperature, top_k=top_k, seed=seed + start, batch_size=batch_size)
            for k, image in zip(block, images):
                _save_atomically(image, paths[k])
        bar.update(len(block))
    bar.close()
    return paths


def _save_atomically(image, path: Path) -> None:
    tmp = path.with_suffix(".tmp.png")
    image.save(tmp)
    tmp.replace(path)


def image_files(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise UserError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def load_for_inception(path: Path) -> torch.Tensor:
    """(3, 299, 299) uint8: centre square crop, bicubic resize."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            w, h = im.size
            s = min(w, h)
            im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
            im = im.resize((INCEPTION_SIZE, INCEPTION_SIZE), Image.BICUBIC)
            return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1)
    except (UnidentifiedImageError, OSError) as e:
        raise UserError(f"{path}: cannot read the image ({e})") from None


def check_weights_file(path: str | Path) -> str:
    """A state dict readable without unpickling code (torch-fidelity then reads it itself)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Inception weights not found: {path} (the FID network, e.g. torch-fidelity's "
                        "weights-inception-2015-12-05-6726825d.pth, downloaded by you beforehand)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, foreign formats
        raise UserError(f"{path}: not a PyTorch state dict that loads safely ({e})") from None
    if not isinstance(state, dict) or "Mixed_7c.branch_pool.conv.weight" not in state:
        raise UserError(f"{path}: not the weights of torch-fidelity's FID InceptionV3")
    return str(path)


def fid_metric(weights: str | Path, device: str | torch.device = "cpu"):
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance
    except ImportError:
        raise UserError("FID needs torchmetrics and torch-fidelity: pip install 'omnimamba[eval]'") from None
    try:
        return FrechetInceptionDistance(feature=2048, feature_extractor_weights_path=check_weights_file(weights),
                                        normalize=False).to(device)
    except ModuleNotFoundError:
        raise UserError("FID needs torch-fidelity: pip install 'omnimamba[eval]'") from None


def compute_fid(reference: list[Path], generated: list[Path], weights: str | Path, batch_size: int = 32,
                device: str | torch.device = "cpu", progress: bool = True) -> float:
    from tqdm import tqdm

    metric = fid_metric(weights, device)
    for files, real in ((reference, True), (generated, False)):
        for start in tqdm(range(0, len(files), batch_size), desc="FID " + ("reference" if real else "generated"),
                          disable=not progress):
            batch = torch.stack([load_for_inception(p) for p in files[start:start + batch_size]]).to(device)
            metric.update(batch, real=real)
    return float(metric.compute())


def compute_clip_score(generated: list[Path], captions: list[str], clip_dir: str | Path, batch_size: int = 32,
                       device: str | torch.device = "cpu") -> float:
    """Mean CLIP score (100 * cosine, floored at 0) of each image with its caption, CLIP read from a local
    transformers directory."""
    try:
        from torchmetrics.multimodal.clip_score import CLIPScore
        from transformers import CLIPModel, CLIPProcessor
    except ImportError:
        raise UserError("CLIP score needs torchmetrics and transformers: pip install 'omnimamba[eval]'") from None
    if not (Path(clip_dir) / "config.json").is_file():
        raise UserError(f"{clip_dir}: not a transformers CLIP folder (no config.json)")

    def load():
        return _ProjectedFeatures(CLIPModel.from_pretrained(str(clip_dir))), CLIPProcessor.from_pretrained(str(clip_dir))

    metric = CLIPScore(model_name_or_path=load).to(device)
    for start in range(0, len(generated), batch_size):
        images = torch.stack([load_for_inception(p) for p in generated[start:start + batch_size]]).to(device)
        metric.update(list(images), captions[start:start + batch_size])
    return float(metric.compute())


class _ProjectedFeatures(torch.nn.Module):
    """A CLIP model whose get_*_features return the projected embeddings as tensors: transformers 5 returns
    them inside an output object (as pooler_output), which torchmetrics 1.9 does not unwrap."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        self.config = clip.config

    @staticmethod
    def _tensor(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    def get_image_features(self, *args, **kwargs):
        return self._tensor(self.clip.get_image_features(*args, **kwargs))

    def get_text_features(self, *args, **kwargs):
        return self._tensor(self.clip.get_text_features(*args, **kwargs))
