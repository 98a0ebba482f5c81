"""GPU backend on flash-linear-attention (pure Triton). Mamba-2's SSD is simple GLA with a per-head scalar
decay: q = C, k = B, v = x * dt, log-decay g = dt * A, scale 1, plus D * x (issue 6).

The scan and the causal conv (whole sequence and one step) run on fla; the SSM decode step and the gated
norm are still the reference ones (same signatures), so every model path works and the seam stays whole.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .reference import gated_rmsnorm, ssd_step  # noqa: F401  (not yet fused)


def is_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import fla.ops.simple_gla  # noqa: F401
    except ImportError:
        return False
    return True


def ssd_chunked(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Same contract as `reference.ssd_chunked`; fla picks its own chunk size (the result does not depend
    on it)."""
    from fla.ops.simple_gla import chunk_simple_gla

    h = x.size(2)
    rep = h // B.size(2)
    k = B.repeat_interleave(rep, dim=2).to(x.dtype)
    q = C.repeat_interleave(rep, dim=2).to(x.dtype)
    v = (x * dt[..., None].to(x.dtype))
    g = (dt * A.to(dt.dtype)).float()
    state0 = None if initial_state is None else initial_state.float()
    # state_v_first: fla's state is (b, h, V=headdim, K=d_state), our (b, h, p, n) layout.
    y, final = chunk_simple_gla(q.contiguous(), k.contiguous(), v.contiguous(), g=g.contiguous(), scale=1.0,
                                initial_state=state0, output_final_state=True, state_v_first=True)
    if D is not None:
        y = y + (D.to(y.dtype)[:, None] * x)
    return y.to(x.dtype), final.float()


def causal_conv(x: Tensor, weight: Tensor, bias: Tensor | None, initial_state: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
    """Same contract as `reference.causal_conv`: x (b, l, c), weight (c, k), state (b, c, k)."""
    from fla.modules.causal_conv1d import causal_conv1d

    w = weight.to(x.dtype).contiguous()
    b = None if bias is None else bias.to(x.dtype)
    state = None if initial_state is None else initial_state.to(x.dtype).contiguous()
    y, final = causal_conv1d(x.contiguous(), w, b, initial_state=state, output_final_state=True, activation="silu")
    return y, final


def conv_step(state: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Same contract as `reference.conv_step`: shifts `state` (b, c, k) in place, x (b, c) -> (b, c)."""
    from fla.modules.causal_conv1d import causal_conv1d_update

    y, _ = causal_conv1d_update(x.to(state.dtype).contiguous(), state, weight=weight.to(state.dtype).contiguous(),
                                bias=None if bias is None else bias.to(state.dtype), activation="silu")
    return y.to(x.dtype)
