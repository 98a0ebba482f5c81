"""One optimiser step's forward and backward passes: this process's share of the step's samples, cut into
micro-batches of at most `run.micro_batch` sequences per task whose gradients accumulate. Each micro-batch's
summed loss is divided by the step's global target count (all micro-batches, all processes), so any split over
processes or micro-batches gives the gradient of the whole batch taken at once.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist

from ..sequence import IGNORE_INDEX, MMUBatch, T2IBatch


def share(step: int, batch: int, rank: int, world_size: int) -> list[int]:
    """This process's share of the global sample indices of `step` (batch samples per step)."""
    per = batch // world_size
    start = step * batch + rank * per
    return list(range(start, start + per))


def micro_splits(mmu: list[int], t2i: list[int], size: int) -> list[tuple[list[int], list[int]]]:
    """The (MMU, T2I) indices of each micro-batch: at most `size` of each task (0: all in one), the tasks
    spread over the same number of micro-batches as evenly as they go."""
    n = max(1, math.ceil(max(len(mmu), len(t2i)) / size)) if size else 1

    def cut(indices: list[int]) -> list[list[int]]:
        per = math.ceil(len(indices) / n) if indices else 0
        return [indices[k * per:(k + 1) * per] for k in range(n)]
    return list(zip(cut(mmu), cut(t2i)))


def target_count(batch: MMUBatch | T2IBatch) -> int:
    """The positions the model's loss sums over (model.loss.token_loss counts the same)."""
    if isinstance(batch, MMUBatch):
        return int((batch.labels != IGNORE_INDEX).sum())
    return batch.image_codes.numel()


@contextlib.contextmanager
def gradient_sync(engine, sync: bool):
    """Under DDP or FSDP2, reduce gradients across processes only on the last micro-batch of a step."""
    if sync:
        yield
    elif hasattr(engine, "no_sync"):  # DDP
        with engine.no_sync():
            yield
    elif hasattr(engine, "set_requires_gradient_sync"):  # FSDP2
        engine.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            engine.set_requires_gradient_sync(True)
    else:
        yield


def forward_backward(engine, micro: list[tuple[MMUBatch | None, T2IBatch | None]], device, precision,
                     world_size: int, distributed: bool) -> dict[str, torch.Tensor]:
    """Forward and backward every micro-batch (on CPU; moved to `device` one at a time); returns each task's
    mean loss over the step's targets, as one forward over the whole global batch reports it: 0-dim tensors
    on `device`, left there so that the step never waits for the GPU (reading one does)."""
    micro = [m for m in micro if m[0] is not None or m[1] is not None]
    counts = {}
    for k, task in enumerate(("mmu", "t2i")):
        present = [m[k] for m in micro if m[k] is not None]
        if present:
            counts[task] = torch.tensor(float(sum(target_count(b) for b in present)), device=device)
            if distributed:
                dist.all_reduce(counts[task])
            counts[task] = counts[task].clamp(min=1)
    logs = {task: torch.zeros((), device=device) for task in counts}
    for i, (mb, bt) in enumerate(micro):
        with gradient_sync(engine, sync=i == len(micro) - 1):
            with precision:
                out = engine(mmu=None if mb is None else mb.to(device), t2i=None if bt is None else bt.to(device))
            # DDP averages gradients over the processes: scale by their number to get the global sum's
            loss = 0.0
            for task in counts:
                if f"{task}_loss_sum" in out:
                    part = out[f"{task}_loss_sum"] / counts[task]
                    loss = loss + part * world_size
                    logs[task] += part.detach()
            loss.backward()
    if distributed:
        both = torch.stack([logs[t] for t in counts])
        dist.all_reduce(both)
        logs = dict(zip(counts, both.unbind()))
    return {f"{task}_loss": value for task, value in logs.items()}
