"""Continuous batching of image generation (T2I): each image of a request is one slot of two cache rows, the
caption row and the null-caption row of classifier-free guidance, so the pair always steps together. An image
joins the running batch at a step boundary and leaves after its last code; a request is done when all its
images are, and is then decoded to pixels by the VQ tokenizer.

Image k of a request with seed s samples from its own generator seeded s + k: an image does not depend on
what else is being generated, and one image with seed s is the image `generate_images(..., seed=s)` makes.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..generation import check_sampling_args, sample_next_token
from ..model.generate import cfg_logits
from .batcher import ContinuousBatcher


@dataclass
class ImageRequest:
    """n images of one caption: prefix ids [T2I][SOT]{caption}[EOT][SOI] and its caption mask (sequence.t2i_prefix).
    `result()` blocks until the PIL images are ready (or raises)."""

    prefix_ids: list[int]
    caption_mask: list[bool]
    n: int = 1
    # The unconditional row (ids, mask, caption mask) for a model without a learned null caption
    # (inference.null_prefix).
    null_prefix: tuple[Tensor, Tensor, Tensor] | None = None
    guidance: float = 3.0
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    submitted: float = field(default_factory=time.perf_counter)
    _codes: list = field(default_factory=list)
    _done: queue.Queue = field(default_factory=queue.Queue)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _failed: bool = False
    codes_done: int = 0  # image codes sampled so far, over all n images (progress: codes_done / (n * tokens))

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def result(self, timeout: float | None = None) -> list:
        out = self._done.get(timeout=timeout)
        if isinstance(out, BaseException):
            raise out
        if out is None:
            raise RuntimeError("the image request was cancelled")
        return out


@dataclass
class _Image:
    request: ImageRequest
    index: int
    codes: list[int] = field(default_factory=list)

    @property
    def cancelled(self) -> bool:
        return self.request.cancelled

    @property
    def seed(self) -> int | None:
        return None if self.request.seed is None else self.request.seed + self.index


class ImageBatcher(ContinuousBatcher):
    task, width = "t2i", 2

    def submit(self, request: ImageRequest) -> ImageRequest:
        check_sampling_args(request.temperature, request.top_k, request.top_p)
        if request.guidance < 0 or request.n < 1:
            raise ValueError("guidance must be >= 0 and n >= 1")
        request._codes = [None] * request.n
        self._enqueue([_Image(request, k) for k in range(request.n)])
        return request

    def _prefill(self, item: _Image, slot: int) -> None:
        m, r = self.model, item.request
        ids = torch.tensor([r.prefix_ids], dtype=torch.long, device=self.device)
        caption = torch.tensor([r.caption_mask], dtype=torch.bool, device=self.device)
        # row 2 is the unconditional one (null caption, or the null prompt)
        ids, mask, caption, drop = m.guidance_rows(ids, torch.ones_like(ids), caption, r.null_prefix)
        x = m.t2i_prefix_embeddings(ids, mask, caption, drop)
        single = m.allocate_cache(2, self.device)
        self._fill(slot, single, m.backbone(x, cache=single, mask=mask, task=self.route)[:, -1])

    def _sample(self, n: int) -> tuple[Tensor, list[int]]:
        m = self.model
        logits = m.image_logits(self.hidden[: 2 * n]).float()
        inputs = torch.empty(n, 2, dtype=torch.long, device=self.device)  # (code, its position)
        finished = []
        for i, slot in enumerate(self.slots):
            item, r = slot.item, slot.item.request
            mixed = logits[2 * i] if r.guidance == 1.0 else cfg_logits(logits[2 * i], logits[2 * i + 1], r.guidance)
            code = int(sample_next_token(mixed[None], r.temperature, r.top_k, r.top_p, slot.generator)[0])
            inputs[i, 0], inputs[i, 1] = code, m.t2i_image_start + len(item.codes)
            item.codes.append(code)
            r.codes_done += 1
            self.tokens_total += 1
            if r.cancelled or len(item.codes) == m.config.image_tokens:
                finished.append(i)
        return inputs, finished

    def _embed(self, inputs: Tensor) -> Tensor:
        codes, positions = inputs[:, 0].repeat_interleave(2), inputs[:, 1].repeat_interleave(2)
        return self.model.embed_image_codes(codes) + self.model.t2i_pos_embed[0][positions]

    def _finish(self, item: _Image) -> None:
        r = item.request
        if r.cancelled:
            self._fail(item, None)
            return
        r._codes[item.index] = item.codes
        if all(c is not None for c in r._codes):
            from PIL import Image

            from ..vision.vq import to_uint8

            codes = torch.tensor(r._codes, dtype=torch.long, device=self.device)
            pixels = self.model.vq.decode(codes)
            r._done.put([Image.fromarray(a) for a in to_uint8(pixels)])
            self.latencies.append(time.perf_counter() - r.submitted)
            self.requests_total += 1

    def _fail(self, item: _Image, error: BaseException | None) -> None:
        r = item.request
        if not r._failed:  # once per request, whichever of its images fails first
            r._failed = True
            r._done.put(error)
