"""The kernels a Mamba-2 block uses under torch.compile in training (`Mamba2Backbone.compile_blocks`).

The scan stays fla's, one custom operator the compiler treats as opaque (ops/fla.py). Everything around it is
plain PyTorch for inductor to fuse, forward and backward, with the glue between them: the residual add +
RMSNorm, the causal conv as k shifted multiply-adds + SiLU, the gated RMSNorm. Eager runs keep fla's
hand-written kernels for these (a compiler cannot fuse across them, and eager has no compiler).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import torch.nn.functional as F
from torch import Tensor

from . import reference


def causal_conv(x: Tensor, weight: Tensor, bias: Tensor | None, initial_state: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
    """Same contract as `reference.causal_conv`, written as k shifted multiply-adds over the padded input so
    inductor fuses it with its SiLU into one pass (a grouped conv is a cuDNN call it cannot fuse)."""
    if initial_state is not None:
        return reference.causal_conv(x, weight, bias, initial_state)
    k, length = weight.size(-1), x.size(1)
    padded = F.pad(x, (0, 0, k - 1, 0))  # (b, k - 1 + l, c)
    w = weight.to(x.dtype)
    out = padded[:, :length] * w[:, 0]
    for j in range(1, k):
        out = out + padded[:, j:j + length] * w[:, j]
    if bias is not None:
        out = out + bias.to(x.dtype)
    return F.silu(out), padded[:, -k:].transpose(1, 2)


@functools.cache
def training_kernels(d_state: int, headdim: int, fla: bool) -> SimpleNamespace:
    """The block's kernels for a compiled training forward at these sizes: with `fla`, fla's scan on the route
    `ops.fla.scan_backward` picks (decided here, once, so no Python of it is traced), else the reference's."""
    scan = reference.ssd_chunked
    if fla:
        from . import fla as backend

        backend._pin_configs()
        route = backend.scan_backward(d_state, headdim)
        if route != "reference":
            scan = functools.partial(backend.scan, verified=route == "fla-verified")
    return SimpleNamespace(ssd_chunked=scan, causal_conv=causal_conv, add_rmsnorm=reference.add_rmsnorm,
                           gated_rmsnorm=reference.gated_rmsnorm)
