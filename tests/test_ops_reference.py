"""The chunked SSD scan and the causal conv against their step-by-step recurrences (the spec's two forms)."""

import pytest
import torch

from omnimamba.ops import load_backend, resolve_backend_name
from omnimamba.ops import reference as ref


def random_ssd_inputs(b, l, h, p, g, n, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    x = r(b, l, h, p)
    dt = torch.nn.functional.softplus(r(b, l, h) - 2)
    A = -torch.exp(r(h) * 0.5)
    B, C = r(b, l, g, n), r(b, l, g, n)
    D = r(h)
    return x, dt, A, B, C, D


def stepped(x, dt, A, B, C, D, initial_state=None):
    b, l, h, p = x.shape
    n = B.size(-1)
    state = torch.zeros(b, h, p, n, dtype=torch.promote_types(x.dtype, torch.float32))
    if initial_state is not None:
        state.copy_(initial_state)
    ys = [ref.ssd_step(state, x[:, t], dt[:, t], A, B[:, t], C[:, t], D) for t in range(l)]
    return torch.stack(ys, dim=1), state


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("chunk_size", [1, 4, 16, 64])
@pytest.mark.parametrize("l,g", [(37, 1), (64, 2), (5, 4)])
def test_chunked_scan_equals_recurrence(dtype, tol, chunk_size, l, g):
    x, dt, A, B, C, D = random_ssd_inputs(2, l, 4, 8, g, 6, dtype)
    y_chunk, s_chunk = ref.ssd_chunked(x, dt, A, B, C, chunk_size, D=D)
    y_step, s_step = stepped(x, dt, A, B, C, D)
    assert y_chunk.shape == (2, l, 4, 8) and s_chunk.shape == (2, 4, 8, 6)
    assert rel_err(y_chunk, y_step) < tol
    assert rel_err(s_chunk, s_step) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_chunked_scan_with_initial_state(dtype, tol):
    x, dt, A, B, C, D = random_ssd_inputs(2, 50, 4, 8, 2, 6, dtype, seed=1)
    s0 = torch.randn(2, 4, 8, 6, dtype=torch.float64).to(torch.promote_types(dtype, torch.float32))
    y_chunk, s_chunk = ref.ssd_chunked(x, dt, A, B, C, 16, D=D, initial_state=s0)
    y_step, s_step = stepped(x, dt, A, B, C, D, initial_state=s0)
    assert rel_err(y_chunk, y_step) < tol
    assert rel_err(s_chunk, s_step) < tol


def test_scan_split_in_two_equals_scan_whole():
    x, dt, A, B, C, D = random_ssd_inputs(1, 40, 2, 4, 1, 3, torch.float64, seed=2)
    y, s = ref.ssd_chunked(x, dt, A, B, C, 8, D=D)
    y1, s1 = ref.ssd_chunked(x[:, :13], dt[:, :13], A, B[:, :13], C[:, :13], 8, D=D)
    y2, s2 = ref.ssd_chunked(x[:, 13:], dt[:, 13:], A, B[:, 13:], C[:, 13:], 8, D=D, initial_state=s1)
    assert rel_err(torch.cat([y1, y2], 1), y) < 1e-12
    assert rel_err(s2, s) < 1e-12


def test_causal_conv_equals_steps_and_resumes():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 11, 5, generator=gen, dtype=torch.float64)
    w = torch.randn(5, 4, generator=gen, dtype=torch.float64)
    bias = torch.randn(5, generator=gen, dtype=torch.float64)
    out, state = ref.causal_conv(x, w, bias)
    s = torch.zeros(2, 5, 4, dtype=torch.float64)
    steps = torch.stack([ref.conv_step(s, x[:, t], w, bias) for t in range(11)], dim=1)
    torch.testing.assert_close(out, steps, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state, s, rtol=0, atol=0)
    out1, st1 = ref.causal_conv(x[:, :6], w, bias)
    out2, st2 = ref.causal_conv(x[:, 6:], w, bias, initial_state=st1)
    torch.testing.assert_close(torch.cat([out1, out2], 1), out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(st2, state, rtol=0, atol=0)


def test_causal_conv_matches_torch_conv1d_formula():
    # y_t = silu(b + sum_j w_j x_{t-k+1+j}), zeros before the start
    x = torch.arange(6, dtype=torch.float64).reshape(1, 6, 1)
    w = torch.tensor([[1.0, 10.0, 100.0]], dtype=torch.float64)
    out, _ = ref.causal_conv(x, w, None)
    pre = torch.tensor([0, 100, 210, 321, 432, 543], dtype=torch.float64)  # the newest input meets w[-1]
    torch.testing.assert_close(out[0, :, 0], torch.nn.functional.silu(pre))


def test_gated_rmsnorm_per_group_formula():
    x = torch.randn(3, 8, dtype=torch.float64)
    z = torch.randn(3, 8, dtype=torch.float64)
    w = torch.randn(8, dtype=torch.float64)
    out = ref.gated_rmsnorm(x, z, w, eps=1e-6, group_size=4)
    h = x * torch.nn.functional.silu(z)
    for gi in range(2):
        sl = slice(4 * gi, 4 * gi + 4)
        expect = h[:, sl] / torch.sqrt(h[:, sl].pow(2).mean(-1, keepdim=True) + 1e-6) * w[sl]
        torch.testing.assert_close(out[:, sl], expect)


def test_backend_seam():
    assert resolve_backend_name("auto") in ("reference",) or torch.cuda.is_available()
    assert load_backend("reference") is ref
    with pytest.raises(ValueError, match="unknown kernel backend 'nope'"):
        load_backend("nope")


def test_the_gpu_backend_hands_cpu_tensors_to_the_reference_kernels():
    """'auto' picks the GPU backend by the machine: a model kept on the CPU of a GPU machine (the backbone
    demo) must still run, on the reference kernels, with their results; no GPU package is touched."""
    from omnimamba.mamba2 import Mamba2LM, preset

    torch.manual_seed(0)
    config = preset("mamba2-tiny", vocab_size=32, pad_vocab_size_multiple=1)
    fast, slow = Mamba2LM(config, backend="fla"), Mamba2LM(config, backend="reference")
    slow.load_state_dict(fast.state_dict())
    ids = torch.randint(0, 32, (2, 9))
    torch.testing.assert_close(fast(ids), slow(ids), rtol=0, atol=0)
    caches = [m.allocate_cache(2) for m in (fast, slow)]
    for m, cache in zip((fast, slow), caches):
        m(ids[:, :8], cache=cache)
    torch.testing.assert_close(fast.step(ids[:, 8], caches[0]), slow.step(ids[:, 8], caches[1]), rtol=0, atol=0)


@pytest.mark.parametrize("dt_limit", [(0.0, float("inf")), (0.01, 0.05)])
def test_ssd_decode_from_raw_parameters_matches_the_chunked_scan(dt_limit):
    """The decode step takes dt before softplus and A_log: T of its steps equal one chunked scan run on
    dt = clamp(softplus(dt_raw + dt_bias)) and A = -exp(A_log)."""
    gen = torch.Generator().manual_seed(7)
    b, l, h, p, g, n = 2, 9, 4, 8, 2, 6
    x, _, _, B, C, D = random_ssd_inputs(b, l, h, p, g, n, torch.float64)
    dt_raw = torch.randn(b, l, h, generator=gen, dtype=torch.float64) * 4
    dt_bias, A_log = torch.randn(h, generator=gen, dtype=torch.float64), torch.randn(h, generator=gen, dtype=torch.float64)
    dt = torch.nn.functional.softplus(dt_raw + dt_bias).clamp(*dt_limit)
    y_scan, final = ref.ssd_chunked(x, dt, -torch.exp(A_log), B, C, 4, D=D)
    state = torch.zeros(b, h, p, n, dtype=torch.float64)
    ys = [ref.ssd_decode(state, x[:, t], dt_raw[:, t], A_log, B[:, t], C[:, t], D, dt_bias, dt_limit)
          for t in range(l)]
    torch.testing.assert_close(torch.stack(ys, 1), y_scan, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state, final, rtol=1e-10, atol=1e-10)
    if dt_limit[1] < 1:  # the clamp is active: dt never leaves its range
        assert dt.min() >= dt_limit[0] and dt.max() <= dt_limit[1] and (dt == dt_limit[1]).any()


@pytest.mark.parametrize("residual_in_fp32", [False, True])
def test_add_rmsnorm_against_its_formula(residual_in_fp32):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(3, 16, generator=gen).to(torch.bfloat16)
    residual = torch.randn(3, 16, generator=gen)
    w = torch.rand(16, generator=gen).to(torch.bfloat16)
    normed, res = ref.add_rmsnorm(x, residual, w, 1e-5, residual_in_fp32)
    s = x.float() + residual
    torch.testing.assert_close(res, s)
    assert res.dtype == torch.float32 and normed.dtype == torch.bfloat16
    expected = s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + 1e-5) * w.float()
    torch.testing.assert_close(normed.float(), expected, rtol=1e-2, atol=1e-2)
    first, res0 = ref.add_rmsnorm(x, None, w, 1e-5, residual_in_fp32)  # the first layer: no residual yet
    assert torch.equal(res0, x.float() if residual_in_fp32 else x)


def test_chunked_scan_gradients_equal_the_recurrences():
    """Training differentiates the chunked form: its gradients are the step-by-step recurrence's (float64)."""
    x, dt, A, B, C, D = random_ssd_inputs(2, 29, 4, 3, 2, 5, torch.float64, seed=3)
    s0 = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    leaves = [t.clone().requires_grad_() for t in (x, dt, A, B, C, D, s0)]
    w_y, w_s = torch.randn(2, 29, 4, 3, dtype=torch.float64), torch.randn(2, 4, 3, 5, dtype=torch.float64)

    def grads(fn):
        y, s = fn(*leaves)
        return torch.autograd.grad((y * w_y).sum() + (s * w_s).sum(), leaves)

    def recurrence(x, dt, A, B, C, D, s0):  # the recurrence written out of place, so autograd can follow it
        Bh, Ch = (t.repeat_interleave(x.size(2) // t.size(2), dim=2) for t in (B, C))
        state, ys = s0, []
        for t in range(x.size(1)):
            state = (state * torch.exp(dt[:, t] * A)[..., None, None]
                     + torch.einsum("bh,bhp,bhn->bhpn", dt[:, t], x[:, t], Bh[:, t]))
            ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]) + D[:, None] * x[:, t])
        return torch.stack(ys, 1), state

    chunked = grads(lambda x, dt, A, B, C, D, s0: ref.ssd_chunked(x, dt, A, B, C, 8, D=D, initial_state=s0))
    steps = grads(recurrence)
    for got, want in zip(chunked, steps):
        assert rel_err(got, want) < 1e-10


@pytest.mark.parametrize("g,dim", [(1, 2), (2, 2), (4, 1), (2, -2)])
def test_heads_from_groups_is_repeat_interleave_values_and_gradients(g, dim):
    from omnimamba.ops.reference import heads_from_groups

    shape = [2, 5, 3, 6]
    shape[dim] = g
    t = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    ours, theirs = heads_from_groups(t, 8, dim), t.repeat_interleave(8 // g, dim=dim)
    assert ours.shape == theirs.shape and torch.equal(ours, theirs)
    w = torch.randn_like(theirs)
    (g_ours,) = torch.autograd.grad((ours * w).sum(), t)
    (g_theirs,) = torch.autograd.grad((theirs * w).sum(), t)
    torch.testing.assert_close(g_ours, g_theirs, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_gpu_scan_ops_chain_rule_for_x_dt_and_a_matches_autograd(dtype):
    """ops/fla.py's scan op takes x, dt and A and returns their gradients from fla's dv and dg itself (inductor
    mis-generated them around the op): the formulas against autograd through v = x * dt, g = dt * A."""
    from omnimamba.ops.fla import _chain_values_and_decay

    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 7, 3, 4, generator=gen).to(dtype).requires_grad_()
    dt = (torch.rand(2, 7, 3, generator=gen) + 0.1).requires_grad_()
    A = (-torch.rand(3, generator=gen) - 0.5).requires_grad_()
    dv, dg = torch.randn(2, 7, 3, 4, generator=gen).to(dtype), torch.randn(2, 7, 3, generator=gen)
    v, g = x * dt[..., None].to(dtype), (dt * A).float()
    torch.autograd.backward([v, g], [dv, dg])
    dx, ddt, dA = _chain_values_and_decay(dv, dg, x.detach(), dt.detach(), A.detach())
    assert (dx.dtype, ddt.dtype, dA.dtype) == (dtype, torch.float32, torch.float32)
    tol = 1e-6 if dtype == torch.float32 else 2e-2  # autograd sums dv * x in bf16, the op in float32
    torch.testing.assert_close(dx, x.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(ddt, dt.grad, rtol=tol, atol=tol)
    torch.testing.assert_close(dA, A.grad, rtol=1e-6, atol=1e-6)
