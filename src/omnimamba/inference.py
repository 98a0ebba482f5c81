"""Inference for both tasks on a loaded model: answering questions about images (MMU) and generating images
from text (T2I). Both prefill once and then do O(1) work per new token with the recurrent cache."""

from __future__ import annotations

from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from .data.formats import images_to_tensor, load_image, pil_to_array
from .vision.vq import to_uint8
from .errors import UserError
from .sequence import OFFICIAL_NULL_PROMPT, mmu_prompt, pad_left, t2i_prefix


def to_pixels(images, size: int) -> Tensor:
    """PIL images, (H, W, 3) uint8 arrays or paths -> (b, 3, size, size) float in [0, 1]."""
    from PIL import Image

    arrays = []
    for im in images:
        if isinstance(im, (str, Path)):
            arr = load_image(im, size)
        elif isinstance(im, Image.Image):
            arr = pil_to_array(im, size)
        elif isinstance(im, np.ndarray):
            if im.ndim != 3 or im.shape[2] != 3 or 0 in im.shape:
                raise UserError(f"an image array must be (H, W, 3) RGB, got shape {im.shape}")
            arr = im if im.shape[:2] == (size, size) else pil_to_array(Image.fromarray(im.astype(np.uint8)), size)
        else:
            raise UserError(f"cannot read an image from a {type(im).__name__}")
        arrays.append(arr.astype(np.uint8))
    return images_to_tensor(arrays)


def prompt_ids(tokenizer, question: str, history: Sequence[tuple[str, str]] = ()) -> list[int]:
    """The text part of an MMU prompt: earlier (question, answer) turns, then the new question. Official
    conventions end each earlier answer with end-of-text, as its conversation template does."""
    ids: list[int] = []
    official = tokenizer.conventions == "official"
    for q, a in history:
        ids += tokenizer.encode(mmu_prompt(q, tokenizer.conventions)) + tokenizer.encode(" " + a.strip())
        ids += [tokenizer.special.end] if official else []
    return ids + tokenizer.encode(mmu_prompt(question, tokenizer.conventions))


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def answer(model, tokenizer, images, questions, max_new_tokens: int = 64, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, seed: int | None = None, stream: bool = False,
           history: Sequence[tuple[str, str]] = ()):
    """Answer `questions` about `images` (one each; a single image and question give a single answer).

    Returns the answer text (or a list), or with stream=True an iterator of text pieces (lists of pieces
    when batched) whose concatenation is the answer.
    """
    single = isinstance(questions, str)
    if single:
        questions, images = [questions], [images]
    if len(images) != len(questions):
        raise UserError(f"{len(images)} images for {len(questions)} questions: give one image per question")
    for q in questions:
        if not isinstance(q, str) or not q.strip():
            raise UserError(f"a question must be non-empty text, got {q!r}")
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = _model_device(model)
    pixels = to_pixels(images, model.config.understanding.image_size).to(device)
    ids, mask = pad_left([prompt_ids(tokenizer, q, history) for q in questions], tokenizer.special.pad)
    steps = model.generate_text(pixels, ids.to(device), mask.to(device), max_new_tokens=max_new_tokens,
                                temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stream=True)
    pieces = _text_pieces(tokenizer, steps, len(questions))
    if stream:
        return (p[0] for p in pieces) if single else pieces
    texts = ["" for _ in questions]
    for step in pieces:
        texts = [t + p for t, p in zip(texts, step)]
    return texts[0] if single else texts


class TextPieces:
    """The text a growing answer adds with each token: decode(all so far) minus decode(all before), so word
    pieces join as the tokenizer joins them. The answer's end token ends it; later tokens add nothing."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.shown, self.done = tokenizer, [], "", False

    def push(self, token: int) -> str:
        if self.done or token == self.tokenizer.special.end:
            self.done = True
            return ""
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens).strip()
        piece = text[len(self.shown):] if text.startswith(self.shown) else text
        self.shown = text
        return piece


def _text_pieces(tokenizer, steps: Iterator[Tensor], n: int) -> Iterator[list[str]]:
    """Token steps (b,) of n answers -> their text increments, one list per step."""
    answers = [TextPieces(tokenizer) for _ in range(n)]
    for step in steps:
        yield [a.push(t) for a, t in zip(answers, step.tolist())]


def null_prefix(model, tokenizer) -> tuple[Tensor, Tensor, Tensor] | None:
    """The unconditional row of a guided generation for a model without a learned null caption: the
    official release's null prompt, as (ids, mask, caption mask) of one row; None for a model with one."""
    if model.caption_embed.null_caption is not None:
        return None
    ids, caption = t2i_prefix(tokenizer, OFFICIAL_NULL_PROMPT, model.config.max_caption_tokens)
    return torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), torch.tensor([caption])


def generate_images(model, tokenizer, prompts, guidance_scale: float | None = None, temperature: float | None = None,
                    top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
                    batch_size: int = 16, progress: bool = False, epsilon: float | None = None) -> list:
    """Images (PIL) for `prompts` (a string or a list). guidance_scale 1 turns classifier-free guidance off.
    Sampling settings left None take the model's defaults (`config.image_sampling`)."""
    from PIL import Image
    from tqdm import tqdm

    if isinstance(prompts, str):
        prompts = [prompts]
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    given = {"guidance_scale": guidance_scale, "temperature": temperature, "top_k": top_k, "top_p": top_p,
             "epsilon": epsilon}
    sampling = {k: v if given[k] is None else given[k] for k, v in model.config.image_sampling.items()}
    device = _model_device(model)
    prefixes = [t2i_prefix(tokenizer, p, model.config.max_caption_tokens) for p in prompts]
    null = null_prefix(model, tokenizer)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prefixes[start:start + batch_size]
        ids, mask = pad_left([c[0] for c in chunk], tokenizer.special.pad)
        cap, _ = pad_left([c[1] for c in chunk], False)
        bar = (lambda it: tqdm(it, desc=f"image tokens {start + 1}-{start + len(chunk)}/{len(prompts)}",
                               leave=False)) if progress else None
        codes = model.generate_image_codes(ids.to(device), mask.to(device), cap.bool().to(device), **sampling,
                                           seed=None if seed is None else seed + start, progress=bar,
                                           null_prefix=null)
        with torch.no_grad():
            pixels = model.vq.decode(codes)
        out += [Image.fromarray(a) for a in to_uint8(pixels)]
    return out
