"""The scan op's chain rule in one pass (ops/fla.py's `_scan_bwd`): from fla's gradients of v = x * dt and
g = dt * A, those of x, dt and A. `fla._chain_values_and_decay` is the spec (torch, float32 sums); in torch it
reads and writes the (b, l, h, p) tensors about eight times (float32 copies of dv and x, the products, the
casts back), this kernel reads dv and x once and writes dx once, with the same float32 arithmetic."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

_ROWS = 64  # (b, l, h) rows a program takes; headdim is one power-of-two tile


@triton.jit
def _chain_kernel(dv, x, dt, dg, A, dx, ddt, n_rows, n_heads, P: tl.constexpr, BR: tl.constexpr,
                  BP: tl.constexpr):
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    p = tl.arange(0, BP)
    rmask = r < n_rows
    mask = rmask[:, None] & (p[None, :] < P)
    off = r[:, None].to(tl.int64) * P + p[None, :]
    dvv = tl.load(dv + off, mask=mask, other=0.0).to(tl.float32)
    xv = tl.load(x + off, mask=mask, other=0.0).to(tl.float32)
    dtv = tl.load(dt + r, mask=rmask, other=0.0).to(tl.float32)
    dgv = tl.load(dg + r, mask=rmask, other=0.0).to(tl.float32)
    a = tl.load(A + r % n_heads, mask=rmask, other=0.0).to(tl.float32)
    tl.store(dx + off, (dvv * dtv[:, None]).to(dx.dtype.element_ty, fp_downcast_rounding="rtne"), mask=mask)
    tl.store(ddt + r, (tl.sum(dvv * xv, 1) + dgv * a).to(ddt.dtype.element_ty), mask=rmask)


def chain_values_and_decay(dv: Tensor, dg: Tensor, x: Tensor, dt: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`fla._chain_values_and_decay` on CUDA tensors: dx (x's dtype), d(dt) (dt's dtype), dA (A's dtype), each
    contiguous. dv, x: (b, l, h, p); dg, dt: (b, l, h); A: (h)."""
    if dv.shape != x.shape or dg.shape != dt.shape or x.shape[:-1] != dt.shape or A.shape != dt.shape[-1:]:
        raise ValueError(f"chain rule shapes: dv {tuple(dv.shape)}, x {tuple(x.shape)}, dg {tuple(dg.shape)}, "
                         f"dt {tuple(dt.shape)}, A {tuple(A.shape)}; expected (b, l, h, p) twice, (b, l, h) "
                         f"twice and (h)")
    dv, x, dg, dt, A = (t.contiguous() for t in (dv, x, dg, dt, A))
    p, h = x.size(-1), x.size(-2)
    rows = dt.numel()
    dx, ddt = torch.empty_like(x), torch.empty_like(dt)
    if rows:
        _chain_kernel[(triton.cdiv(rows, _ROWS),)](dv, x, dt, dg, A, dx, ddt, rows, h, P=p, BR=_ROWS,
                                                   BP=triton.next_power_of_2(p))
    dA = (dg.float() * dt.float()).sum((0, 1)).to(A.dtype)
    return dx, ddt, dA
