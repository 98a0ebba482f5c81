"""Decode steps replayed as CUDA graphs.

A Mamba decode step is a fixed sequence of a few hundred small kernels over fixed-shape buffers (the
weights and the `Mamba2Cache`); launching them one by one from Python costs more than running them. A
`StepRunner` captures one step once per (batch size, task route) and replays it: the inputs are copied into
static buffers, the cache is updated in place, and the output lands in a static buffer that the next replay
overwrites (read it, or clone it, before the next step). A prefill (a whole prompt into the cache) is a fixed
sequence of kernels too, for a given batch and length: `PrefillGraphs` graphs those that recur over a step
runner's cache, since launching a short prompt's prefill eagerly takes longer than running it. A generation's
whole per-token work (step, output head, guidance, sampling, end-of-answer bookkeeping) is one `TokenLoop`, a
graph that feeds itself: the head and sampling launched eagerly after each graphed step were a dozen small
kernels per token, whose launches the GPU waited on.

Off CUDA, or with `use_graph=False`, the runner calls the step eagerly; both give the same numbers.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import Tensor

from .mamba2.cache import Mamba2Cache


class StepRunner:
    """Runs `fn(*inputs) -> Tensor`, a decode step that updates `cache` in place, eagerly or as a graph.

    Capturing runs the step a few times, which scribbles on the cache: the runner therefore resets the
    cache after capture, and callers fill it (prefill) afterwards.
    """

    def __init__(self, fn: Callable[..., Tensor], cache: Mamba2Cache, example_inputs: tuple[Tensor, ...],
                 use_graph: bool, warmup: int = 2, pool=None, capture_error_mode: str = "global",
                 advance: int = 1):
        """pool: a memory pool (torch.cuda.graph_pool_handle()) shared with other runners that never replay
        at the same time; capture_error_mode "thread_local" lets other threads use CUDA during the capture
        (a server's request threads); advance: positions one call adds to the cache (1 for a step)."""
        self.fn = fn
        self.cache = cache
        self.advance = advance
        self._prefills: PrefillGraphs | None = None
        self._loops: _Recent | None = None
        self.in_use = False  # held by a running generation (set by its owner)
        self.graph: torch.cuda.CUDAGraph | None = None
        if not use_graph:
            return
        self.inputs = tuple(t.clone() for t in example_inputs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
            for _ in range(warmup):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool, capture_error_mode=capture_error_mode):
            self.output = fn(*self.inputs)
        cache.reset()

    @property
    def graphed(self) -> bool:
        return self.graph is not None

    @property
    def prefills(self) -> PrefillGraphs:
        """The graphed prefills over this runner's cache (made on first use: most runners never need one)."""
        if self._prefills is None:
            self._prefills = PrefillGraphs()
        return self._prefills

    def loop(self, key: tuple, build: Callable[[], "TokenLoop"]) -> TokenLoop:
        """This runner's token loop for `key` (what the loop's picking depends on): built by `build` on first
        use and kept (the four most recently used) when the runner is graphed; built afresh when not."""
        if self.graph is None:
            return build()
        if self._loops is None:
            self._loops = _Recent(4)
        if key in self._loops:
            return self._loops.use(key)
        loop = build()
        self._loops.put(key, loop)
        return loop

    def __call__(self, *inputs: Tensor) -> Tensor:
        if self.graph is None:
            return self.fn(*inputs)
        for buffer, value in zip(self.inputs, inputs):
            buffer.copy_(value)
        self.graph.replay()
        self.cache.seqlen_offset += self.advance  # the step's Python-side bookkeeping does not replay
        return self.output


class TokenLoop:
    """The decode loop of one generation: each call runs `step(feed, positions) -> hidden` over `cache`, then
    `pick(hidden) -> (tokens, next feed)`, stores the feed and advances the positions by one, so the next call
    continues from its own output. Graphed (`use_graph`), a call is one replay: step, head, guidance and
    sampling together. `generator` (None: the global RNG) is what `pick` samples with; the graph keeps drawing
    from it, so a graphed loop draws what the eager one draws. `buffers`: tensors `pick` keeps across calls
    (an answer's finished rows), zeroed by `start`.

    Capturing runs the loop a few times, which scribbles on the cache, the generator and the buffers: the
    loop resets the cache after capture, and `start` re-seeds and zeroes the rest; fill the cache after
    building the loop, then call `start`.
    """

    def __init__(self, step: Callable[[Tensor, Tensor], Tensor], pick: Callable[[Tensor], tuple[Tensor, Tensor]],
                 cache: Mamba2Cache, feed: Tensor, positions: Tensor, use_graph: bool,
                 generator: torch.Generator | None = None, buffers: tuple[Tensor, ...] = (), warmup: int = 2):
        self.step, self.pick, self.cache = step, pick, cache
        self.feed, self.positions = feed.clone(), positions.clone()
        self.generator, self.buffers = generator, buffers
        self.graph: torch.cuda.CUDAGraph | None = None
        if not use_graph:
            return
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                self._body()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        if generator is not None:  # the default generator registers itself; another must be named
            self.graph.register_generator_state(generator)
        with torch.cuda.graph(self.graph):
            self.output = self._body()
        cache.reset()

    def _body(self) -> Tensor:
        tokens, feed = self.pick(self.step(self.feed, self.positions))
        self.feed.copy_(feed)
        self.positions.add_(1)
        return tokens

    def start(self, hidden: Tensor, positions: Tensor, seed: int | None = None) -> Tensor:
        """The first tokens, picked (eagerly) from the prefill's last hidden states; the loop then continues
        from them at `positions`. `seed` re-seeds the loop's generator."""
        for buffer in self.buffers:
            buffer.zero_()
        if seed is not None and self.generator is not None:
            self.generator.manual_seed(seed)
        tokens, feed = self.pick(hidden)
        self.feed.copy_(feed)
        self.positions.copy_(positions)
        return tokens

    def __call__(self) -> Tensor:
        """The next tokens (a fresh tensor)."""
        if self.graph is None:
            return self._body()
        self.graph.replay()
        self.cache.seqlen_offset += 1  # the step's Python-side bookkeeping does not replay
        return self.output.clone()


class _Recent(OrderedDict):
    """A dict that keeps its `max_size` most recently used entries (`use` and `put` count as uses)."""

    def __init__(self, max_size: int):
        super().__init__()
        self.max_size = max_size

    def use(self, key):
        self.move_to_end(key)
        return self[key]

    def put(self, key, value) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.max_size:
            self.popitem(last=False)


class PrefillGraphs:
    """Graphed prefills over one step runner's cache, by prompt length: a length's first prefill runs eagerly
    (a capture costs about three prefills, and most lengths may never recur), its second and later ones are
    replayed from a graph captured then. The `max_size` most recently used lengths are kept."""

    def __init__(self, max_size: int = 4):
        self._graphs: _Recent = _Recent(max_size)  # key -> its graph, or None when seen once

    def __call__(self, prefill: Callable[[Tensor, Tensor], Tensor], cache: Mamba2Cache, x: Tensor,
                 mask: Tensor, tag: tuple = ()) -> Tensor:
        """prefill(x, mask) -> last hidden states, run into `cache` (which must be fresh: reset, offset 0),
        eagerly or replayed. `tag`: whatever else the prefill's kernels depend on. The graph's output is a
        static buffer: clone it before the next replay."""
        key = (tuple(x.shape), x.dtype, tuple(mask.shape), mask.dtype, *tag)
        if key not in self._graphs:  # first sighting: eagerly, and remember the length
            self._graphs.put(key, None)
            return prefill(x, mask)
        graph = self._graphs.use(key)
        if graph is None:
            def fresh_prefill(x, mask):  # each warm-up and the capture start from a fresh cache
                cache.seqlen_offset = 0
                return prefill(x, mask)

            graph = StepRunner(fresh_prefill, cache, (x, mask), True, advance=x.size(1))
            self._graphs.put(key, graph)
        return graph(x, mask)

    def __len__(self) -> int:
        return sum(g is not None for g in self._graphs.values())


class StepRunnerPool:
    """The runners of one model, keyed by (kind, batch size, route, ...), least recently used dropped first.

    Each runner owns a cache, so the pool bounds the memory it holds."""

    def __init__(self, max_size: int = 8):
        self._runners: _Recent = _Recent(max_size)

    @property
    def max_size(self) -> int:
        return self._runners.max_size

    def get(self, key: tuple, build: Callable[[], StepRunner]) -> StepRunner:
        if key in self._runners:
            return self._runners.use(key)
        runner = build()
        self._runners.put(key, runner)
        return runner

    def clear(self) -> None:
        self._runners.clear()

    def __len__(self) -> int:
        return len(self._runners)


def graphs_enabled(requested: bool | None, module: torch.nn.Module, device: torch.device) -> bool:
    """None means: on for CUDA models in eval mode (dropout in training mode would be captured once)."""
    if requested is None:
        return device.type == "cuda" and not module.training
    if requested and device.type != "cuda":
        raise ValueError("CUDA graphs need a CUDA model; pass use_cuda_graph=False (or None) on the CPU")
    return requested
