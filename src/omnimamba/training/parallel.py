"""How a model is spread over processes: DDP (a full copy per process, gradients all-reduced) or FSDP2 (each
backbone block, then the rest, sharded across processes: parameters, gradients and optimizer state)."""

from __future__ import annotations

import inspect

import torch
from torch import nn


def shard_fsdp2(model: nn.Module, never_trained: tuple[nn.Module, ...] = ()) -> nn.Module:
    """Shard `model` in place with FSDP2, one unit per backbone block plus the root (embeddings, heads,
    projector); a block's full parameters exist only while it runs.

    never_trained: modules no stage trains (the frozen vision encoders, the VQ tokenizer), kept whole on every
    process instead of sharded with the root (torch >= 2.7): the root's parameters stay gathered from its forward
    to the end of its backward, so sharded they would be held one and a half times over (1.5 GiB more at the
    1.3B preset's peak, 29.4 against 27.9 GiB per GPU on two H200s), and they have no gradients to reduce."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.backbone.layers:
        fully_shard(layer)
    ignored = {p for m in never_trained for p in m.parameters()}
    if ignored and "ignored_params" in inspect.signature(fully_shard).parameters:  # torch >= 2.7
        fully_shard(model, ignored_params=ignored)
    else:  # sharded with the root: the same training, more memory
        fully_shard(model)
    return model


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP around `model`. It fixes the set of trained parameters when built, so build one per stage;
    a step trains one task's LoRA route per sequence, hence find_unused_parameters."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
