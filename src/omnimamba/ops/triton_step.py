"""The Mamba-2 decode step as one Triton kernel (GPU backend; `reference.ssd_decode` is its spec).

Per (batch row, head, block of head channels) one program reads that slice of the SSM state once, applies

    dt    = clamp(softplus(dt_raw + dt_bias), dt_min, dt_max)
    state = exp(dt * A) * state + dt * x ⊗ B,    A = -exp(A_log)
    y     = state · C + D * x

and writes the state back in place, so a step moves each state byte twice (read, write) and nothing else
of size. The update is computed in float32 whatever the state's storage dtype; x, B, C are read straight
from the conv output through their strides. With GATE (ops/fused_step.py) it also multiplies y by SiLU(z) and
writes the sum of squares of its block of y, for the gated RMSNorm that the fused out_proj applies.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch import Tensor


@triton.jit
def _log1p(u):
    # Goldberg's accurate log1p from log: exact where 1 + u rounds to 1, relative error ~1 ulp elsewhere.
    w = 1.0 + u
    return tl.where(w == 1.0, u, tl.log(w) * u / (w - 1.0))


@triton.jit
def _ssd_decode_kernel(
    state, x, dt, dt_bias, A_log, B, C, D, y,
    stride_s_b, stride_s_h, stride_s_p,
    stride_x_b, stride_x_h,
    stride_dt_b,
    stride_bc_b, stride_bc_g,
    stride_y_b, stride_y_h,
    nheads, heads_per_group, headdim, dstate, dt_min, dt_max,
    z, stride_z_b, sumsq, stride_ss_b,
    HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr, GATE: tl.constexpr, BLOCK_P: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    pid_p = tl.program_id(1)
    b = pid_bh // nheads
    h = pid_bh % nheads
    g = h // heads_per_group
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_n = tl.arange(0, BLOCK_N)
    mask_p = offs_p < headdim
    mask_n = offs_n < dstate

    d = tl.load(dt + b * stride_dt_b + h).to(tl.float32)
    if HAS_DT_BIAS:
        d += tl.load(dt_bias + h).to(tl.float32)
    # softplus with torch's threshold of 20, in the overflow-free form max(d, 0) + log1p(exp(-|d|)).
    d = tl.where(d > 20.0, d, tl.maximum(d, 0.0) + _log1p(tl.exp(-tl.abs(d))))
    d = tl.minimum(tl.maximum(d, dt_min), dt_max)
    a = -tl.exp(tl.load(A_log + h).to(tl.float32))
    decay = tl.exp(d * a)

    xv = tl.load(x + b * stride_x_b + h * stride_x_h + offs_p, mask=mask_p, other=0.0).to(tl.float32)
    bc = b * stride_bc_b + g * stride_bc_g + offs_n
    Bv = tl.load(B + bc, mask=mask_n, other=0.0).to(tl.float32)
    Cv = tl.load(C + bc, mask=mask_n, other=0.0).to(tl.float32)

    s_ptrs = state + b * stride_s_b + h * stride_s_h + offs_p[:, None] * stride_s_p + offs_n[None, :]
    s_mask = mask_p[:, None] & mask_n[None, :]
    s = tl.load(s_ptrs, mask=s_mask, other=0.0).to(tl.float32)
    s = s * decay + (d * xv)[:, None] * Bv[None, :]
    tl.store(s_ptrs, s.to(state.dtype.element_ty), mask=s_mask)

    out = tl.sum(s * Cv[None, :], axis=1)
    if HAS_D:
        out += tl.load(D + h).to(tl.float32) * xv
    if GATE:  # fused_step: y * SiLU(z), and this block's sum of squares for the gated RMSNorm
        zv = tl.load(z + b * stride_z_b + h * headdim + offs_p, mask=mask_p, other=0.0).to(tl.float32)
        out = out * zv / (1.0 + tl.exp(-zv))
        tl.store(sumsq + b * stride_ss_b + h * tl.num_programs(1) + pid_p, tl.sum(out * out, axis=0))
    tl.store(y + b * stride_y_b + h * stride_y_h + offs_p, out.to(y.dtype.element_ty), mask=mask_p)


def ssd_decode(
    state: Tensor, x: Tensor, dt: Tensor, A_log: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
    dt_bias: Tensor | None = None, dt_limit: tuple[float, float] = (0.0, math.inf),
) -> Tensor:
    """Same contract as `reference.ssd_decode`: state (b, h, p, n), updated in place; x (b, h, p);
    dt (b, h) before softplus; B, C (b, g, n). Returns y (b, h, p) in x's dtype."""
    bsz, h, p, n = state.shape
    g = B.size(1)
    if state.stride(-1) != 1 or state.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError("ssd_decode needs a float32/bf16/fp16 state with a contiguous last dimension")
    if any(t.stride(-1) != 1 for t in (x, dt, B, C)) or B.stride() != C.stride():
        raise ValueError("ssd_decode needs x, dt, B, C with a contiguous last dimension and B, C of equal strides")
    y = torch.empty(bsz, h, p, device=x.device, dtype=x.dtype)
    BLOCK_N = triton.next_power_of_2(n)
    BLOCK_P = max(1, min(triton.next_power_of_2(p), 4096 // BLOCK_N))
    grid = (bsz * h, triton.cdiv(p, BLOCK_P))
    _ssd_decode_kernel[grid](
        state, x, dt, dt_bias if dt_bias is not None else dt, A_log, B, C, D if D is not None else A_log, y,
        state.stride(0), state.stride(1), state.stride(2),
        x.stride(0), x.stride(1),
        dt.stride(0),
        B.stride(0), B.stride(1),
        y.stride(0), y.stride(1),
        h, h // g, p, n, float(dt_limit[0]), float(dt_limit[1]),
        y, 0, y, 0,
        HAS_D=D is not None, HAS_DT_BIAS=dt_bias is not None, GATE=False, BLOCK_P=BLOCK_P, BLOCK_N=BLOCK_N,
        num_warps=4,
    )
    return y
