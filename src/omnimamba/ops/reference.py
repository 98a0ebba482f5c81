"""Pure-PyTorch reference kernels for Mamba-2. This file is the spec every fast backend must match.

Shapes: b batch, l length, h heads, p head dim, g groups (h % g == 0), n state size, c channels, k conv width.
The SSD recurrence (Mamba-2 paper, eq. 1 with scalar A per head):
    state_t = exp(dt_t * A) * state_{t-1} + dt_t * x_t ⊗ B_t        (state: (h, p, n))
    y_t     = state_t · C_t + D * x_t
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # The scan accumulates over the whole sequence: never below float32, float64 stays float64.
    return torch.promote_types(dtype, torch.float32)


def _segsum(x: Tensor) -> Tensor:
    """(..., T) -> (..., T, T) with out[i, j] = x[j+1] + ... + x[i] for i >= j and -inf above the diagonal.

    Built from masked cumulative sums rather than differences of one cumsum, which loses precision.
    """
    T = x.size(-1)
    x = x[..., None].expand(*x.shape, T)  # x[..., i, j] = x_i
    below = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    x = x.masked_fill(~below, 0)
    out = torch.cumsum(x, dim=-2)
    on_or_below = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=0)
    return out.masked_fill(~on_or_below, float("-inf"))


def heads_from_groups(t: Tensor, nheads: int, dim: int) -> Tensor:
    """B and C are shared by the h/g heads of a group (grouped-value layout of mamba_ssm): t's `dim` of g
    groups repeated to nheads, each group's heads side by side (t.repeat_interleave(h // g, dim)). Written as
    an expand and one copy: repeat_interleave gathers through an index, and its backward scatter-adds."""
    dim = dim % t.dim()
    g = t.size(dim)
    shape = list(t.shape)
    shape.insert(dim + 1, nheads // g)
    return t.unsqueeze(dim + 1).expand(shape).flatten(dim, dim + 1)


def ssd_chunked(
    x: Tensor,
    dt: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    chunk_size: int,
    D: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Chunked SSD scan (the "minimal" algorithm of the Mamba-2 paper, section 6).

    x (b, l, h, p); dt (b, l, h) already softplus'ed and biased; A (h,) negative; B, C (b, l, g, n);
    D (h,); initial_state (b, h, p, n). Returns y (b, l, h, p) in x's dtype and the final state
    (b, h, p, n) in float32 (float64 for float64 input).

    Laid out as batched matrix products over (batch, group, head in group, chunk): the r = h / g heads of a
    group share its B and C, so C·B is formed once per group rather than once per head.
    """
    b, l, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    r = h // g
    cdt = _compute_dtype(x.dtype)
    out_dtype = x.dtype
    x_in = x
    pad = (-l) % chunk_size
    # Padded steps have dt = 0: no decay and no input, so the final state is exact.
    x, dt, B, C = (F.pad(t.to(cdt), (0, 0) * (t.dim() - 2) + (0, pad)) for t in (x, dt, B, C))
    nc, cs = x.size(1) // chunk_size, chunk_size
    x = x.view(b, nc, cs, g, r, p).permute(0, 3, 4, 1, 2, 5)  # (b, g, r, c, s, p)
    dt = dt.view(b, nc, cs, g, r).permute(0, 3, 4, 1, 2)  # (b, g, r, c, s)
    B = B.view(b, nc, cs, g, n).permute(0, 3, 1, 2, 4).unsqueeze(2)  # (b, g, 1, c, s, n)
    C = C.view(b, nc, cs, g, n).permute(0, 3, 1, 2, 4).unsqueeze(2)
    Adt = dt * A.to(cdt).view(g, r, 1, 1)
    A_cum = torch.cumsum(Adt, dim=-1)
    xdt = x * dt[..., None]

    # 1. within each chunk: the quadratic (attention-like) form, (C·Bᵀ ∘ L) · (x dt).
    L = torch.exp(_segsum(Adt))  # (b, g, r, c, s, s)
    y = ((C @ B.transpose(-1, -2)) * L) @ xdt  # (b, g, r, c, s, p)

    # 2. the state each chunk contributes at its end.
    decay_to_end = torch.exp(A_cum[..., -1:] - A_cum)
    states = (xdt * decay_to_end[..., None]).transpose(-1, -2) @ B  # (b, g, r, c, p, n)

    # 3. pass states across chunk boundaries (a recurrence over nc + 1 chunk states).
    if initial_state is None:
        init = torch.zeros(b, g, r, 1, p, n, dtype=cdt, device=x.device)
    else:
        init = initial_state.to(cdt).view(b, g, r, 1, p, n)
    states = torch.cat([init, states], dim=3)
    decay_chunk = torch.exp(_segsum(F.pad(A_cum[..., -1], (1, 0))))  # (b, g, r, c + 1, c + 1)
    states = (decay_chunk @ states.flatten(-2)).view(b, g, r, nc + 1, p, n)
    final_state = states[:, :, :, -1].reshape(b, h, p, n)

    # 4. the contribution of the state entering each chunk to that chunk's outputs.
    y = y + (C @ states[:, :, :, :-1].transpose(-1, -2)) * torch.exp(A_cum)[..., None]

    y = y.permute(0, 3, 4, 1, 2, 5).reshape(b, nc * cs, h, p)[:, :l]
    if D is not None:
        y = y + D.to(cdt)[:, None] * x_in.to(cdt)
    return y.to(out_dtype), final_state


def ssd_step(
    state: Tensor, x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None
) -> Tensor:
    """One step of the recurrence; updates `state` (b, h, p, n) in place.

    x (b, h, p); dt (b, h) already softplus'ed and biased; B, C (b, g, n). Returns y (b, h, p) in x's dtype.
    """
    h = x.size(1)
    cdt = _compute_dtype(state.dtype)  # a bf16 state is updated in float32 and rounded when stored
    dt = dt.to(cdt)
    B = heads_from_groups(B, h, dim=1).to(cdt)
    C = heads_from_groups(C, h, dim=1).to(cdt)
    xc = x.to(cdt)
    decay = torch.exp(dt * A.to(cdt))
    new = state.to(cdt) * decay[..., None, None] + torch.einsum("bh,bhp,bhn->bhpn", dt, xc, B)
    state.copy_(new)
    y = torch.einsum("bhpn,bhn->bhp", new, C)
    if D is not None:
        y = y + D.to(cdt)[:, None] * xc
    return y.to(x.dtype)


def discretize_dt(dt: Tensor, dt_bias: Tensor | None, dt_limit: tuple[float, float] = (0.0, math.inf)) -> Tensor:
    """Mamba-2's step size from in_proj's raw output: clamp(softplus(dt + dt_bias), *dt_limit), in float32 or
    wider."""
    cdt = _compute_dtype(dt.dtype)
    dt = dt.to(cdt) if dt_bias is None else dt.to(cdt) + dt_bias.to(cdt)
    dt = F.softplus(dt)
    return dt if tuple(dt_limit) == (0.0, math.inf) else dt.clamp(*dt_limit)


def ssd_decode(
    state: Tensor, x: Tensor, dt: Tensor, A_log: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
    dt_bias: Tensor | None = None, dt_limit: tuple[float, float] = (0.0, math.inf),
) -> Tensor:
    """The decode step as a mixer runs it, from its raw parameters: dt (b, h) before the softplus,
    dt = clamp(softplus(dt + dt_bias), *dt_limit), A = -exp(A_log); then `ssd_step` (state updated in place).
    """
    cdt = _compute_dtype(state.dtype)
    dt = discretize_dt(dt.to(cdt), dt_bias, dt_limit)
    return ssd_step(state, x, dt, -torch.exp(A_log.to(cdt)), B, C, D)


def causal_conv(
    x: Tensor, weight: Tensor, bias: Tensor | None, initial_state: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Depthwise causal conv1d + SiLU over the sequence.

    x (b, l, c); weight (c, k); bias (c,); initial_state (b, c, k): the last k inputs seen before x
    (zeros at the start). Returns the activated output (b, l, c) and the new state (b, c, k).
    """
    k, c = weight.size(-1), weight.size(0)
    if initial_state is None:
        full = F.pad(x, (0, 0, k, 0))  # (b, k + l, c): zeros before the start
    else:
        full = torch.cat([initial_state.transpose(1, 2).to(x.dtype), x], dim=1)
    context = full[:, 1:]  # (b, k - 1 + l, c), contiguous in c
    # As a (b, c, 1, k - 1 + l) view it is channels-last, where the CPU's depthwise conv2d runs the conv
    # with its backward 1.1-1.6x faster than conv1d on a (b, c, l) copy (benchmarks/conv_cpu.py)
    bias = bias.to(x.dtype) if bias is not None else None
    out = F.conv2d(context.permute(0, 2, 1).unsqueeze(2), weight[:, None, None, :].to(x.dtype), bias, groups=c)
    return F.silu(out.squeeze(2).permute(0, 2, 1)), full[:, -k:].transpose(1, 2).contiguous()


def conv_step(state: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """One step of the causal conv + SiLU; shifts `state` (b, c, k) in place. x (b, c) -> (b, c)."""
    state.copy_(torch.roll(state, shifts=-1, dims=-1))
    state[..., -1] = x.to(state.dtype)
    out = torch.einsum("bck,ck->bc", state, weight.to(state.dtype))
    if bias is not None:
        out = out + bias.to(state.dtype)
    return F.silu(out).to(x.dtype)


def add_rmsnorm(
    x: Tensor, residual: Tensor | None, weight: Tensor, eps: float, residual_in_fp32: bool = False
) -> tuple[Tensor, Tensor]:
    """The pre-norm block's entry: residual = x (+ residual); returns (RMSNorm(residual) * weight in the
    weight's dtype, residual), the residual in float32 when `residual_in_fp32` (mamba_ssm's fused add-norm)."""
    residual = x if residual is None else residual + x
    cdt = _compute_dtype(residual.dtype)
    normed = F.rms_norm(residual.to(cdt), (residual.size(-1),), weight.to(cdt), eps).to(weight.dtype)
    if residual_in_fp32:
        residual = residual.to(cdt)
    return normed, residual


def gated_rmsnorm(x: Tensor, z: Tensor, weight: Tensor, eps: float, group_size: int) -> Tensor:
    """RMSNorm(x * SiLU(z)) normalised per group of `group_size` channels, times weight.

    mamba_ssm's RMSNormGated with norm_before_gate=False. x, z (..., d); weight (d,).
    """
    dtype = x.dtype
    cdt = _compute_dtype(dtype)
    h = x.to(cdt) * F.silu(z.to(cdt))
    grouped = h.unflatten(-1, (h.size(-1) // group_size, group_size))
    grouped = grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)
    return (grouped.flatten(-2) * weight.to(cdt)).to(dtype)
