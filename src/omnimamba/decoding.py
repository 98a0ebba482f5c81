"""Decode steps replayed as CUDA graphs.

A Mamba decode step is a fixed sequence of a few hundred small kernels over fixed-shape buffers (the
weights and the `Mamba2Cache`); launching them one by one from Python costs more than running them. A
`StepRunner` captures one step once per (batch size, task route) and replays it: the inputs are copied into
static buffers, the cache is updated in place, and the output lands in a static buffer that the next replay
overwrites (read it, or clone it, before the next step). A prefill (a whole prompt into the cache) is a fixed
sequence of kernels too, for a given batch and length: `PrefillGraphs` graphs those that recur over a step
runner's cache, since launching a short prompt's prefill eagerly takes longer than running it.

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

    def __call__(self, *inputs: Tensor) -> Tensor:
        if self.graph is None:
            return self.fn(*inputs)
        for buffer, value in zip(self.inputs, inputs):
            buffer.copy_(value)
        self.graph.replay()
        self.cache.seqlen_offset += self.advance  # the step's Python-side bookkeeping does not replay
        return self.output


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
