"""The Triton kernels of the fused decode step; ops/fused_step.py holds the design, the launch tiles and the
launchers, and the unfused step (`Mamba2Block.step`) is their spec."""

from __future__ import annotations

import triton
import triton.language as tl


# --- shared pieces -------------------------------------------------------------------------------------------
@triton.jit
def _mac_gemv(acc, x, w):
    """acc (BM, BN, BK) += x (BM, BK) * w (BN, BK) on CUDA cores, x in float32 (a few rows): products only,
    summed over K once after the loop (a reduction per loop step costs more than the loads)."""
    return acc + x[:, None, :] * w[None, :, :].to(tl.float32)


@triton.jit
def _mac_dot(acc, x, w, IEEE: tl.constexpr):
    """acc (BM, BN) += x (BM, BK) @ w (BN, BK)^T on tensor cores, x in w's dtype (float32 weights in full
    precision: tests hold them to the reference)."""
    if IEEE:
        return acc + tl.dot(x, tl.trans(w), input_precision="ieee")
    return acc + tl.dot(x, tl.trans(w))


@triton.jit
def _conv_load(rm, c, cmask, is_conv, conv, conv_w, conv_b, stride_cm, stride_cc, stride_cw,
               HAS_CONV_BIAS: tl.constexpr):
    """What the conv step of conv channels c needs besides the new values: the window's slots 1-3 (BM, BC)
    and the channel's four weights and bias (BC,), in float32."""
    base = conv + rm[:, None] * stride_cm + c[None, :] * stride_cc
    s1 = tl.load(base + 1, mask=cmask, other=0.0).to(tl.float32)
    s2 = tl.load(base + 2, mask=cmask, other=0.0).to(tl.float32)
    s3 = tl.load(base + 3, mask=cmask, other=0.0).to(tl.float32)
    wc = conv_w + c * stride_cw
    w0 = tl.load(wc, mask=is_conv, other=0.0).to(tl.float32)
    w1 = tl.load(wc + 1, mask=is_conv, other=0.0).to(tl.float32)
    w2 = tl.load(wc + 2, mask=is_conv, other=0.0).to(tl.float32)
    w3 = tl.load(wc + 3, mask=is_conv, other=0.0).to(tl.float32)
    if HAS_CONV_BIAS:
        bias = tl.load(conv_b + c, mask=is_conv, other=0.0).to(tl.float32)
    else:
        bias = tl.zeros_like(w0)
    return s1, s2, s3, w0, w1, w2, w3, bias


@triton.jit
def _conv_apply(v, win, rm, c, cmask, conv, stride_cm, stride_cc):
    """The depthwise conv step + SiLU of values v (BM, BC), from `_conv_load`'s window `win`: the channel's
    window becomes [s1, s2, s3, v]. Each element's four slots are read, then written, by one thread, so the
    shift is in place."""
    s1, s2, s3, w0, w1, w2, w3, bias = win
    y = s1 * w0[None, :] + s2 * w1[None, :] + s3 * w2[None, :] + v * w3[None, :] + bias[None, :]
    base = conv + rm[:, None] * stride_cm + c[None, :] * stride_cc
    cdt = conv.dtype.element_ty
    tl.store(base, s1.to(cdt), mask=cmask)
    tl.store(base + 1, s2.to(cdt), mask=cmask)
    tl.store(base + 2, s3.to(cdt), mask=cmask)
    tl.store(base + 3, v.to(cdt), mask=cmask)
    return y / (1.0 + tl.exp(-y))


@triton.jit
def _rstd(sumsq, n_sumsq, rm, mm, K, eps, BLOCK_SS: tl.constexpr):
    """(BM,) 1 / sqrt(mean square + eps) of each row, from its n_sumsq partial sums of squares."""
    rs = tl.arange(0, BLOCK_SS)
    ss = tl.load(sumsq + rm[:, None] * n_sumsq + rs[None, :], mask=mm[:, None] & (rs < n_sumsq)[None, :], other=0.0)
    return 1.0 / tl.sqrt(tl.sum(ss, axis=1) / K + eps)


# --- kernels -------------------------------------------------------------------------------------------------
@triton.jit
def _norm_kernel(parts, stride_pp, stride_pm, res, stride_rm, res_out, x_out, weight, eps, K,
                 N_PARTS: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_K: tl.constexpr):
    """One row: h = sum_s parts[s] (+ res) -> res_out (float32); x_out = h * rsqrt(mean(h^2) + eps) * weight."""
    m = tl.program_id(0)
    offs = tl.arange(0, BLOCK_K)
    mask = offs < K
    h = tl.zeros([BLOCK_K], tl.float32)
    for s in tl.static_range(N_PARTS):
        h += tl.load(parts + s * stride_pp + m * stride_pm + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RES:
        h += tl.load(res + m * stride_rm + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(res_out + m * K + offs, h, mask=mask)
    rstd = 1.0 / tl.sqrt(tl.sum(h * h, axis=0) / K + eps)
    w = tl.load(weight + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(x_out + m * K + offs, (h * rstd * w).to(x_out.dtype.element_ty), mask=mask)


@triton.jit
def _in_proj_gemv_kernel(h, stride_hm, sumsq, n_sumsq, norm_w, eps, w, out, conv, conv_w, conv_b,
                         M, N, K, conv_lo, conv_hi, stride_cm, stride_cc, stride_cw,
                         HAS_CONV_BIAS: tl.constexpr, BLOCK_SS: tl.constexpr, DOT: tl.constexpr,
                         IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                         EARLY_CONV: tl.constexpr = False):
    """out (M, N) = RMSNorm(h) @ w^T; the columns in [conv_lo, conv_hi) then take the conv step + SiLU.
    DOT: the products on tensor cores (the rows padded to BLOCK_M >= 16), else on CUDA cores. EARLY_CONV: the
    conv windows read before the loop, their latency hidden under it (else after it, fewer live registers)."""
    pid_n = tl.program_id(0)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mm, mn = rm < M, rn < N
    is_conv = (rn >= conv_lo) & (rn < conv_hi) & mn
    c = tl.where(is_conv, rn - conv_lo, 0)
    cmask = mm[:, None] & is_conv[None, :]
    if EARLY_CONV:
        win = _conv_load(rm, c, cmask, is_conv, conv, conv_w, conv_b, stride_cm, stride_cc, stride_cw,
                         HAS_CONV_BIAS)
    rstd = _rstd(sumsq, n_sumsq, rm, mm, K, eps, BLOCK_SS)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_N, 1 if DOT else BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mk = rk < K
        ht = tl.load(h + rm[:, None] * stride_hm + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
        g = tl.load(norm_w + rk, mask=mk, other=0.0).to(tl.float32)
        # the normed input rounded to the weight dtype, as the unfused step feeds its GEMM
        xt = (ht.to(tl.float32) * rstd[:, None] * g[None, :]).to(w.dtype.element_ty)
        wt = tl.load(w + rn[:, None] * K + rk[None, :], mask=mn[:, None] & mk[None, :], other=0.0)
        if DOT:
            acc = _mac_dot(acc, xt, wt, IEEE)
        else:
            acc3 = _mac_gemv(acc3, xt.to(tl.float32), wt)
    if not DOT:
        acc = tl.sum(acc3, axis=2)
    v = acc.to(out.dtype.element_ty).to(tl.float32)  # in_proj's output as the unfused step has it
    if not EARLY_CONV:
        win = _conv_load(rm, c, cmask, is_conv, conv, conv_w, conv_b, stride_cm, stride_cc, stride_cw,
                         HAS_CONV_BIAS)
    y = _conv_apply(v, win, rm, c, cmask, conv, stride_cm, stride_cc)
    result = tl.where(is_conv[None, :], y, v)
    tl.store(out + rm[:, None] * N + rn[None, :], result.to(out.dtype.element_ty), mask=mm[:, None] & mn[None, :])


@triton.jit
def _conv_kernel(zx, stride_zm, conv, conv_w, conv_b, M, conv_lo, n_conv, stride_cm, stride_cc, stride_cw,
                 HAS_CONV_BIAS: tl.constexpr, BLOCK_C: tl.constexpr):
    """In place, one row per program: the conv step + SiLU of zx's columns [conv_lo, conv_lo + n_conv). Each
    channel's 4-slot window is read as one contiguous piece (coalesced), then written back shifted by one."""
    m = tl.program_id(1)
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    j = tl.arange(0, 4)
    is_conv = c < n_conv
    ptrs = zx + m * stride_zm + conv_lo + c
    v = tl.load(ptrs, mask=is_conv, other=0.0).to(tl.float32)
    win = conv + m * stride_cm + c[:, None] * stride_cc + j[None, :]
    wmask = is_conv[:, None] & (j[None, :] >= 1)
    s = tl.load(win, mask=wmask, other=0.0).to(tl.float32)  # slots 1..3 (slot 0 leaves the window)
    # slot j's weight is w[j - 1] in the shifted window; the new value takes w[3]
    wj = tl.load(conv_w + c[:, None] * stride_cw + j[None, :] - 1, mask=wmask, other=0.0).to(tl.float32)
    y = tl.sum(s * wj, axis=1) + v * tl.load(conv_w + c * stride_cw + 3, mask=is_conv, other=0.0).to(tl.float32)
    if HAS_CONV_BIAS:
        y += tl.load(conv_b + c, mask=is_conv, other=0.0).to(tl.float32)
    tl.debug_barrier()  # every window read before any is shifted
    cdt = conv.dtype.element_ty
    tl.store(win - 1, s.to(cdt), mask=wmask)
    tl.store(win + 3 - j[None, :], v.to(cdt)[:, None], mask=is_conv[:, None] & (j[None, :] == 3))
    tl.store(ptrs, (y / (1.0 + tl.exp(-y))).to(zx.dtype.element_ty), mask=is_conv)


@triton.jit
def _out_proj_body(y, sumsq, n_sumsq, gnorm_w, eps, w, out, res, stride_rm, sumsq_out, M, N, K, k_split,
                   GEMV: tl.constexpr, RESIDUAL: tl.constexpr, IEEE: tl.constexpr, BLOCK_SS: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mm, mn = rm < M, rn < N
    rstd = _rstd(sumsq, n_sumsq, rm, mm, K, eps, BLOCK_SS)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc3 = tl.zeros([BLOCK_M, BLOCK_N, BLOCK_K if GEMV else 1], tl.float32)
    k_lo = pid_s * k_split
    for k0 in range(k_lo, k_lo + k_split, BLOCK_K):
        rk = k0 + tl.arange(0, BLOCK_K)
        mk = (rk < K) & (rk < k_lo + k_split)
        yt = tl.load(y + rm[:, None] * K + rk[None, :], mask=mm[:, None] & mk[None, :], other=0.0)
        g = tl.load(gnorm_w + rk, mask=mk, other=0.0).to(tl.float32)
        xt = (yt * rstd[:, None] * g[None, :]).to(w.dtype.element_ty)
        wt = tl.load(w + rn[:, None] * K + rk[None, :], mask=mn[:, None] & mk[None, :], other=0.0)
        if GEMV:
            acc3 = _mac_gemv(acc3, xt.to(tl.float32), wt)
        else:
            acc = _mac_dot(acc, xt, wt, IEEE)
    if GEMV:
        acc = tl.sum(acc3, axis=2)
    omask = mm[:, None] & mn[None, :]
    if RESIDUAL:  # h' = h + out_proj(...), and its sums of squares over this column tile
        acc += tl.load(res + rm[:, None] * stride_rm + rn[None, :], mask=omask, other=0.0).to(tl.float32)
        tl.store(out + rm[:, None] * N + rn[None, :], acc, mask=omask)
        tl.store(sumsq_out + rm * tl.num_programs(0) + pid_n, tl.sum(acc * acc, axis=1), mask=mm)
    else:  # partial sums over this slice of K
        tl.store(out + pid_s * M * N + rm[:, None] * N + rn[None, :], acc, mask=omask)


@triton.jit
def _out_proj_gemv_kernel(y, sumsq, n_sumsq, gnorm_w, eps, w, out, res, stride_rm, sumsq_out, M, N, K, k_split,
                          GEMV: tl.constexpr, IEEE: tl.constexpr, BLOCK_SS: tl.constexpr, BLOCK_M: tl.constexpr,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The few-rows path's out_proj: residual added, sums of squares per column tile; GEMV: products on CUDA
    cores, else on tensor cores (rows padded to BLOCK_M >= 16)."""
    _out_proj_body(y, sumsq, n_sumsq, gnorm_w, eps, w, out, res, stride_rm, sumsq_out, M, N, K, k_split,
                   GEMV, True, IEEE, BLOCK_SS, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def _out_proj_dot_kernel(y, sumsq, n_sumsq, gnorm_w, eps, w, out, M, N, K, k_split,
                         GEMV: tl.constexpr, IEEE: tl.constexpr, BLOCK_SS: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    _out_proj_body(y, sumsq, n_sumsq, gnorm_w, eps, w, out, out, 0, out, M, N, K, k_split,
                   GEMV, False, IEEE, BLOCK_SS, BLOCK_M, BLOCK_N, BLOCK_K)
