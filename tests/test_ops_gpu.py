"""The fla GPU backend against the reference kernels (skipped without CUDA and flash-linear-attention)."""

import pytest
import torch

from omnimamba.mamba2 import Mamba2LM, preset
from omnimamba.ops import fla as fla_backend
from omnimamba.ops import reference as ref

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not fla_backend.is_available(),
                                                  reason="needs CUDA and flash-linear-attention")]


def inputs(b, l, h, p, g, n, dtype, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32)

    x = r(b, l, h, p).to(dtype)
    dt = torch.nn.functional.softplus(r(b, l, h) - 2)
    A = -torch.exp(r(h) * 0.5)
    return x, dt, A, r(b, l, g, n).to(dtype), r(b, l, g, n).to(dtype), r(h)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


# fla's Triton kernels multiply float32 in TF32 (10-bit mantissa), hence 5e-3 rather than float32 precision.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 5e-3), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("l,g", [(1000, 1), (257, 2)])
def test_fla_scan_matches_reference(dtype, tol, l, g):
    x, dt, A, B, C, D = inputs(2, l, 8, 64, g, 64, dtype)
    s0 = torch.randn(2, 8, 64, 64, device="cuda")
    y_ref, s_ref = ref.ssd_chunked(x.float(), dt, A, B.float(), C.float(), 64, D=D, initial_state=s0)
    y, s = fla_backend.ssd_chunked(x, dt, A, B, C, 64, D=D, initial_state=s0)
    assert rel(y, y_ref) < tol and rel(s, s_ref) < tol


def small_model():
    """A 4-layer model of mamba2-130m's width on the reference kernels, random weights."""
    torch.manual_seed(0)
    return Mamba2LM(preset("mamba2-130m", n_layer=4), backend="reference").cuda().eval()


def test_fla_model_greedy_tokens_match_reference():
    model = small_model()
    ids = torch.randint(0, 50000, (1, 300), device="cuda")
    with torch.no_grad():
        ref_logits = model(ids)
        model.set_backend("fla")
        fla_logits = model(ids)
    assert rel(fla_logits, ref_logits) < 5e-3
    assert (fla_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean() >= 0.95


@pytest.mark.parametrize("resume", [False, True])
def test_fla_causal_conv_and_step_match_reference(resume):
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(2, 37, 96, generator=gen, device="cuda")
    w = torch.randn(96, 4, generator=gen, device="cuda")
    bias = torch.randn(96, generator=gen, device="cuda")
    s0 = torch.randn(2, 96, 4, generator=gen, device="cuda") if resume else None
    y_ref, st_ref = ref.causal_conv(x, w, bias, s0)
    y, st = fla_backend.causal_conv(x, w, bias, s0)
    assert rel(y, y_ref) < 1e-4 and rel(st, st_ref) < 1e-6
    state, state_ref = st.clone(), st_ref.clone()
    for t in range(5):
        step = torch.randn(2, 96, generator=gen, device="cuda")
        assert rel(fla_backend.conv_step(state, step, w, bias), ref.conv_step(state_ref, step, w, bias)) < 1e-4
    assert rel(state, state_ref) < 1e-6


def test_fla_prefill_then_decode_matches_reference_forward():
    model = small_model()
    ids = torch.randint(0, 50000, (2, 120), device="cuda")
    with torch.no_grad():
        full = model(ids)
        model.set_backend("fla")
        cache = model.allocate_cache(2)
        parts = [model(ids[:, :100], cache=cache)]
        parts += [model.step(ids[:, t], cache)[:, None] for t in range(100, 120)]
    assert rel(torch.cat(parts, 1), full) < 5e-3
