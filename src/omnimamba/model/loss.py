"""Next-token cross-entropy from hidden states, without the (tokens, vocabulary) float32 logits if asked.

The reference applies the output head to every position and takes the cross-entropy over the whole (b, T, V)
logits. The chunked path applies it only to the positions that have a target (an MMU sequence of ~750 tokens
has a few dozen answer tokens), `chunk` positions at a time, under activation checkpointing: the backward
recomputes each chunk's logits instead of keeping them, so memory holds one chunk's logits at a time. Both give
the same loss and gradients (tests/test_memory_options.py).
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from ..sequence import IGNORE_INDEX


def token_loss(hidden: Tensor, head: Callable[[Tensor], Tensor], targets: Tensor, chunk: int = 0
               ) -> tuple[Tensor | None, Tensor, Tensor]:
    """hidden (b, T, d), head (..., d) -> (..., V), targets (b, T) with IGNORE_INDEX where there is none.
    Returns (logits (b, T, V), or None when chunked; the loss summed over targets, float32; the target count)."""
    keep = targets != IGNORE_INDEX
    tokens = keep.sum()
    if chunk <= 0:
        logits = head(hidden)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX,
                               reduction="sum")
        return logits, loss, tokens
    h, t = hidden[keep], targets[keep]
    loss = head(h[:0]).float().sum()  # 0, but reaching the head's weights as the reference's loss does
    for start in range(0, t.numel(), chunk):
        loss = loss + checkpoint(_chunk_loss, head, h[start:start + chunk], t[start:start + chunk],
                                 use_reentrant=False)
    return None, loss, tokens


def _chunk_loss(head: Callable[[Tensor], Tensor], h: Tensor, t: Tensor) -> Tensor:
    return F.cross_entropy(head(h).float(), t, reduction="sum")
