"""The decoding cache: each layer's conv state and SSM state, pre-allocated with fixed shapes.

Its size depends on the batch and the model, never on how many tokens were consumed: this is what makes
Mamba decoding O(1) in time and memory per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .config import Mamba2Config


@dataclass
class Mamba2Cache:
    """conv (n_layer, b, conv_dim, d_conv): the last d_conv inputs of each layer's conv;
    ssm (n_layer, b, nheads, headdim, d_state): each layer's SSM state, float32 unless asked otherwise
    (kernels always update it in float32 and round only when storing);
    seqlen_offset: tokens consumed so far (0 means fresh: the states are zero)."""

    conv: Tensor
    ssm: Tensor
    seqlen_offset: int = 0

    @classmethod
    def empty(
        cls,
        config: Mamba2Config,
        batch_size: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        n_layer: int | None = None,
        ssm_dtype: torch.dtype | None = None,
    ) -> "Mamba2Cache":
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n_layer = config.n_layer if n_layer is None else n_layer
        conv = torch.zeros(n_layer, batch_size, config.conv_dim, config.d_conv, device=device, dtype=dtype)
        # The SSM state accumulates over the whole sequence: kept in float32 (float64 for float64 models)
        # by default. bf16 halves its memory traffic, which dominates a decode step at large batches.
        if ssm_dtype is None:
            ssm_dtype = torch.promote_types(dtype, torch.float32)
        ssm = torch.zeros(
            n_layer, batch_size, config.nheads, config.headdim, config.d_state, device=device, dtype=ssm_dtype
        )
        return cls(conv=conv, ssm=ssm)

    @property
    def batch_size(self) -> int:
        return self.conv.size(1)

    @property
    def nbytes(self) -> int:
        return self.conv.nbytes + self.ssm.nbytes

    def reset(self) -> None:
        self.conv.zero_()
        self.ssm.zero_()
        self.seqlen_offset = 0

    def select(self, index: Tensor) -> "Mamba2Cache":
        """A new cache holding the batch rows `index` (e.g. to drop finished sequences)."""
        return Mamba2Cache(self.conv[:, index].clone(), self.ssm[:, index].clone(), self.seqlen_offset)
