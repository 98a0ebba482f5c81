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
from ..sequence import pad_rows_left
from .batcher import ContinuousBatcher


@dataclass
class ImageRequest:
    """n images of one caption: prefix ids [T2I][SOT]{caption}[EOT][SOI] and its caption mask (sequence.t2i_prefix).
    The PIL images (a list), an exception, or None (cancelled) arrive on `results`: a queue.Queue read by
    `result()`, which blocks, or a LoopQueue that an event loop awaits."""

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
    results: queue.Queue = field(default_factory=queue.Queue)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _failed: bool = False
    codes_done: int = 0  # image codes sampled so far, over all n images (progress: codes_done / (n * tokens))

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def result(self, timeout: float | None = None) -> list:
        """The images (blocking; `results` a queue.Queue): queue.Empty after `timeout` seconds."""
        return self._unwrap(self.results.get(timeout=timeout))

    async def aresult(self, timeout: float | None = None) -> list:
        """The images (awaited; `results` a LoopQueue): asyncio.TimeoutError after `timeout` seconds."""
        return self._unwrap(await self.results.get(timeout))

    @staticmethod
    def _unwrap(out) -> list:
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

    def _prefill(self, items: list[_Image]):
        m = self.model
        rows = []  # per image: its conditional row, then its unconditional one (null caption or null prompt)
        for item in items:
            r = item.request
            ids = torch.tensor([r.prefix_ids], dtype=torch.long, device=self.device)
            caption = torch.tensor([r.caption_mask], dtype=torch.bool, device=self.device)
            rows.append(m.guidance_rows(ids, torch.ones_like(ids), caption, r.null_prefix))
        width = max(ids.size(1) for ids, *_ in rows)
        ids, mask, caption = (torch.cat([pad_rows_left(row[k], width, fill) for row in rows])
                              for k, fill in enumerate((m.special.pad, 0, False)))
        drop = None if rows[0][3] is None else torch.cat([row[3] for row in rows])
        x = m.t2i_prefix_embeddings(ids, mask, caption, drop)
        cache = m.allocate_cache(2 * len(items), self.device)
        return cache, m.prefill(x, cache, mask, self.route)

    def _sample(self, n: int) -> tuple[Tensor, list[int]]:
        m = self.model
        logits = m.image_logits(self.hidden[: 2 * n]).float()
        cond, uncond = logits[0::2], logits[1::2]
        scale = torch.tensor([slot.item.request.guidance for slot in self.slots], device=self.device)[:, None]
        mixed = torch.where(scale == 1.0, cond, cfg_logits(cond, uncond, scale))
        codes = torch.cat([sample_next_token(mixed[i:i + 1], slot.item.request.temperature, slot.item.request.top_k,
                                             slot.item.request.top_p, slot.generator)
                           for i, slot in enumerate(self.slots)])
        rows, finished = [], []
        for i, (slot, code) in enumerate(zip(self.slots, codes.tolist())):  # the step's one device sync
            item, r = slot.item, slot.item.request
            rows.append((code, m.t2i_image_start + len(item.codes)))  # (code, its position)
            item.codes.append(code)
            r.codes_done += 1
            self.tokens_total += 1
            if r.cancelled or len(item.codes) == m.config.image_tokens:
                finished.append(i)
        return torch.tensor(rows, dtype=torch.long, device=self.device), finished

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
            r.results.put([Image.fromarray(a) for a in to_uint8(pixels)])
            self.latencies.append(time.perf_counter() - r.submitted)
            self.requests_total += 1

    def _fail(self, item: _Image, error: BaseException | None) -> None:
        r = item.request
        if not r._failed:  # once per request, whichever of its images fails first
            r._failed = True
            r.results.put(error)
