"""How a model is spread over processes: DDP (a full copy per process, gradients all-reduced) or FSDP2 (each
backbone block, then the rest, sharded across processes: parameters, gradients and optimizer state)."""

from __future__ import annotations

import torch
from torch import nn


def shard_fsdp2(model: nn.Module) -> nn.Module:
    """Shard `model` in place with FSDP2, one unit per backbone block plus the root (embeddings, heads,
    encoders, projector); a block's full parameters exist only while it runs."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.backbone.layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DDP around `model`. It fixes the set of trained parameters when built, so build one per stage;
    a step trains one task's LoRA route per sequence, hence find_unused_parameters."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    return DDP(model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
