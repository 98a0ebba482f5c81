"""A Mamba-2 layer's decode step in three or five Triton kernels (GPU); the unfused step (`Mamba2Block.step`
over the reference kernels) is its spec, and `decode_step` must match it in tests.

Up to GEMV_ROWS rows (a batch-1 text answer, a few streams): each projection is one kernel with its norm, its
products on CUDA cores (one row) or on tensor cores with the rows padded to 16 (more rows, 16-bit weights; the
tile table below), and each layer is three kernels, the residual stream travelling as h (float32) and its sums
of squares:

    in_proj   x = RMSNorm(h) * w_norm (rstd from the sums of squares), rounded to the weight dtype;
              zxbcdt = x @ W_in^T; the xBC columns go on through the conv step (state shifted in place) + SiLU
    ssm       triton_step's state update, y = state . C + D x, then y * SiLU(z) and its sums of squares per
              (row, block of a head's channels)
    out_proj  x = y_gated * rsqrt(mean of squares + eps) * w_gnorm, rounded; h' = h + x @ W_out^T, and the
              sums of squares of h' per column tile, for the next in_proj's norm

More rows (guided images: 2 per image): the GEMMs run on tensor cores and in_proj is cuBLAS's, so the norm
and the conv step are kernels of their own, and out_proj splits K to fill the GPU, leaving partial sums that
the next norm adds up: norm, in_proj, conv, ssm, out_proj.

Either way ten kernels per layer become three or five. Only what Mamba-2 checkpoints use is fused:
one norm group (ngroups = 1), a conv of width 4, no projection biases; `supports` says so, and the backbone
keeps the unfused step otherwise.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
from torch import Tensor

from .fused_step_kernels import _conv_kernel, _in_proj_gemv_kernel, _norm_kernel, _out_proj_dot_kernel, \
    _out_proj_gemv_kernel
from .triton_step import _ssd_decode_kernel

D_CONV = 4
GEMV_ROWS = 8  # CUDA-core (GEMV) tiles hold at most this many rows; float32 weights take the few-rows path up to it
# 16-bit weights: batch sizes up to this take the few-rows path (three kernels per layer, tensor-core tiles
# from 2 rows), more the five-kernel GEMM path
FEW_ROWS = 8
_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def supports(config, in_weight: Tensor, out_weight: Tensor, biases: bool) -> bool:
    """Whether `decode_step` covers this layer (else the caller runs the unfused step)."""
    return (config.ngroups == 1 and config.d_conv == D_CONV and not biases and in_weight.is_cuda
            and in_weight.dtype in _FLOAT_DTYPES and out_weight.dtype == in_weight.dtype
            and in_weight.is_contiguous() and out_weight.is_contiguous())  # the kernels index rows as K-wide


# --- tile shapes ---------------------------------------------------------------------------------------------
# Chosen, not tuned per call: autotuning compiles every candidate on each new batch size (minutes on a cold
# cache). The projections are memory-bound at these batch sizes, so the tiles only need enough programs to
# cover the GPU twice (in_proj: 8512 / 32 columns; out_proj: 2048 / 8) and about 16 KB of weights per loop
# step; GEMV tiles hold BLOCK_M x BLOCK_N x BLOCK_K float32 products, kept to 8k (64 per thread).
_GEMV_PRODUCTS = 8192
# The few-rows projections' launches, by rows: DOT runs the products on tensor cores (rows padded to 16), else
# on CUDA cores; BLOCK_K None: _gemv_block_k's choice. Measured on an H200 at the 1.3B shape (bf16, graphed, 8
# weight copies so L2 holds none; benchmarks/fused_step_tiles.py, results/fused_step_tiles.json), us per call:
#   in_proj (K 2048, N 8512)   1 row 14.3 CUDA cores / 15.0 best tensor-core tile; 2, 4, 8 rows 22.7, 31.0, 52.3 / 16.1
#   out_proj (K 4096, N 2048)  1 row 8.7 / 12.1; 2 rows 11.1 / 12.1; 4, 8 rows 17.8, 28.6 / 12.1
# and a wider sweep of one-row CUDA-core tiles (results/fused_step_tiles_rows_1_16_32.json, another H200):
#   in_proj 16 columns x 256 of K 13.7 against 14.1 for the earlier 32 x 256; out_proj 4 x 1024 7.9 against 8.3
# The one-row launches over the whole graphed 48-layer step (profile_decode.py; results/
# profile_decode_one_row_variants.json, H200), ms per step: 1.324 as they were (in_proj 16 x 256 at 4 warps, out_proj
# 4 x 1024 at 4), 1.260 with in_proj's conv windows read before its loop (EARLY_CONV), 1.401 with in_proj at 8
# warps, 1.268 with out_proj 8 x 1024 at 8 warps. Alone (gemv_variants.py --only fused, results/
# gemv_variants_fused.json): in_proj 13.6 -> 12.9 us early, 19.1 early at 8 warps; out_proj 8.5 -> 8.4 us.
_IN_TILE_ONE_ROW = {"DOT": False, "BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3, "EARLY_CONV": True}
_IN_TILE = {"DOT": True, "BLOCK_N": 32, "BLOCK_K": 256, "num_warps": 4, "num_stages": 3}  # 2 rows and more
_OUT_GEMV_ROWS = 2  # out_proj on CUDA cores up to this many rows
_OUT_TILE_ONE_ROW = {"DOT": False, "BLOCK_N": 8, "BLOCK_K": 1024, "num_warps": 8, "num_stages": 2}
_OUT_TILE = {"DOT": True, "BLOCK_N": 16, "BLOCK_K": 256, "num_warps": 4, "num_stages": 4}
# float32 weights, up to GEMV_ROWS rows on CUDA cores: BLOCK_K from the register budget (_gemv_block_k)
_IN_TILE_FP32 = {"DOT": False, "BLOCK_N": 32, "BLOCK_K": None, "num_warps": 4, "num_stages": 3}
_OUT_TILE_FP32 = {"DOT": False, "BLOCK_N": 8, "BLOCK_K": None, "num_warps": 4, "num_stages": 2}
# More than GEMV_ROWS rows on the few-rows path (FEW_ROWS above 8): the rows padded to 16, 32 or 64.
_IN_TILE_MANY = dict(_IN_TILE)
_OUT_TILE_MANY = dict(_OUT_TILE)
# float32 weights (a test or reference mode) keep the CUDA-core tiles: the tensor-core ones would need 128-144 KB
# of shared memory there, more than many GPUs have.
# The GEMM path's out_proj: 16-bit weights at 32 rows (16 guided images), 8 K slices, on an H200
# (benchmarks/gemv_variants.py, results/gemv_variants.json): 128 x 64 tiles 4 stages deep 7.7 us, the earlier
# 64 x 64 x 3 8.5, cuBLAS (input already normed) 9.9. float32 weights keep the smaller tile (shared memory).
_DOT_TILE = {"BLOCK_N": 128, "BLOCK_K": 64, "num_warps": 4, "num_stages": 4}
_DOT_TILE_FP32 = {"BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}
_K_GRANULE = _DOT_TILE["BLOCK_K"]  # out_proj's K slices are whole numbers of K tiles
# The norm kernel (one program per row, K = d_model) at 4 / 8 / 16 warps, 32 rows: 4.2 / 3.2 / 2.5 us (same file).
_NORM_THREAD_ELEMENTS = 4  # warps = K / (32 x this), 4 to 16


def _gemv_block_k(block_m: int, block_n: int, k: int) -> int:
    return max(16, min(triton.next_power_of_2(k), _GEMV_PRODUCTS // (block_m * block_n)))


# --- launchers -----------------------------------------------------------------------------------------------
@functools.cache
def _multiprocessors(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # Triton's CPU interpreter
    return torch.cuda.get_device_properties(device).multi_processor_count


def few_rows(m: int, dtype: torch.dtype) -> bool:
    """Whether m rows take the three-kernel path for weights of this dtype."""
    return m <= (GEMV_ROWS if dtype == torch.float32 else max(FEW_ROWS, GEMV_ROWS))


def _block_m(m: int) -> int:
    return triton.next_power_of_2(m) if m <= GEMV_ROWS else 16 if m <= 16 else 32 if m <= 32 else 64


def _dot_tile(dtype: torch.dtype) -> dict:
    return _DOT_TILE_FP32 if dtype == torch.float32 else _DOT_TILE


def _k_split(m: int, n: int, k: int, device: torch.device, block_n: int) -> int:
    """Columns per slice of K for the GEMM out_proj, so that its grid covers the GPU about twice (2048 outputs
    make 16-32 column tiles per row tile); at most 8 slices, each a whole number of K tiles."""
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, _block_m(m))
    want = max(1, 2 * _multiprocessors(device) // tiles)
    split = 1
    while split * 2 <= min(want, 8) and k % (split * 2 * _K_GRANULE) == 0:
        split *= 2
    return k // split


def norm(parts: Tensor, residual: Tensor | None, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """parts (S, M, K): h = parts.sum(0) (+ residual (M, K)). Returns (RMSNorm(h) * weight in the weight's
    dtype, h in float32: the next residual)."""
    s, m, k = parts.shape
    res_out = torch.empty(m, k, device=parts.device, dtype=torch.float32)
    x = torch.empty(m, k, device=parts.device, dtype=weight.dtype)
    res = residual if residual is not None else res_out
    block_k = triton.next_power_of_2(k)
    warps = max(4, min(16, block_k // (32 * _NORM_THREAD_ELEMENTS)))
    _norm_kernel[(m,)](parts, parts.stride(0), parts.stride(1), res, res.stride(0), res_out, x, weight, eps, k,
                       N_PARTS=s, HAS_RES=residual is not None, BLOCK_K=block_k, num_warps=warps)
    return x, res_out


def _few_rows_launch(tile: dict, m: int, k: int) -> tuple[bool, dict]:
    """A few-rows projection's tile (`_IN_TILE` and kin) for m rows and K columns: (DOT, the launch's
    BLOCK_M / BLOCK_N / BLOCK_K / num_warps / num_stages); tensor-core tiles pad the rows to at least 16."""
    launch = dict(tile)
    dot = launch.pop("DOT")
    launch["BLOCK_M"] = max(16, _block_m(m)) if dot else _block_m(m)
    launch["BLOCK_K"] = launch.get("BLOCK_K") or _gemv_block_k(launch["BLOCK_M"], launch["BLOCK_N"], k)
    return dot, launch


def _check_conv(conv_state: Tensor, conv_weight: Tensor) -> None:
    if conv_state.size(-1) != D_CONV or conv_state.stride(-1) != 1 or conv_weight.stride(-1) != 1:
        raise ValueError(f"the fused step needs a conv of width {D_CONV} with a contiguous last dimension")


def in_proj_gemv(h: Tensor, sumsq: Tensor, norm_weight: Tensor, eps: float, weight: Tensor, conv_state: Tensor,
                 conv_weight: Tensor, conv_bias: Tensor | None, conv_lo: int, tile: dict | None = None) -> Tensor:
    """RMSNorm(h) (M <= GEMV_ROWS, K), its rstd from the row sums of squares sumsq (M, n), @ weight (N, K)^T ->
    (M, N) in the weight's dtype, the columns [conv_lo, conv_lo + C) through the conv step + SiLU;
    conv_state (M, C, 4) shifted in place, conv_weight (C, 4). `tile`: the launch (default: `_IN_TILE_FP32` for
    float32 weights, `_IN_TILE_ONE_ROW` for one row, `_IN_TILE` up to GEMV_ROWS rows, else `_IN_TILE_MANY`)."""
    m, k = h.shape
    n = weight.size(0)
    _check_conv(conv_state, conv_weight)
    out = torch.empty(m, n, device=h.device, dtype=weight.dtype)
    dot, launch = _few_rows_launch(tile or (_IN_TILE_FP32 if weight.dtype == torch.float32 else _IN_TILE_ONE_ROW
                                            if m == 1 else _IN_TILE if m <= GEMV_ROWS else _IN_TILE_MANY), m, k)
    _in_proj_gemv_kernel[(triton.cdiv(n, launch["BLOCK_N"]),)](
        h, h.stride(0), sumsq, sumsq.size(1), norm_weight, eps, weight, out, conv_state, conv_weight,
        conv_bias if conv_bias is not None else conv_weight, m, n, k, conv_lo, conv_lo + conv_state.size(1),
        conv_state.stride(0), conv_state.stride(1), conv_weight.stride(0), HAS_CONV_BIAS=conv_bias is not None,
        BLOCK_SS=triton.next_power_of_2(sumsq.size(1)), DOT=dot, IEEE=weight.dtype == torch.float32, **launch)
    return out


def conv_columns(zx: Tensor, conv_state: Tensor, conv_weight: Tensor, conv_bias: Tensor | None, conv_lo: int
                 ) -> None:
    """In place: zx[:, conv_lo:conv_lo + C] (M, C) through the conv step + SiLU; conv_state (M, C, 4) shifted."""
    _check_conv(conv_state, conv_weight)
    m, n_conv = conv_state.size(0), conv_state.size(1)
    block_c = 256
    _conv_kernel[(triton.cdiv(n_conv, block_c), m)](
        zx, zx.stride(0), conv_state, conv_weight, conv_bias if conv_bias is not None else conv_weight,
        m, conv_lo, n_conv, conv_state.stride(0), conv_state.stride(1), conv_weight.stride(0),
        HAS_CONV_BIAS=conv_bias is not None, BLOCK_C=block_c, num_warps=4)


def ssm_gate(state: Tensor, zxbcdt: Tensor, d_inner: int, d_state: int, A_log: Tensor, D: Tensor | None,
             dt_bias: Tensor | None, dt_limit: tuple[float, float]) -> tuple[Tensor, Tensor]:
    """The SSM step on the conv's output (M, [z | xBC | dt]) with state (M, h, p, n) updated in place.
    Returns y * SiLU(z) (M, d_inner) in float32 and its sums of squares (M, h * blocks per head)."""
    m, h, p, n = state.shape
    if state.stride(-1) != 1 or zxbcdt.stride(-1) != 1:
        raise ValueError("ssm_gate needs a state and an input with a contiguous last dimension")
    # views from each part's first column: the kernel reads them through the row stride (ngroups = 1)
    x, B, C, dt = (zxbcdt[:, start:] for start in (d_inner, 2 * d_inner, 2 * d_inner + d_state,
                                                    2 * d_inner + 2 * d_state))
    block_n = triton.next_power_of_2(n)
    block_p = max(1, min(triton.next_power_of_2(p), 4096 // block_n))
    n_blocks = triton.cdiv(p, block_p)
    y = torch.empty(m, d_inner, device=state.device, dtype=torch.float32)
    sumsq = torch.empty(m, h * n_blocks, device=state.device, dtype=torch.float32)
    row = zxbcdt.stride(0)
    _ssd_decode_kernel[(m * h, n_blocks)](
        state, x, dt, dt_bias if dt_bias is not None else dt, A_log, B, C, D if D is not None else A_log, y,
        state.stride(0), state.stride(1), state.stride(2), row, p, row, row, 0, d_inner, p,
        h, h, p, n, float(dt_limit[0]), float(dt_limit[1]), zxbcdt, row, sumsq, h * n_blocks,
        HAS_D=D is not None, HAS_DT_BIAS=dt_bias is not None, GATE=True, BLOCK_P=block_p, BLOCK_N=block_n,
        num_warps=4,
    )
    return y, sumsq


def out_proj_residual(y: Tensor, sumsq: Tensor, norm_weight: Tensor, eps: float, weight: Tensor, h: Tensor,
                      tile: dict | None = None) -> tuple[Tensor, Tensor]:
    """GEMV path: h + (gated RMSNorm of y, from its sums of squares) @ weight (N, K)^T. Returns the new h
    (M, N) float32 and its sums of squares per column tile (M, N / BLOCK_N). `tile`: the launch (default:
    `_OUT_TILE_FP32` for float32 weights, `_OUT_TILE_ONE_ROW` up to `_OUT_GEMV_ROWS` rows, `_OUT_TILE` up to
    GEMV_ROWS, else `_OUT_TILE_MANY`)."""
    m, k = y.shape
    n = weight.size(0)
    dot, launch = _few_rows_launch(tile or (_OUT_TILE_FP32 if weight.dtype == torch.float32 else _OUT_TILE_ONE_ROW
                                            if m <= _OUT_GEMV_ROWS else _OUT_TILE if m <= GEMV_ROWS
                                            else _OUT_TILE_MANY), m, k)
    tiles = triton.cdiv(n, launch["BLOCK_N"])
    out = torch.empty(m, n, device=y.device, dtype=torch.float32)
    sumsq_out = torch.empty(m, tiles, device=y.device, dtype=torch.float32)
    _out_proj_gemv_kernel[(tiles, 1, 1)](y, sumsq, sumsq.size(1), norm_weight, eps, weight, out, h, h.stride(0),
                                         sumsq_out, m, n, k, k, GEMV=not dot, IEEE=weight.dtype == torch.float32,
                                         BLOCK_SS=triton.next_power_of_2(sumsq.size(1)), **launch)
    return out, sumsq_out


def out_proj_partials(y: Tensor, sumsq: Tensor, norm_weight: Tensor, eps: float, weight: Tensor) -> Tensor:
    """GEMM path: (gated RMSNorm of y) @ weight (N, K)^T as float32 partial sums (S, M, N) over S slices of
    K (their sum is the projection)."""
    m, k = y.shape
    n = weight.size(0)
    tile = _dot_tile(weight.dtype)
    k_split = _k_split(m, n, k, y.device, tile["BLOCK_N"])
    out = torch.empty(k // k_split, m, n, device=y.device, dtype=torch.float32)
    bm = _block_m(m)
    grid = (triton.cdiv(n, tile["BLOCK_N"]), triton.cdiv(m, bm), k // k_split)
    _out_proj_dot_kernel[grid](y, sumsq, sumsq.size(1), norm_weight, eps, weight, out, m, n, k, k_split, GEMV=False,
                               IEEE=weight.dtype == torch.float32, BLOCK_SS=triton.next_power_of_2(sumsq.size(1)),
                               BLOCK_M=bm, **tile)
    return out


def decode_step(blocks, in_weights: list[Tensor], embeds: Tensor, conv: Tensor, ssm: Tensor, final_weight: Tensor,
                final_eps: float) -> Tensor:
    """One token through every block: embeds (M, d_model) -> the final norm's output (M, d_model) in the
    weights' dtype. blocks: the backbone's Mamba2Blocks; in_weights: each in_proj's matrix for the active
    route; conv (n_layer, M, C, 4) and ssm (n_layer, M, h, p, n) are updated in place."""
    m = embeds.size(0)
    embeds = embeds.contiguous()
    if few_rows(m, in_weights[0].dtype):
        h = embeds
        # one reduction kernel where .float().pow(2).sum() took three
        sumsq = torch.linalg.vector_norm(embeds, dim=-1, keepdim=True, dtype=torch.float32).square()
        for i, (block, w) in enumerate(zip(blocks, in_weights)):
            mix, c = block.mixer, block.mixer.config
            zxbcdt = in_proj_gemv(h, sumsq, block.norm.weight, block.norm.eps, w, conv[i], mix.conv1d.weight[:, 0],
                                  mix.conv1d.bias, c.d_inner)
            y, ssq = ssm_gate(ssm[i], zxbcdt, c.d_inner, c.d_state, mix.A_log, mix.D, mix.dt_bias, c.dt_limit)
            h, sumsq = out_proj_residual(y, ssq, mix.norm.weight, mix.norm.eps, mix.out_proj.weight, h)
        # one kernel reading h once; taking the last out_proj's sums of squares instead would save arithmetic only
        return norm(h[None], None, final_weight, final_eps)[0]
    parts, residual = embeds[None], None
    for i, (block, w) in enumerate(zip(blocks, in_weights)):
        mix, c = block.mixer, block.mixer.config
        x, residual = norm(parts, residual, block.norm.weight, block.norm.eps)
        zxbcdt = F.linear(x, w)
        conv_columns(zxbcdt, conv[i], mix.conv1d.weight[:, 0], mix.conv1d.bias, c.d_inner)
        y, ssq = ssm_gate(ssm[i], zxbcdt, c.d_inner, c.d_state, mix.A_log, mix.D, mix.dt_bias, c.dt_limit)
        parts = out_proj_partials(y, ssq, mix.norm.weight, mix.norm.eps, mix.out_proj.weight)
    return norm(parts, residual, final_weight, final_eps)[0]
