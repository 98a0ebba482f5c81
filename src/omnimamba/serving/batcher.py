"""Continuous batching of answer generation (MMU): requests join a running decode batch at a step boundary and
leave it when they finish, with no cost for history, since a Mamba-2 sequence's whole past is a fixed-size state.

One thread owns the decode loop. Each loop turn: admit waiting requests into free rows (each is prefilled alone,
then its conv and SSM states are copied into its row of the shared cache), sample one token for every active
row (each with its own temperature, top-p and seed), hand the tokens to their requests, retire finished or
cancelled rows (the last active row moves into the freed one, so active rows stay packed in [0, n) and a step
costs what n sequences cost), then run one decode step over the n active rows.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..generation import check_sampling_args, make_generator, sample_next_token


class QueueFull(Exception):
    """The batcher's waiting queue is at its bound: retry later."""


@dataclass
class TextRequest:
    """One answer to generate: pixels (1, 3, H, W), the prompt's text ids, sampling settings. Tokens arrive
    on `tokens` (ints), then None; an exception instead if the request failed. `cancel()` stops it."""

    pixels: Tensor
    ids: list[int]
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    tokens: queue.Queue = field(default_factory=queue.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    finish_reason: str | None = None  # "stop" ([EOT]), "length" (max_tokens) or "cancelled"
    n_generated: int = 0
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def __iter__(self):
        """The generated token ids, as they come (blocking)."""
        while True:
            item = self.tokens.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class _Row:
    def __init__(self, request: TextRequest, generator):
        self.request, self.generator = request, generator


class TextBatcher:
    """Continuous batching over at most `max_batch` rows; at most `max_queue` requests wait for a row.
    `lock` serialises the model between this loop and other users (e.g. image generation)."""

    def __init__(self, model, max_batch: int = 32, max_queue: int = 256, lock: threading.Lock | None = None):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.lock = lock or threading.Lock()
        self.device = next(model.parameters()).device
        self.route = model._route("mmu")
        self.cache = model.allocate_cache(max_batch, self.device)
        self.hidden = torch.zeros(max_batch, model.config.backbone.d_model, device=self.device,
                                  dtype=model.lm_head.weight.dtype)
        self.rows: list[_Row] = []  # row i of the cache belongs to rows[i]
        self.waiting: collections.deque[TextRequest] = collections.deque()
        self._wake = threading.Condition()
        self._stop = False
        # what /metrics reports
        self.tokens_total = 0
        self.requests_total = 0
        self.steps_total = 0
        self.latencies: collections.deque[float] = collections.deque(maxlen=1000)
        self._thread = threading.Thread(target=self._loop, name="omnimamba-batcher", daemon=True)
        self._thread.start()

    # --- the public side ------------------------------------------------------------------------------
    def submit(self, request: TextRequest) -> TextRequest:
        check_sampling_args(request.temperature, 0, request.top_p)
        with self._wake:
            if len(self.waiting) >= self.max_queue:
                raise QueueFull(f"{len(self.waiting)} requests are waiting (the bound is {self.max_queue})")
            self.waiting.append(request)
            self._wake.notify()
        return request

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def batch_size(self) -> int:
        return len(self.rows)

    def close(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=10)

    # --- the loop -------------------------------------------------------------------------------------
    def _loop(self) -> None:
        with torch.no_grad(), self.model._merged_route(self.route):
            while True:
                with self._wake:
                    while not self._stop and not self.waiting and not self.rows:
                        self._wake.wait()
                    if self._stop:
                        break
                try:
                    with self.lock:
                        self._turn()
                except BaseException as e:  # a failed step fails the requests in it, not the server
                    for row in self.rows:
                        row.request.tokens.put(e)
                    self.rows = []
        for row in self.rows:
            row.request.finish_reason = "cancelled"
            row.request.tokens.put(None)

    def _turn(self) -> None:
        self._admit()
        if not self.rows:
            return
        n = len(self.rows)
        logits = self.model.answer_logits(self.hidden[:n])
        tokens = torch.empty(n, dtype=torch.long, device=self.device)
        for i, row in enumerate(self.rows):
            r = row.request
            tokens[i] = sample_next_token(logits[i:i + 1], r.temperature, 0, r.top_p, row.generator)[0]
        eot = self.model.special.eot
        finished = []
        for i, (row, t) in enumerate(zip(self.rows, tokens.tolist())):
            r = row.request
            if r.cancelled:
                r.finish_reason = "cancelled"
            elif t == eot:
                r.finish_reason = "stop"
            else:
                r.tokens.put(t)
                r.n_generated += 1
                self.tokens_total += 1
                if r.n_generated >= r.max_tokens:
                    r.finish_reason = "length"
            if r.finish_reason:
                finished.append(i)
        for i in reversed(finished):  # highest first, so moving the last row in never moves a finished one
            r = self.rows[i].request
            r.tokens.put(None)
            self.latencies.append(time.perf_counter() - r.submitted)
            self.requests_total += 1
            self._retire(i)
        if not self.rows:
            return
        # Rows were compacted by _retire in the same way as `keep` maps old indices to new positions.
        self.hidden[: len(self.rows)] = self._step(self._compact(tokens, n, finished))
        self.steps_total += 1

    @staticmethod
    def _compact(values: Tensor, n: int, finished: list[int]) -> Tensor:
        """Apply to `values` (n, ...) the moves _retire made to the rows (each freed slot takes the last row)."""
        order = list(range(n))
        for i in reversed(finished):
            last = order.pop()
            if i < len(order):
                order[i] = last
        return values[order]

    def _step(self, tokens: Tensor) -> Tensor:
        n = tokens.size(0)
        view = type(self.cache)(conv=self.cache.conv[:, :n], ssm=self.cache.ssm[:, :n])
        emb = self.model.backbone.embedding(tokens)
        return self.model.backbone.step(emb, view, task=self.route)

    def _admit(self) -> None:
        while len(self.rows) < self.max_batch:
            with self._wake:
                if not self.waiting:
                    return
                r = self.waiting.popleft()
            if r.cancelled:
                r.finish_reason = "cancelled"
                r.tokens.put(None)
                continue
            try:
                self._prefill(r, len(self.rows))
            except BaseException as e:
                r.tokens.put(e)
                continue
            self.rows.append(_Row(r, make_generator(r.seed, self.device)))

    def _prefill(self, r: TextRequest, slot: int) -> None:
        m = self.model
        ids = torch.tensor([r.ids], dtype=torch.long, device=self.device)
        x = m.mmu_embeddings(r.pixels.to(self.device), ids)
        single = m.allocate_cache(1, self.device)
        self.hidden[slot] = m.backbone(x, cache=single, task=self.route)[0, -1]
        self.cache.conv[:, slot] = single.conv[:, 0]
        self.cache.ssm[:, slot] = single.ssm[:, 0]

    def _retire(self, i: int) -> None:
        """Free row i: the last active row moves into it (states and hidden), keeping rows packed."""
        last = len(self.rows) - 1
        if i != last:
            self.cache.conv[:, i] = self.cache.conv[:, last]
            self.cache.ssm[:, i] = self.cache.ssm[:, last]
            self.hidden[i] = self.hidden[last]
            self.rows[i] = self.rows[last]
        self.rows.pop()
