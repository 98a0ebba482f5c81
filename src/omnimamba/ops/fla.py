"""GPU backend on pure-Triton kernels: flash-linear-attention (fla) and our fused decode step.

Mamba-2's SSD is simple GLA with a per-head scalar decay: q = C, k = B, v = x * dt, log-decay g = dt * A,
scale 1, plus D * x. The scan, the causal conv (whole sequence and one step), the fused residual add +
RMSNorm and the gated RMSNorm run on fla; the decode step of the SSM is `triton_step.ssd_decode`. `ssd_step`
(the spec's primitive, unused by the model) stays the reference one.
"""

from __future__ import annotations

import functools
import math
import re
import threading
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference
from .fla_pins import pin as _pin_configs
from .reference import ssd_step  # noqa: F401


def _cuda_or_reference(kernel):
    """This backend's `kernel` where its first argument is on a GPU, else the reference's of the same name:
    'auto' picks this backend by the machine, so a model kept on the CPU of a machine with a GPU (the backbone
    demo, a CPU evaluation) would otherwise hand CPU tensors to Triton."""
    fallback = getattr(reference, kernel.__name__)

    @functools.wraps(kernel)
    def dispatch(first: Tensor, *args, **kwargs):
        return (kernel if first.is_cuda else fallback)(first, *args, **kwargs)

    return dispatch


# Decode steps may run each block as ops/fused_step.py's fused kernels (Mamba2Backbone.step checks this flag).
FUSED_DECODE = True


def is_available() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import fla.ops.simple_gla  # noqa: F401
    except ImportError:
        return False
    return True


# fla #640: on Hopper, Triton 3.4.0 to 3.7.0 miscompile fla's gated backward (reported at 64-wide K tiles), so
# fla 0.6 refuses it there unless tilelang is installed. On Hopper fla tiles K as one block of up to 128; with
# K = 128 exactly and V <= 128 (Mamba-2's d_state 128, headdim 64) tests/test_ops_gpu.py checks its gradients
# against a float64 reference scan, so we run it with the refusal lifted; a smaller d_state is zero-padded to
# 128 (the padded columns add nothing to C.B and their gradients are dropped). Other shapes use the
# reference scan's backward.
VERIFIED_K = 128
VERIFIED_MAX_V = 128
VERIFIED_FLA = "0.6."


@functools.cache
def _hopper_refusal() -> bool:
    """True where fla refuses its gated scan backward (Hopper, Triton 3.4.0 to 3.7.0, no tilelang)."""
    import importlib.util

    import triton

    if importlib.util.find_spec("tilelang") is not None or torch.cuda.get_device_capability()[0] != 9:
        return False
    version = tuple(int(part) for part in re.findall(r"\d+", triton.__version__)[:3])
    return (3, 4, 0) <= version < (3, 7, 1)


@functools.cache
def scan_backward(d_state: int, headdim: int) -> str:
    """Which backward the scan gets for these sizes on this machine: 'fla', 'fla-verified' (the refusal of
    fla #640 lifted at the verified tile shape, d_state zero-padded to 128 where smaller) or 'reference'."""
    if not _hopper_refusal():
        return "fla"
    import fla

    verified = d_state <= VERIFIED_K and headdim <= VERIFIED_MAX_V and fla.__version__.startswith(VERIFIED_FLA)
    return "fla-verified" if verified else "reference"


_refusal_lock = threading.Lock()
_CHUNK = 64  # fla's chunk length for simple GLA (the result does not depend on it)


# The scan as two custom operators (forward, backward) with a registered autograd formula rather than fla's
# autograd.Function: torch.compile sees one opaque op with known output shapes (no graph break), so a whole
# Mamba-2 block compiles as one graph around it (Mamba2Backbone.compile_blocks). Eager runs the same two ops.
# The op takes x, dt and A rather than fla's v = x * dt and g = dt * A, and returns their gradients itself:
# with those products and their backward left to inductor, torch 2.11's generated code gave dt a wrong
# gradient at sequence lengths off fla's 64-token chunks (a 130m-wide model's dt_bias gradient 2.3e2 and 5.6e3
# times off in two runs at length 149, right at 128; eager, dynamo and AOTAutograd without inductor all right:
# benchmarks/results/compiled_grad_bisect*.json). Inside the op they run eagerly; v is recomputed in the
# backward rather than saved.
def _values(x: Tensor, dt: Tensor) -> Tensor:
    return (x * dt[..., None].to(x.dtype)).contiguous()


@torch.library.custom_op("omnimamba::ssd_scan_fwd", mutates_args=())
def _scan_fwd(x: Tensor, dt: Tensor, A: Tensor, q: Tensor, k: Tensor, state0: Tensor | None, lift_refusal: bool
              ) -> tuple[Tensor, Tensor, Tensor]:
    """fla's chunked simple GLA forward with v = x * dt, log-decay g = dt * A, scale 1, state (b, h, V, K): (o,
    final state, g's chunk-local cumsum pre-scaled to base 2, which the backward reads). `lift_refusal` is the
    backward's (see `_scan_bwd`)."""
    from fla.ops.simple_gla.chunk import chunk_simple_gla_fwd
    from fla.ops.utils import chunk_local_cumsum
    from fla.ops.utils.constant import RCP_LN2

    # fla's kernels index their inputs as contiguous; under torch.compile inductor picks the strides it passes
    v, g = _values(x, dt), (dt.float() * A.float()).contiguous()
    q, k = q.contiguous(), k.contiguous()
    with torch.cuda.device(q.device):
        g_cum = chunk_local_cumsum(g, chunk_size=_CHUNK, scale=RCP_LN2)
        o, ht = chunk_simple_gla_fwd(q, k, v, g=g_cum, scale=1.0, initial_state=state0, output_final_state=True,
                                     state_v_first=True, chunk_size=_CHUNK)
    return o.to(x.dtype).contiguous(), ht.float().contiguous(), g_cum.float().contiguous()


@_scan_fwd.register_fake
def _(x, dt, A, q, k, state0, lift_refusal):
    b, _, h, n = k.shape
    return x.new_empty(x.shape), x.new_empty((b, h, x.size(-1), n), dtype=torch.float32), \
        dt.new_empty(dt.shape, dtype=torch.float32)


@torch.library.custom_op("omnimamba::ssd_scan_bwd", mutates_args=())
def _scan_bwd(x: Tensor, dt: Tensor, A: Tensor, q: Tensor, k: Tensor, g_cum: Tensor, state0: Tensor | None,
              do: Tensor, dht: Tensor | None, lift_refusal: bool
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """dx, d(dt), dA, dq, dk and d(state0) (empty without a state0); `lift_refusal`: fla #640's Hopper refusal
    lifted for this call (the verified shape, see `scan_backward`). dt's and A's gradients sum in float32."""
    import fla.ops.common.chunk_o as chunk_o
    from fla.ops.simple_gla.chunk import chunk_simple_gla_bwd
    from fla.ops.utils import chunk_local_cumsum

    v = _values(x, dt)
    q, k, g_cum = q.contiguous(), k.contiguous(), g_cum.contiguous()
    with torch.cuda.device(q.device), _refusal_lock:
        saved = chunk_o.TRITON_ABOVE_3_7_1
        chunk_o.TRITON_ABOVE_3_7_1 = saved or lift_refusal
        try:
            dq, dk, dv, dg, dh0 = chunk_simple_gla_bwd(
                q, k, v, g_cum, None, state0, do.contiguous(), None if dht is None else dht.contiguous(),
                scale=1.0, state_v_first=True, chunk_size=_CHUNK)
        finally:
            chunk_o.TRITON_ABOVE_3_7_1 = saved
        dg = chunk_local_cumsum(dg, chunk_size=_CHUNK, reverse=True).float()
    dx, ddt, dA = _chain_values_and_decay(dv, dg, x, dt, A)
    dh0 = q.new_empty(0, dtype=torch.float32) if dh0 is None else dh0.float().contiguous()
    return dx, ddt, dA, dq.to(q.dtype).contiguous(), dk.to(k.dtype).contiguous(), dh0


def _chain_values_and_decay(dv: Tensor, dg: Tensor, x: Tensor, dt: Tensor, A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The gradients of x (b, l, h, p), dt (b, l, h) and A (h) from those of v = x * dt and g = dt * A; the sums in
    float32 (tests/test_ops_reference.py checks them against autograd on the CPU)."""
    dv, dtf = dv.float(), dt.float()
    dx = (dv * dtf[..., None]).to(x.dtype)
    ddt = ((dv * x.float()).sum(-1) + dg.float() * A.float()).to(dt.dtype)
    dA = (dg.float() * dtf).sum((0, 1)).to(A.dtype)
    return dx.contiguous(), ddt.contiguous(), dA


@_scan_bwd.register_fake
def _(x, dt, A, q, k, g_cum, state0, do, dht, lift_refusal):
    # contiguous, as the real outputs are (empty_like would copy the inputs' strides, which inductor chooses)
    dh0 = q.new_empty(0 if state0 is None else state0.shape, dtype=torch.float32)
    return (x.new_empty(x.shape), dt.new_empty(dt.shape), A.new_empty(A.shape), q.new_empty(q.shape),
            k.new_empty(k.shape), dh0)


def _scan_setup(ctx, inputs, output):
    x, dt, A, q, k, state0, lift_refusal = inputs
    ctx.lift_refusal, ctx.has_state0 = lift_refusal, state0 is not None
    ctx.save_for_backward(x, dt, A, q, k, output[2], state0)


def _scan_backward(ctx, do, dht, _dg_cum):
    x, dt, A, q, k, g_cum, state0 = ctx.saved_tensors
    dx, ddt, dA, dq, dk, dh0 = _scan_bwd(x, dt, A, q, k, g_cum, state0, do, dht, ctx.lift_refusal)
    return dx, ddt, dA, dq, dk, dh0 if ctx.has_state0 else None, None


_scan_fwd.register_autograd(_scan_backward, setup_context=_scan_setup)


def _gla(x: Tensor, dt: Tensor, A: Tensor, q: Tensor, k: Tensor, state0: Tensor | None, verified: bool
         ) -> tuple[Tensor, Tensor]:
    """fla's chunked simple GLA with v = x * dt, g = dt * A, scale 1, state (b, h, V, K); `verified`: K
    zero-padded to VERIFIED_K and the backward run with fla #640's refusal lifted."""
    n = k.size(-1)
    if verified and n < VERIFIED_K:  # F.pad copies even when it adds nothing: only where there is something to add
        pad = (0, VERIFIED_K - n)
        q, k = F.pad(q, pad), F.pad(k, pad)
        state0 = None if state0 is None else F.pad(state0, pad)
    y, final, _ = _scan_fwd(x, dt, A, q, k, state0, verified)
    return y, final[..., :n]


@_cuda_or_reference
def ssd_chunked(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Tensor | None = None,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Same contract as `reference.ssd_chunked`; fla picks its own chunk size (the result does not depend
    on it). Where a gradient is needed and fla's backward is refused at these sizes (see `scan_backward`),
    the reference scan runs instead, with a warning once."""
    _pin_configs()  # Hopper: one launch configuration per kernel instead of autotuning (ops/fla_pins.py)
    tensors = (x, dt, A, B, C, D, initial_state)
    route = "fla"
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        route = scan_backward(B.size(-1), x.size(-1))
    if route == "reference":
        warnings.warn(f"flash-linear-attention's scan backward is refused on Hopper with this Triton version "
                      f"(fla #640) and is verified here only for d_state <= {VERIFIED_K} and headdim <= "
                      f"{VERIFIED_MAX_V} on fla {VERIFIED_FLA}x: training uses the reference scan (slower). "
                      f"Install Triton >= 3.7.1 or tilelang for the fast backward.", stacklevel=2)
        return reference.ssd_chunked(x, dt, A, B, C, chunk_size, D=D, initial_state=initial_state)

    return scan(x, dt, A, B, C, chunk_size, D=D, initial_state=initial_state, verified=route == "fla-verified")


def scan(
    x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, D: Tensor | None = None,
    initial_state: Tensor | None = None, verified: bool = False,
) -> tuple[Tensor, Tensor]:
    """`ssd_chunked` on fla with its route decided (`verified`: 'fla-verified', see `scan_backward`): tensor
    work only, so torch.compile traces it whole (ops/compiled.py). CUDA tensors; `chunk_size` is fla's own."""
    h = x.size(2)
    k = reference.heads_from_groups(B, h, dim=2).to(x.dtype)
    q = reference.heads_from_groups(C, h, dim=2).to(x.dtype)
    state0 = None if initial_state is None else initial_state.float()
    # state_v_first: fla's state is (b, h, V=headdim, K=d_state), our (b, h, p, n) layout.
    y, final = _gla(x, dt, A, q.contiguous(), k.contiguous(), state0, verified=verified)
    if D is not None:
        y = y + (D.to(y.dtype)[:, None] * x)
    return y.to(x.dtype), final.float()


@_cuda_or_reference
def causal_conv(x: Tensor, weight: Tensor, bias: Tensor | None, initial_state: Tensor | None = None
                ) -> tuple[Tensor, Tensor]:
    """Same contract as `reference.causal_conv`: x (b, l, c), weight (c, k), state (b, c, k)."""
    _pin_configs()
    from fla.modules.causal_conv1d import causal_conv1d

    w = weight.to(x.dtype).contiguous()
    b = None if bias is None else bias.to(x.dtype)
    state = None if initial_state is None else initial_state.to(x.dtype).contiguous()
    y, final = causal_conv1d(x.contiguous(), w, b, initial_state=state, output_final_state=True, activation="silu")
    return y, final


@_cuda_or_reference
def conv_step(state: Tensor, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """Same contract as `reference.conv_step`: shifts `state` (b, c, k) in place, x (b, c) -> (b, c)."""
    _pin_configs()
    from fla.modules.causal_conv1d import causal_conv1d_update

    y, _ = causal_conv1d_update(x.to(state.dtype).contiguous(), state, weight=weight.to(state.dtype).contiguous(),
                                bias=None if bias is None else bias.to(state.dtype), activation="silu")
    return y.to(x.dtype)


@_cuda_or_reference
def ssd_decode(
    state: Tensor, x: Tensor, dt: Tensor, A_log: Tensor, B: Tensor, C: Tensor, D: Tensor | None = None,
    dt_bias: Tensor | None = None, dt_limit: tuple[float, float] = (0.0, math.inf),
) -> Tensor:
    """Same contract as `reference.ssd_decode`, one Triton kernel (state read and written once)."""
    from .triton_step import ssd_decode as fused

    return fused(state, x, dt, A_log, B, C, D=D, dt_bias=dt_bias, dt_limit=dt_limit)


@_cuda_or_reference
def add_rmsnorm(
    x: Tensor, residual: Tensor | None, weight: Tensor, eps: float, residual_in_fp32: bool = False
) -> tuple[Tensor, Tensor]:
    """Same contract as `reference.add_rmsnorm`: one fused kernel (fla's prenorm RMSNorm), with backward."""
    _pin_configs()
    from fla.modules.norm.layernorm import rms_norm

    normed, residual = rms_norm(x, weight, None, residual=residual, eps=eps, prenorm=True,
                                residual_in_fp32=residual_in_fp32)
    return normed.to(weight.dtype), residual


@_cuda_or_reference
def gated_rmsnorm(x: Tensor, z: Tensor, weight: Tensor, eps: float, group_size: int) -> Tensor:
    """Same contract as `reference.gated_rmsnorm` (norm after the SiLU gate, per group): fla's Triton kernel."""
    from fla.modules.norm.layernorm_gated import rmsnorm_fn

    return rmsnorm_fn(x, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=False)
