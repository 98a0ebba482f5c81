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


# width 4: Mamba-2's; 17: the Shapes models' (one row of 16 image codes and one more, mamba2.Mamba2Config.d_conv)
@pytest.mark.parametrize("width", [4, 17])
@pytest.mark.parametrize("resume", [False, True])
def test_fla_causal_conv_and_step_match_reference(resume, width):
    gen = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(2, 37, 96, generator=gen, device="cuda")
    w = torch.randn(96, width, generator=gen, device="cuda")
    bias = torch.randn(96, generator=gen, device="cuda")
    s0 = torch.randn(2, 96, width, generator=gen, device="cuda") if resume else None
    y_ref, st_ref = ref.causal_conv(x, w, bias, s0)
    y, st = fla_backend.causal_conv(x, w, bias, s0)
    assert rel(y, y_ref) < 1e-4 and rel(st, st_ref) < 1e-6
    state, state_ref = st.clone(), st_ref.clone()
    for t in range(5):
        step = torch.randn(2, 96, generator=gen, device="cuda")
        assert rel(fla_backend.conv_step(state, step, w, bias), ref.conv_step(state_ref, step, w, bias)) < 1e-4
    assert rel(state, state_ref) < 1e-6


@pytest.mark.parametrize("width", [4, 17])
def test_fla_causal_conv_gradients_match_reference(width):
    gen = torch.Generator(device="cuda").manual_seed(2)
    leaves = [torch.randn(*shape, generator=gen, device="cuda") for shape in ((2, 300, 96), (96, width), (96,))]
    cotangent = torch.randn(2, 300, 96, generator=gen, device="cuda")
    grads = []
    for backend in (ref, fla_backend):
        x, w, bias = (t.detach().requires_grad_() for t in leaves)
        (backend.causal_conv(x, w, bias)[0] * cotangent).sum().backward()
        grads.append((x.grad, w.grad, bias.grad))
    for g, g_ref in zip(*reversed(grads)):
        assert rel(g, g_ref) < 1e-4


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


def packed_decode_inputs(b, h, p, g, n, dtype, seed=2):
    """x, B, C as strided views of one conv output and dt as a view of an in_proj output, as the model has
    them, plus raw dt values on both sides of softplus's threshold."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    xBC = torch.randn(b, h * p + 2 * g * n, generator=gen, device="cuda").to(dtype)
    x = xBC[:, :h * p].view(b, h, p)
    B = xBC[:, h * p:h * p + g * n].view(b, g, n)
    C = xBC[:, h * p + g * n:].view(b, g, n)
    zdt = torch.randn(b, 7 + h, generator=gen, device="cuda") * 6
    params = dict(A_log=torch.randn(h, generator=gen, device="cuda") * 0.5,
                  D=torch.randn(h, generator=gen, device="cuda"),
                  dt_bias=torch.randn(h, generator=gen, device="cuda") * 3)
    state = torch.randn(b, h, p, n, generator=gen, device="cuda")
    return state, x, zdt[:, -h:].to(dtype), B, C, params


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("h,p,g,n", [(8, 64, 1, 128), (6, 48, 2, 16)])
@pytest.mark.parametrize("dt_limit", [(0.0, float("inf")), (1e-3, 0.1)])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16])
def test_fused_decode_step_matches_reference(dtype, tol, h, p, g, n, dt_limit, state_dtype):
    state, x, dt, B, C, kw = packed_decode_inputs(3, h, p, g, n, dtype)
    state = state.to(state_dtype)
    state_ref = state.clone()
    state_tol = 1e-5 if state_dtype == torch.float32 else 1e-2  # a bf16 state may round either way
    for _ in range(4):  # repeated steps on the same state
        y = fla_backend.ssd_decode(state, x, dt, B=B, C=C, dt_limit=dt_limit, **kw)
        y_ref = ref.ssd_decode(state_ref, x, dt, B=B, C=C, dt_limit=dt_limit, **kw)
        assert y.dtype == x.dtype and y.shape == x.shape and state.dtype == state_dtype
        assert rel(y, y_ref) < max(tol, state_tol)
        assert rel(state, state_ref) < state_tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("with_residual,in_fp32", [(False, True), (True, True), (True, False)])
def test_fused_add_rmsnorm_matches_reference(dtype, tol, with_residual, in_fp32):
    gen = torch.Generator(device="cuda").manual_seed(3)
    x = torch.randn(5, 768, generator=gen, device="cuda").to(dtype)
    res_dtype = torch.float32 if in_fp32 else dtype
    residual = torch.randn(5, 768, generator=gen, device="cuda").to(res_dtype) if with_residual else None
    w = (1 + 0.1 * torch.randn(768, generator=gen, device="cuda")).to(dtype)
    normed, res = fla_backend.add_rmsnorm(x, residual, w, 1e-5, in_fp32)
    normed_ref, res_ref = ref.add_rmsnorm(x, residual, w, 1e-5, in_fp32)
    assert normed.dtype == normed_ref.dtype and res.dtype == res_ref.dtype
    assert rel(normed, normed_ref) < tol and rel(res, res_ref) < 1e-6


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("group_size", [256, 1024])
def test_fused_gated_rmsnorm_matches_reference(dtype, tol, group_size):
    gen = torch.Generator(device="cuda").manual_seed(4)
    y = torch.randn(2, 9, 1024, generator=gen, device="cuda").to(dtype)
    z = torch.randn(2, 9, 1500, generator=gen, device="cuda").to(dtype)[..., 100:1124]  # strided, like in_proj's
    w = torch.randn(1024, generator=gen, device="cuda").to(dtype)
    out = fla_backend.gated_rmsnorm(y, z, w, 1e-5, group_size)
    assert rel(out, ref.gated_rmsnorm(y, z, w, 1e-5, group_size)) < tol


def test_training_gradients_on_the_fast_path_match_the_reference():
    """Backward through the fla backend (conv, norms, and the scan: fla's, or the reference's where fla's
    is refused) gives the gradients of the reference model run in float64, to TF32's precision; the float32
    reference is held to the same bound."""
    ids = torch.randint(0, 50000, (2, 150), device="cuda")
    grads = {}
    for backend, dtype in (("reference", torch.float64), ("reference", torch.float32), ("fla", torch.float32)):
        model = small_model().to(dtype)
        model.set_backend(backend)
        logits = model(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads[backend, dtype] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    truth = grads.pop(("reference", torch.float64))
    for run in grads.values():
        assert run.keys() == truth.keys()
        for name, g in truth.items():
            assert rel(run[name], g) < 2e-2, name


def scan_leaves(n, p, dtype, g=1, l=300, seed=5):
    """Scan inputs at Mamba-2's sizes (8 heads, d_state n, headdim p), all differentiable, initial state included."""
    x, dt, A, B, C, D = inputs(2, l, 8, p, g, n, dtype, seed=seed)
    s0 = torch.randn(2, 8, p, n, device="cuda") * 0.1
    return [t.detach().requires_grad_() for t in (x, dt, A, B, C, D, s0)]


def scan_grads(fn, leaves, cotangents):
    """Gradients of <y, wy> + <final state, ws> through `fn`'s scan, one per leaf."""
    x, dt, A, B, C, D, s0 = leaves
    y, s = fn(x, dt, A, B, C, 64, D=D, initial_state=s0)
    wy, ws = cotangents
    ((y.to(wy.dtype) * wy).sum() + (s.to(ws.dtype) * ws).sum()).backward()
    return [t.grad for t in leaves]


# The scan's backward against a float64 reference: every gradient (x, dt, A, B, C, D, initial state). On Hopper
# with Triton 3.4-3.7.0 this is the fla #640 case: d_state 128 runs fla's backward with its refusal lifted, a
# smaller d_state runs it zero-padded to 128; elsewhere fla's own backward. The float32 tolerance is TF32's.
@pytest.mark.parametrize("dtype,tol,n,p,g", [
    (torch.float32, 1e-2, 128, 64, 1), (torch.bfloat16, 2e-2, 128, 64, 1),  # Mamba-2 1.3B's sizes
    (torch.bfloat16, 2e-2, 64, 64, 2), (torch.float32, 1e-2, 32, 64, 1),  # smaller d_state: padded to 128
])
def test_fla_scan_gradients_match_a_float64_reference(dtype, tol, n, p, g):
    leaves = scan_leaves(n, p, dtype, g=g)
    gen = torch.Generator(device="cuda").manual_seed(6)
    cotangents = (torch.randn(2, 300, 8, p, generator=gen, device="cuda"),
                  torch.randn(2, 8, p, n, generator=gen, device="cuda"))
    assert fla_backend.scan_backward(n, p) in ("fla", "fla-verified")
    grads = scan_grads(fla_backend.ssd_chunked, leaves, cotangents)
    exact = [t.detach().double().requires_grad_() for t in leaves]
    expected = scan_grads(ref.ssd_chunked, exact, tuple(c.double() for c in cotangents))
    for name, got, want in zip(("x", "dt", "A", "B", "C", "D", "initial_state"), grads, expected):
        assert got is not None and got.shape == want.shape, name
        assert rel(got, want) < tol, (name, rel(got, want))


def test_fla_scan_backward_outside_the_verified_sizes_falls_back_to_the_reference():
    if fla_backend.scan_backward(128, 64) != "fla-verified":
        pytest.skip("fla's scan backward is not refused on this GPU / Triton (fla #640 does not apply)")
    assert fla_backend.scan_backward(256, 64) == "reference"
    leaves = scan_leaves(256, 64, torch.float32, l=70)
    with pytest.warns(UserWarning, match="fla #640"):
        y, s = fla_backend.ssd_chunked(*leaves[:5], 64, D=leaves[5], initial_state=leaves[6])
    y_ref, s_ref = ref.ssd_chunked(*leaves[:5], 64, D=leaves[5], initial_state=leaves[6])
    assert torch.equal(y, y_ref) and torch.equal(s, s_ref)  # the reference scan itself ran


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-3)])
def test_activation_checkpointing_gives_the_plain_gradients_on_the_fast_path(dtype, tol):
    """Per-block recomputation on the fla backend (bf16 autocast or float32) leaves every gradient as it was."""
    ids = torch.randint(0, 50000, (2, 130), device="cuda")
    grads = {}
    for checkpointing in (False, True):
        model = small_model().train()
        model.set_backend("fla")
        model.backbone.gradient_checkpointing = checkpointing
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            logits = model(ids[:, :-1])
        torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten()).backward()
        grads[checkpointing] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    for name, g in grads[False].items():
        assert rel(grads[True][name], g) < tol, name


def shapes_batches():
    from omnimamba.sequence import MMUBatch, T2IBatch, mmu_example, t2i_prefix
    from omnimamba.tokenizer import TextTokenizer

    tok = TextTokenizer.shapes()
    gen = torch.Generator().manual_seed(1)
    turns = (("how many circles are there?", "two"), ("what color is the square?", "red"),
             ("describe the image.", "a big red square"))
    mmu = MMUBatch.collate(torch.rand(3, 3, 64, 64, generator=gen), [mmu_example(tok, [t]) for t in turns],
                           tok.special)
    t2i = T2IBatch.collate([t2i_prefix(tok, c, 24) for c in ("a red circle", "two blue squares left of a circle")],
                           torch.randint(0, 512, (2, 256), generator=gen), tok.special)
    return mmu.to("cuda"), t2i.to("cuda")


def shapes_run(compiled, checkpointing, dropout=0.0, bf16=False, backend="fla"):
    """Loss and gradients of one training forward + backward of a Shapes model on `backend` (LoRA B drawn
    away from zero, so the routes take part)."""
    from omnimamba.model import OmniMamba
    from omnimamba.model import preset as omni_preset

    mmu, t2i = shapes_batches()
    torch.manual_seed(0)
    model = OmniMamba(omni_preset("shapes-small", lora_dropout=dropout), backend=backend).cuda().train()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model.backbone.compile_blocks(compiled)
    model.backbone.gradient_checkpointing = checkpointing
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
        out = model(mmu=mmu, t2i=t2i, t2i_drop=torch.tensor([False, True], device="cuda"))
    out["loss"].backward()
    return out["loss"].detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("bf16", [False, True])
def test_compiled_training_blocks_give_the_eager_gradients_on_the_fast_path(bf16):
    """run.compile on the fla backend: both tasks of a Shapes model (task LoRA, T2I's padding mask, caption
    dropout), compiled blocks (inductor's norms, conv and glue around fla's scan as one custom op), plain and
    checkpointed, against the eager fla blocks in float32; no graph breaks. Each parameter's gradient is held
    to the distance another correct float32 run lies from it (the reference kernels, eager), twice over plus
    1e-3: dt_bias's and A_log's sums over every position cancel, and two right ways of summing them differ by
    ~1e-2 while the rest agree to ~1e-4. (Before ops/fla.py's scan op took x, dt and A itself, the compiled
    embedding gradient was 14 % off and a 130m-wide model's dt_bias 5.6e3 times: benchmarks/compiled_grad_bisect.py.)
    Under bf16 autocast the distance is eager bf16's from the float32 truth."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    truth, truth_grads = shapes_run(False, False)
    _, other_grads = shapes_run(False, False, bf16=bf16, backend="fla" if bf16 else "reference")
    for checkpointing in (False, True):
        got, got_grads = shapes_run(True, checkpointing, bf16=bf16)
        assert got_grads.keys() == truth_grads.keys()
        if not bf16:
            assert got.item() == pytest.approx(truth.item(), rel=1e-4)
        for name, g in truth_grads.items():
            if g.abs().max() < 1e-8:  # a true gradient of 0 (attention key biases) holds rounding noise
                continue
            bound = 2 * rel(other_grads[name], g) + 1e-3
            assert rel(got_grads[name], g) < bound, (checkpointing, name, rel(got_grads[name], g), bound)
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"], dict(counters["graph_break"])
    # LoRA dropout under compile draws inductor's masks, not eager's: the checkpointed recomputation must draw
    # the forward's again (the compiled plain run's gradients), and the masks must be on
    plain, plain_grads = shapes_run(True, False, dropout=0.1, bf16=bf16)
    recomputed, recomputed_grads = shapes_run(True, True, dropout=0.1, bf16=bf16)
    assert recomputed.item() == pytest.approx(plain.item(), rel=1e-4) and plain.item() != got.item()
    for name, g in plain_grads.items():
        assert g.abs().max() < 1e-8 or rel(recomputed_grads[name], g) < 1e-3, ("dropout, checkpointed", name)


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9,
                    reason="the pins apply to Hopper GPUs")
def test_every_fla_pin_finds_its_kernel_and_configuration(monkeypatch):
    from omnimamba.ops import fla_pins

    monkeypatch.delenv("OMNIMAMBA_FLA_AUTOTUNE", raising=False)
    fla_pins.pin.cache_clear()
    pinned = fla_pins.pin()
    assert len(pinned) == len(fla_pins.PINS), set(f"{m}.{n}" for m, n in fla_pins.PINS) - set(pinned)
