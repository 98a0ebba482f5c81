"""Training data for the two tasks, indexable and deterministic: example i of a stream depends only on i and
the seed, so a resumed or multi-process run sees exactly the samples a single uninterrupted run would.

Step s of a stage uses global indices [s * B, (s + 1) * B) of each task's stream; rank r of W takes the r-th
contiguous slice of them.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ..data.formats import DataError, images_to_tensor, load_image, read_llava
from ..data.shapes import ShapesConfig, ShapesWorld, relation_caption
from ..errors import UserError
from ..fileio import read_json, read_safetensors, writing
from ..sequence import MMUBatch, T2IBatch, mmu_example, t2i_prefix

log = logging.getLogger(__name__)


# --- MMU ---------------------------------------------------------------------------------------------------
class ShapesMMU:
    """Example i: training image i mod n and 1 to max_turns of its questions (distinct, in random order),
    drawn with a seeded generator. An image has one existence question answered "yes" and up to three
    answered "no" (POPE's random, popular and adversarial negatives); balance_existence keeps one of the three,
    drawn per example, so "yes" and "no" are equally frequent in training. With relation_share, that share of
    the examples whose image has a spatial question but did not draw it ask it in place of a drawn turn."""

    def __init__(self, world: ShapesWorld, n_images: int, seed: int = 0, max_turns: int = 1,
                 balance_existence: bool = False, relation_share: float = 0.0):
        self.world, self.n, self.seed, self.max_turns = world, n_images, seed, max_turns
        self.balance_existence, self.relation_share = balance_existence, relation_share

    def example(self, index: int) -> tuple[np.ndarray, list[tuple[str, str]]]:
        sample = self.world.sample("train", index % self.n)
        rng = np.random.default_rng([self.seed, 17, index])
        questions = sample.questions
        if self.balance_existence:
            negatives = [k for k, q in enumerate(questions) if q.type == "existence" and q.answer == "no"]
            if negatives:
                kept = negatives[int(rng.integers(len(negatives)))]
                questions = [q for k, q in enumerate(questions) if k == kept or k not in negatives]
        if self.max_turns == 1:  # the single-question stream of earlier versions, draw for draw
            picks = [int(rng.integers(len(questions)))]
        else:
            turns = int(rng.integers(1, min(self.max_turns, len(questions)) + 1))
            picks = rng.permutation(len(questions))[:turns].tolist()
        if self.relation_share:  # drawn after the turns, so a share of 0 leaves every earlier draw as it was
            spatial = [k for k, q in enumerate(questions) if q.type == "spatial" and k not in picks]
            if spatial and rng.random() < self.relation_share:
                picks[int(rng.integers(len(picks)))] = spatial[0]
        return sample.image, [(questions[k].question, questions[k].answer) for k in picks]


class FileMMU:
    """LLaVA conversations; every turn of a record goes into one sequence."""

    def __init__(self, path: str, image_root: str | None, image_size: int, skip_bad: bool):
        result = read_llava(path, image_root, skip_bad=skip_bad)
        if not result.samples:
            raise UserError(f"{path}: no usable conversation")
        self.samples, self.skipped = result.samples, list(result.skipped)
        self.image_size, self.skip_bad = image_size, skip_bad

    def example(self, index: int) -> tuple[np.ndarray, list[tuple[str, str]]]:
        for attempt in range(len(self.samples)):
            s = self.samples[(index + attempt) % len(self.samples)]
            try:
                return load_image(s.image, self.image_size), s.turns
            except DataError as e:
                if not self.skip_bad:
                    raise
                self.skipped.append(str(e))
                log.warning("skipping bad sample: %s", e)
        raise UserError("no readable image in the MMU data")


def mmu_batch(source, tokenizer, indices: list[int], multiple: int = 1) -> MMUBatch:
    """`multiple`: text lengths rounded up to a multiple of it (see `MMUBatch.collate`)."""
    images, examples = [], []
    for i in indices:
        image, turns = source.example(i)
        images.append(image)
        examples.append(mmu_example(tokenizer, turns))
    return MMUBatch.collate(images_to_tensor(images), examples, tokenizer.special, multiple)


# --- T2I ---------------------------------------------------------------------------------------------------
class ShapesT2I:
    """Example i: training image i mod n with one of its captions; its codes come from the code cache. With
    relation_share, that share of the examples whose scene has a relation caption take it (the rest draw
    uniformly among all the scene's captions, that one included)."""

    def __init__(self, world: ShapesWorld, n_images: int, codes: Tensor, seed: int = 0, relation_share: float = 0.0):
        self.world, self.n, self.codes, self.seed = world, n_images, codes, seed
        self.relation_share = relation_share

    def example(self, index: int) -> tuple[str, Tensor]:
        k = index % self.n
        sample = self.world.sample("train", k)
        rng = np.random.default_rng([self.seed, 29, index])
        caption = sample.captions[int(rng.integers(len(sample.captions)))]
        if self.relation_share and rng.random() < self.relation_share:
            caption = relation_caption(sample.objects) or caption
        return caption, self.codes[k]


class FileT2I:
    """COCO captions; `image_rows[k]` is the row of caption k's image in `codes`."""

    def __init__(self, samples: list, codes: Tensor, image_rows: list[int]):
        self.samples, self.codes, self.image_rows = samples, codes, image_rows

    def example(self, index: int) -> tuple[str, Tensor]:
        k = index % len(self.samples)
        return self.samples[k].caption, self.codes[self.image_rows[k]]


def t2i_batch(source, tokenizer, indices: list[int], max_caption_tokens: int, caption_dropout: float = 0.0,
              seed: int = 0) -> T2IBatch:
    """Caption dropout is drawn per sample index (not from the global RNG), so it does not depend on how
    the batch is split across processes."""
    prefixes, codes, drop = [], [], []
    for i in indices:
        caption, c = source.example(i)
        prefixes.append(t2i_prefix(tokenizer, caption, max_caption_tokens))
        codes.append(c)
        drop.append(bool(np.random.default_rng([seed, 31, i]).random() < caption_dropout))
    return T2IBatch.collate(prefixes, torch.stack(codes).long(), tokenizer.special, drop)


# --- the image-code cache ----------------------------------------------------------------------------------
def vq_fingerprint(vq) -> str:
    h = hashlib.sha1()
    for k, v in sorted(vq.state_dict().items()):
        if k.endswith("codebook_used"):
            continue
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def cached_codes(vq, images_of, n: int, path: str | Path, batch_size: int = 64, progress: bool = True,
                 source_id: str = "") -> Tensor:
    """Codes (n, tokens) of images_of(i) for i < n, read from `path` when it was made by this same VQ
    from the same source, otherwise computed (progress bar) and written there. T2I training reads codes,
    not pixels."""
    from safetensors.torch import save_file
    from tqdm import tqdm

    path = Path(path)
    meta = {"vq": vq_fingerprint(vq), "n": str(n), "source": source_id}
    meta_path = path.with_suffix(".json")
    try:
        if path.is_file() and read_json(meta_path, "code cache record") == meta:
            codes = read_safetensors(path, "image-code cache")["codes"]
            if codes.shape[0] == n:
                return codes.long()
    except (UserError, KeyError) as e:  # a damaged cache is rebuilt, not trusted
        log.warning("rebuilding the image-code cache: %s", e)
    device = next(vq.parameters()).device
    out = []
    vq.eval()
    for start in tqdm(range(0, n, batch_size), desc="caching image codes", disable=not progress):
        batch = images_to_tensor([images_of(i) for i in range(start, min(n, start + batch_size))])
        out.append(vq.encode(batch.to(device) * 2 - 1).cpu())
    codes = torch.cat(out).to(torch.int32)
    tmp = path.with_suffix(".tmp")
    with writing(path, "image-code cache"):
        path.parent.mkdir(parents=True, exist_ok=True)
        meta_path.unlink(missing_ok=True)  # the record, written last, vouches for the codes
        save_file({"codes": codes}, str(tmp))
        tmp.replace(path)
        meta_path.write_text(json.dumps(meta))
    return codes.long()


def shapes_world(cfg) -> ShapesWorld:
    s = cfg.data.shapes
    return ShapesWorld(ShapesConfig(image_size=s.image_size, textured_background=s.textured_background), seed=s.seed,
                       cache=True)
