"""Continuous batching: requests join a running decode batch at a step boundary and leave it when they finish,
with no cost for history, since a Mamba-2 sequence's whole past is a fixed-size state.

One thread per task owns its decode loop. Each loop turn: admit waiting items into free slots (prefilled together,
up to `prefill_batch` at a time, then their conv and SSM states are copied into their rows of the shared cache),
sample one token for every slot (each with its own settings and seed; greedy slots in one argmax, one device sync
per step), hand the tokens to their requests, retire finished or cancelled slots
(the last slot moves into the freed one, so slots stay packed in [0, n) and a step costs what n sequences cost),
then run one decode step over the n slots. TextBatcher does answers (here); ImageBatcher (images.py) images.

On a GPU the decode step is replayed as a CUDA graph: one graph per bucket of slot counts (1, 2, 4, ... up to
max_batch), captured when the batcher starts, over the first rows of the shared cache; n slots step in the
smallest bucket that holds them (the rows past n are free slots, overwritten when a slot is next filled).
"""

from __future__ import annotations

import asyncio
import collections
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..decoding import StepRunner, graphs_enabled
from ..generation import check_sampling_args, make_generator, sample_next_token
from ..sequence import pad_left


class QueueFull(Exception):
    """The batcher's waiting queue is at its bound: retry later."""


class LoopQueue:
    """Where a batcher's thread puts a request's results for an asyncio handler to await: no thread waits per
    request. put() from any thread; `await get(timeout)` on the event loop the queue was made on."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop, self._queue = loop, asyncio.Queue()

    def put(self, item) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def get(self, timeout: float | None = None):
        """The next item; asyncio.TimeoutError after `timeout` seconds (the item, when it comes, is kept)."""
        return await asyncio.wait_for(self._queue.get(), timeout)


@dataclass
class TextRequest:
    """One answer to generate: pixels (1, 3, H, W), the prompt's text ids, sampling settings. Tokens arrive
    on `tokens` (ints), then None; an exception instead if the request failed. `cancel()` stops it. `tokens`
    is a queue.Queue (iterate the request from a thread) or a LoopQueue (await it from an event loop)."""

    pixels: Tensor
    ids: list[int]
    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    tokens: queue.Queue = field(default_factory=queue.Queue)
    submitted: float = field(default_factory=time.perf_counter)
    finish_reason: str | None = None  # "stop" (the answer's end token), "length" (max_tokens) or "cancelled"
    n_generated: int = 0
    position: int = 0  # the MMU position of the next token fed back
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


class _Slot:
    """A place in the running batch: `width` consecutive rows of the cache, held by one item (a text request,
    or one image of an image request), with its own sampling generator."""

    def __init__(self, item, generator):
        self.item, self.generator = item, generator


class ContinuousBatcher:
    """The decode loop shared by answers and images: at most `max_batch` slots of `width` cache rows each
    decode together; at most `max_queue` items wait. `lock` serialises the model between batchers.
    use_cuda_graph: replay decode steps as CUDA graphs (None: on for a CUDA model in eval mode).

    A subclass says how waiting items are prefilled together (`_prefill`), what each slot feeds the next step
    after sampling (`_sample`: one row of step inputs per slot, and which slots finished) and how those inputs
    become embeddings (`_embed`); it hands results to its requests (`_finish`, `_fail`)."""

    task = "mmu"
    width = 1
    prefill_batch = 16  # waiting items prefilled together at most (bounds the prefill's activation memory)

    def __init__(self, model, max_batch: int = 32, max_queue: int = 256, lock: threading.Lock | None = None,
                 use_cuda_graph: bool | None = None):
        if max_batch < 1 or max_queue < 0:
            raise ValueError("max_batch must be >= 1 and max_queue >= 0")
        self.model, self.max_batch, self.max_queue = model, max_batch, max_queue
        self.lock = lock or threading.Lock()
        self.device = next(model.parameters()).device
        self.graphed = graphs_enabled(use_cuda_graph, model, self.device)
        self.runners: dict[int, StepRunner] = {}  # slots -> the graphed step over that many slots' rows
        self.route = model._route(self.task)
        rows = max_batch * self.width
        self.cache = model.allocate_cache(rows, self.device)
        self.hidden = torch.zeros(rows, model.config.backbone.d_model, device=self.device,
                                  dtype=model.lm_head.weight.dtype)
        self.slots: list[_Slot] = []  # slot i holds cache rows [i * width, (i + 1) * width)
        self.waiting: collections.deque = collections.deque()
        self._wake = threading.Condition()
        self._stop = False
        # what /metrics reports
        self.tokens_total = 0
        self.requests_total = 0
        self.steps_total = 0
        self.latencies: collections.deque[float] = collections.deque(maxlen=1000)
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name=f"omnimamba-{self.task}-batcher", daemon=True)
        self._thread.start()
        self._started.wait()  # the graphs are captured: the first request does not pay for it
        if self._start_error is not None:
            raise self._start_error

    # --- the public side ------------------------------------------------------------------------------
    def _enqueue(self, items: list) -> None:
        with self._wake:
            if len(self.waiting) + len(items) > self.max_queue:
                raise QueueFull(f"{len(self.waiting)} waiting, {len(items)} more asked for (the bound is "
                                f"{self.max_queue})")
            self.waiting.extend(items)
            self._wake.notify()

    @property
    def queue_length(self) -> int:
        return len(self.waiting)

    @property
    def batch_size(self) -> int:
        return len(self.slots)

    def close(self) -> None:
        with self._wake:
            self._stop = True
            self._wake.notify()
        self._thread.join(timeout=10)

    # --- the loop -------------------------------------------------------------------------------------
    def buckets(self) -> list[int]:
        """The slot counts a graph is captured for: powers of two below max_batch, and max_batch."""
        return [1 << k for k in range(self.max_batch.bit_length()) if 1 << k < self.max_batch] + [self.max_batch]

    def _capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()  # one at a time replays: the graphs share their memory
        for slots in self.buckets():  # ascending: _step takes the first that holds its slots
            view = self._view(slots * self.width)
            example = self._embed(torch.zeros(slots, 2, dtype=torch.long, device=self.device))

            def step(emb, view=view):
                return self.model.backbone.step(emb, view, task=self.route)
            self.runners[slots] = StepRunner(step, view, (example,), True, pool=pool,
                                             capture_error_mode="thread_local")

    def _view(self, rows: int):
        """The shared cache's first `rows` rows, as a cache (the same memory)."""
        return type(self.cache)(conv=self.cache.conv[:, :rows], ssm=self.cache.ssm[:, :rows])

    def _step(self, emb: Tensor, slots: int) -> None:
        """One decode step of the first `slots` slots (emb: their rows' embeddings) into self.hidden."""
        rows = slots * self.width
        if not self.graphed:
            self.hidden[:rows] = self.model.backbone.step(emb, self._view(rows), task=self.route)
            return
        bucket = next(b for b in self.runners if b >= slots)
        runner = self.runners[bucket]
        runner.inputs[0][:rows].copy_(emb)  # the rows past `rows` step free slots: whatever they hold
        self.hidden[:rows] = runner()[:rows]

    def _loop(self) -> None:
        with torch.no_grad(), self.model._merged_route(self.route):
            try:
                if self.graphed:
                    with self.lock:
                        self._capture()
            except BaseException as e:
                self._start_error = e
                return
            finally:
                self._started.set()
            while True:
                with self._wake:
                    while not self._stop and not self.waiting and not self.slots:
                        self._wake.wait()
                    if self._stop:
                        break
                try:
                    with self.lock:
                        self._turn()
                except BaseException as e:  # a failed step fails the requests in it, not the server
                    for slot in self.slots:
                        self._fail(slot.item, e)
                    self.slots = []
        # Stopped: whatever is decoding or still waiting ends as cancelled, so no client waits forever.
        with self._wake:
            left = [slot.item for slot in self.slots] + list(self.waiting)
            self.slots, self.waiting = [], collections.deque()
        for item in left:
            self._fail(item, None)

    def _turn(self) -> None:
        self._admit()
        if not self.slots:
            return
        n = len(self.slots)
        inputs, finished = self._sample(n)
        for i in sorted(finished, reverse=True):  # highest first: moving the last slot in never moves a finished one
            self._finish(self.slots[i].item)
            self._retire(i)
        if not self.slots:
            return
        self._step(self._embed(self._compact(inputs, n, sorted(finished))), len(self.slots))
        self.steps_total += 1

    @staticmethod
    def _compact(values: Tensor, n: int, finished: list[int]) -> Tensor:
        """Apply to `values` (n, ...) the moves _retire made to the slots (each freed slot takes the last)."""
        order = list(range(n))
        for i in reversed(finished):
            last = order.pop()
            if i < len(order):
                order[i] = last
        return values[order]

    def _admit(self) -> None:
        while len(self.slots) < self.max_batch:
            items, cancelled = [], []
            with self._wake:
                while self.waiting and len(items) < min(self.max_batch - len(self.slots), self.prefill_batch):
                    item = self.waiting.popleft()
                    (cancelled if self._cancelled(item) else items).append(item)
            for item in cancelled:
                self._fail(item, None)
            if not items:
                return
            try:
                cache, hidden = self._prefill(items)
            except BaseException as e:
                for item in items:
                    self._fail(item, e)
                continue
            for k, item in enumerate(items):
                rows = self._rows(len(self.slots))
                self.cache.conv[:, rows] = cache.conv[:, self._rows(k)]
                self.cache.ssm[:, rows] = cache.ssm[:, self._rows(k)]
                self.hidden[rows] = hidden[self._rows(k)]
                self.slots.append(_Slot(item, make_generator(self._seed(item), self.device)))

    def _rows(self, slot: int) -> slice:
        return slice(slot * self.width, (slot + 1) * self.width)

    def _retire(self, i: int) -> None:
        """Free slot i: the last slot moves into it (states and hidden), keeping slots packed."""
        last = len(self.slots) - 1
        if i != last:
            dst, src = self._rows(i), self._rows(last)
            self.cache.conv[:, dst] = self.cache.conv[:, src]
            self.cache.ssm[:, dst] = self.cache.ssm[:, src]
            self.hidden[dst] = self.hidden[src]
            self.slots[i] = self.slots[last]
        self.slots.pop()

    # --- what a subclass defines ---------------------------------------------------------------------------
    def _prefill(self, items: list):
        """Prefill `items` together: (a cache of len(items) * width rows, the rows' last hidden states)."""
        raise NotImplementedError

    def _sample(self, n: int) -> tuple[Tensor, list[int]]:
        raise NotImplementedError

    def _embed(self, inputs: Tensor) -> Tensor:
        raise NotImplementedError

    def _finish(self, item) -> None:
        raise NotImplementedError

    def _fail(self, item, error: BaseException | None) -> None:
        """error None: the item was cancelled (or the server stops)."""
        raise NotImplementedError

    def _cancelled(self, item) -> bool:
        return item.cancelled

    def _seed(self, item) -> int | None:
        return item.seed


class TextBatcher(ContinuousBatcher):
    """Answers (MMU), one cache row per request."""

    task, width = "mmu", 1

    def submit(self, request: TextRequest) -> TextRequest:
        check_sampling_args(request.temperature, 0, request.top_p)
        if request.max_tokens < 1:
            raise ValueError("max_tokens must be >= 1")
        # too long for the model's positions fails now, not midway
        self.model.check_mmu_length(self.model.mmu_length(len(request.ids)) + request.max_tokens - 1)
        self._enqueue([request])
        return request

    def _prefill(self, items: list[TextRequest]):
        m = self.model
        ids, mask = pad_left([r.ids for r in items], m.special.pad)
        pixels = torch.cat([r.pixels for r in items]).to(self.device)
        x, mask, position = m.mmu_prefill_inputs(pixels, ids.to(self.device), mask.to(self.device))
        for r, p in zip(items, position.tolist()):
            r.position = p  # where the first answer token goes
        cache = m.allocate_cache(len(items), self.device)
        return cache, m.prefill(x, cache, mask, self.route)

    def _sample(self, n: int) -> tuple[Tensor, list[int]]:
        logits = self.model.answer_logits(self.hidden[:n])
        tokens = logits.argmax(-1)  # greedy slots; sampled ones drawn from their own generators
        for i, slot in enumerate(self.slots):
            r = slot.item
            if r.temperature > 0:
                tokens[i] = sample_next_token(logits[i:i + 1], r.temperature, 0, r.top_p, slot.generator)[0]
        end = self.model.special.end
        rows, finished = [], []
        for i, (slot, t) in enumerate(zip(self.slots, tokens.tolist())):  # the step's one device sync
            r = slot.item
            rows.append((t, r.position))  # (token, its position)
            r.position += 1
            if r.cancelled:
                r.finish_reason = "cancelled"
            elif t == end:
                r.finish_reason = "stop"
            else:
                r.tokens.put(t)
                r.n_generated += 1
                self.tokens_total += 1
                if r.n_generated >= r.max_tokens:
                    r.finish_reason = "length"
            if r.finish_reason:
                finished.append(i)
        return torch.tensor(rows, dtype=torch.long, device=self.device), finished

    def _embed(self, inputs: Tensor) -> Tensor:
        emb = self.model.backbone.embedding(inputs[:, 0])
        if self.model.config.mmu_positions:
            emb = emb + self.model.mmu_positions(inputs[:, 1]).to(emb.dtype)
        return emb

    def _finish(self, r: TextRequest) -> None:
        r.tokens.put(None)
        self.latencies.append(time.perf_counter() - r.submitted)
        self.requests_total += 1

    def _fail(self, r: TextRequest, error: BaseException | None) -> None:
        if error is None:
            r.finish_reason = "cancelled"
        r.tokens.put(error)
