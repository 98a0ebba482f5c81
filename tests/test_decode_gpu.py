"""The GPU decode path of OmniMamba (fused Triton kernels + CUDA-graph replay) against the reference kernels
run eagerly (skipped without CUDA and flash-linear-attention)."""

import pytest
import torch

from omnimamba.mamba2 import Mamba2Config
from omnimamba.model import OmniMamba, preset
from omnimamba.ops import fla as fla_backend
from omnimamba.sequence import pad_left, t2i_prefix
from omnimamba.tokenizer import TextTokenizer

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not fla_backend.is_available(),
                                                  reason="needs CUDA and flash-linear-attention")]

TOK = TextTokenizer.shapes()


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def model_on(backend, dtype=torch.float32):
    """Shapes-tiny's vocabularies and encoders on a 4-layer backbone of real head sizes (64 x 128)."""
    torch.manual_seed(0)
    base = preset("shapes-tiny")
    cfg = base.replace(backbone=Mamba2Config(d_model=256, n_layer=4, vocab_size=base.backbone.vocab_size,
                                             pad_vocab_size_multiple=8, headdim=64, d_state=128,
                                             chunk_size=64, tie_embeddings=True))
    model = OmniMamba(cfg, backend="reference")
    with torch.no_grad():  # make the LoRA routes matter (B starts at zero)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    model = model.cuda().to(dtype).eval()
    model.set_backend(backend)
    # The kernels' parity is tested on a float32 state; the bf16 state a GPU decodes with by default has its own
    # cases here and in test_ops_gpu.py, and benchmarks/state_dtype.py measures what it changes.
    model.decode_state_dtype = None
    return model


def mmu_inputs(b=1):
    gen = torch.Generator().manual_seed(5)
    pixels = torch.rand(b, 3, 64, 64, generator=gen).cuda()
    prompt = torch.randint(0, TOK.base_vocab_size, (b, 20), generator=gen).cuda()
    return pixels, prompt


def teacher_forced_logits(model, pixels, prompt, tokens, graph):
    """Text logits of each step while feeding `tokens` (b, T): prefill, then T - 1 decode steps. Special
    tokens but [EOT] are masked out, as generate_text does."""
    specials = torch.arange(model.config.text_vocab_size, device=prompt.device) >= model.config.text_base_vocab_size
    specials[model.special.eot] = False
    out = []
    with model._decoder("text", prompt.size(0), prompt.device, graph) as runner:
        x = model.mmu_embeddings(pixels, prompt)
        hidden = model.backbone(x, cache=runner.cache, task="mmu")[:, -1]
        for t in range(tokens.size(1)):
            out.append(model.text_logits(hidden).float().masked_fill(specials, float("-inf")))
            if t < tokens.size(1) - 1:
                hidden = runner(tokens[:, t], torch.full_like(tokens[:, t], x.size(1) + t))
    return torch.stack(out, 1)


@torch.no_grad()
def test_200_greedy_steps_on_the_fast_path_match_the_reference_float32():
    pixels, prompt = mmu_inputs()
    reference = model_on("reference")
    tokens = reference.generate_text(pixels, prompt, max_new_tokens=200, stop_at_eot=False, use_cuda_graph=False)
    assert tokens.shape == (1, 200)
    ref_logits = teacher_forced_logits(reference, pixels, prompt, tokens, graph=False)
    fast = model_on("fla")
    fast_logits = teacher_forced_logits(fast, pixels, prompt, tokens, graph=True)
    assert (ref_logits.argmax(-1) == tokens).all()
    assert (fast_logits.argmax(-1) == tokens).float().mean() >= 0.95
    finite = ref_logits.isfinite()
    assert rel(fast_logits[finite], ref_logits[finite]) < 5e-3  # fla's prefill multiplies in TF32


@torch.no_grad()
def test_bf16_fast_path_adds_no_error_beyond_bf16_rounding():
    """Against float32 truth, the bf16 fast path (fused kernels, graphs) is as close as the bf16 reference."""
    pixels, prompt = mmu_inputs(2)
    tokens = torch.randint(0, TOK.base_vocab_size, (2, 64)).cuda()
    truth = teacher_forced_logits(model_on("reference"), pixels, prompt, tokens, False)
    bf16_ref = teacher_forced_logits(model_on("reference", torch.bfloat16), pixels.bfloat16(), prompt, tokens, False)
    bf16_fast = teacher_forced_logits(model_on("fla", torch.bfloat16), pixels.bfloat16(), prompt, tokens, True)
    finite = truth.isfinite()
    err_ref, err_fast = rel(bf16_ref[finite], truth[finite]), rel(bf16_fast[finite], truth[finite])
    assert err_fast < 2e-2 and err_fast < 1.25 * err_ref, (err_fast, err_ref)


@pytest.mark.parametrize("batch", [1, 3, 8, 20, 70])  # GEMV path up to 8 rows; 70 rows: two 64-row tiles
def test_fused_step_matches_the_unfused_step_float32(batch):
    from helpers.fused_step_parity import compare

    errors = compare(batch, torch.float32, "cuda")
    assert errors["out"] < 1e-5 * errors["out_scale"], errors
    assert errors["conv"] < 1e-5 and errors["ssm"] < 1e-6, errors


# 16-bit weights: one row on CUDA cores; in_proj on tensor cores from 2 rows, out_proj from 3 (ops/fused_step.py)
@pytest.mark.parametrize("batch", [1, 2, 3, 8])
def test_fused_step_matches_the_unfused_step_bf16(batch):
    from helpers.fused_step_parity import compare

    errors = compare(batch, torch.bfloat16, "cuda")
    assert errors["dtype"] == "torch.bfloat16", errors
    for key in ("out", "conv", "ssm"):  # a few bf16 roundings apart, relative to the values' size
        assert errors[key] < 2e-2 * errors[f"{key}_scale"], (key, errors)


@pytest.mark.parametrize("batch", [16, 32])  # the few-rows path past 8 rows (tiles of 16 and 32 rows)
def test_fused_step_few_rows_path_past_eight_rows_bf16(batch, monkeypatch):
    from helpers.fused_step_parity import compare
    from omnimamba.ops import fused_step

    monkeypatch.setattr(fused_step, "FEW_ROWS", 32)
    errors = compare(batch, torch.bfloat16, "cuda")
    for key in ("out", "conv", "ssm"):
        assert errors[key] < 2e-2 * errors[f"{key}_scale"], (key, errors)


def test_sampling_on_the_gpu_draws_what_multinomial_draws_and_never_waits_for_it():
    from omnimamba.generation import sample_next_token

    logits = torch.randn(32, 16384, device="cuda") * 3
    ours, theirs = (torch.Generator(device="cuda").manual_seed(0) for _ in range(2))
    expected = torch.multinomial(torch.softmax(logits, -1), 1, generator=theirs).squeeze(-1)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call raises
    try:
        got = sample_next_token(logits, 1.0, generator=ours)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(got, expected)


@torch.no_grad()
def test_decode_takes_the_fused_step_and_it_matches_the_unfused_one_in_bf16():
    """The bf16 model's teacher-forced logits, fused and unfused, each against float32 truth."""
    pixels, prompt = mmu_inputs(2)
    tokens = torch.randint(0, TOK.base_vocab_size, (2, 48)).cuda()
    truth = teacher_forced_logits(model_on("reference"), pixels, prompt, tokens, False)
    model = model_on("fla", torch.bfloat16)
    with model._merged_route("mmu"):
        assert model.backbone._fused_weights("mmu") is not None  # generation's merged route takes it
    assert model.backbone._fused_weights("mmu") is None  # unmerged LoRA: three GEMMs, the unfused step
    errs = {}
    for fused in (True, False):
        model.backbone.fused_decode = fused
        model._runners.clear()
        logits = teacher_forced_logits(model, pixels.bfloat16(), prompt, tokens, True)
        errs[fused] = rel(logits[truth.isfinite()], truth[truth.isfinite()])
    assert errs[True] < 2e-2 and errs[True] < 1.25 * errs[False], errs


@torch.no_grad()
def test_stepped_decode_matches_the_chunked_forward():
    """Decoding token by token (graphed) gives the logits a whole-sequence forward gives."""
    model = model_on("fla")
    pixels, prompt = mmu_inputs()
    tokens = torch.randint(0, TOK.base_vocab_size, (1, 40)).cuda()
    stepped = teacher_forced_logits(model, pixels, prompt, tokens, graph=True)
    x = model.mmu_embeddings(pixels, torch.cat([prompt, tokens], 1))
    chunked = model.text_logits(model.backbone(x, task="mmu")[:, -41:-1])
    kept = stepped.isfinite()  # the special tokens generation masks out
    assert rel(stepped[kept], chunked[kept]) < 5e-3


@torch.no_grad()
def test_graphed_generation_equals_eager_generation():
    model = model_on("fla", torch.bfloat16)
    pixels, prompt = mmu_inputs(3)
    pixels = pixels.bfloat16()
    eager = model.generate_text(pixels, prompt, max_new_tokens=30, stop_at_eot=False, use_cuda_graph=False)
    graphed = model.generate_text(pixels, prompt, max_new_tokens=30, stop_at_eot=False, use_cuda_graph=True)
    again = model.generate_text(pixels, prompt, max_new_tokens=30, stop_at_eot=False)  # reuses the capture
    assert torch.equal(eager, graphed) and torch.equal(graphed, again)
    assert len(model._runners) == 1

    prefixes = [t2i_prefix(TOK, c, model.config.max_caption_tokens) for c in ("a red circle", "two squares")]
    ids, mask = pad_left([p for p, _ in prefixes], TOK.special.eot)
    cap, _ = pad_left([m for _, m in prefixes], False)
    args = (ids.cuda(), mask.cuda(), cap.bool().cuda())
    for state_dtype in (None, torch.bfloat16):  # a float32 state, then the bf16 one (a GPU's default)
        model.decode_state_dtype = state_dtype
        eager = model.generate_image_codes(*args, guidance_scale=3.0, temperature=0.0, use_cuda_graph=False)
        graphed = model.generate_image_codes(*args, guidance_scale=3.0, temperature=0.0, use_cuda_graph=True)
        assert torch.equal(eager, graphed)


@torch.no_grad()
def test_a_recurring_prefill_replays_from_a_graph_and_changes_nothing():
    model = model_on("fla", torch.bfloat16)
    model.decode_state_dtype = torch.bfloat16
    prefixes = [t2i_prefix(TOK, c, model.config.max_caption_tokens) for c in ("a red circle", "two big squares")]
    ids, mask = pad_left([p for p, _ in prefixes], TOK.special.eot)  # rows of two lengths: left padding
    cap, _ = pad_left([m for _, m in prefixes], False)
    args = (ids.cuda(), mask.cuda(), cap.bool().cuda())
    eager = model.generate_image_codes(*args, guidance_scale=3.0, temperature=0.0, use_cuda_graph=False)
    runs = [model.generate_image_codes(*args, guidance_scale=3.0, temperature=0.0) for _ in range(3)]
    (runner,) = model._runners._runners.values()
    assert len(runner.prefills) == 1  # the first prefill ran eagerly, the second captured, the third replayed
    assert all(torch.equal(eager, r) for r in runs)

    pixels, prompt = mmu_inputs(2)
    pixels = pixels.bfloat16()
    prompt_mask = torch.ones_like(prompt)
    prompt_mask[0, :5] = 0  # a shorter first prompt
    eager = model.generate_text(pixels, prompt, prompt_mask, max_new_tokens=10, stop_at_eot=False,
                                use_cuda_graph=False)
    runs = [model.generate_text(pixels, prompt, prompt_mask, max_new_tokens=10, stop_at_eot=False)
            for _ in range(3)]
    assert all(torch.equal(eager, r) for r in runs)
    text_runner = next(r for k, r in model._runners._runners.items() if k[0] == "text")
    assert len(text_runner.prefills) == 1


@torch.no_grad()
def test_graphed_text_generation_stops_where_every_row_has_ended():
    model = model_on("fla", torch.bfloat16)
    answer_logits, end, calls = model.answer_logits, model.special.end, []

    def ending(hidden):  # row 0 ends at step 3, row 1 at step 6
        logits = answer_logits(hidden)
        for row, at in ((0, 3), (1, 6)):
            if len(calls) >= at:
                logits[row, end] = 1e4
        calls.append(1)
        return logits

    model.answer_logits = ending
    pixels, prompt = mmu_inputs(2)
    tokens = model.generate_text(pixels.bfloat16(), prompt, max_new_tokens=20)
    assert tokens.shape == (2, 7) and len(calls) == 7
    assert (tokens[0, 3:] == end).all() and tokens[1, 6] == end and (tokens[1, :6] != end).all()


@torch.no_grad()
def test_graphed_sampling_draws_what_eager_sampling_draws_seed_by_seed():
    """A graphed generation samples what an eager one samples with the same seed, for each of several seeds in
    turn (text, and images guided and unguided with top-k / top-p)."""
    model = model_on("fla", torch.bfloat16)
    pixels, prompt = mmu_inputs(3)
    pixels = pixels.bfloat16()
    text = dict(max_new_tokens=24, temperature=1.0, top_k=8, stop_at_eot=False)
    for seed in (0, 1, 0):
        eager = model.generate_text(pixels, prompt, seed=seed, use_cuda_graph=False, **text)
        graphed = model.generate_text(pixels, prompt, seed=seed, use_cuda_graph=True, **text)
        assert torch.equal(eager, graphed), seed
    assert not torch.equal(model.generate_text(pixels, prompt, seed=1, **text),
                           model.generate_text(pixels, prompt, seed=2, **text))

    prefixes = [t2i_prefix(TOK, c, model.config.max_caption_tokens) for c in ("a red circle", "two squares")]
    ids, mask = pad_left([p for p, _ in prefixes], TOK.special.eot)
    cap, _ = pad_left([m for _, m in prefixes], False)
    args = (ids.cuda(), mask.cuda(), cap.bool().cuda())
    for scale, top_k, top_p in ((3.0, 20, 0.9), (1.0, 0, 1.0)):  # guided, and unguided (b rows)
        for seed in (3, 4):
            sampling = dict(guidance_scale=scale, temperature=1.0, top_k=top_k, top_p=top_p, seed=seed)
            eager = model.generate_image_codes(*args, use_cuda_graph=False, **sampling)
            graphed = model.generate_image_codes(*args, use_cuda_graph=True, **sampling)
            assert torch.equal(eager, graphed), (scale, seed)
    unseeded = model.generate_image_codes(*args, guidance_scale=3.0, temperature=1.0)  # the global RNG
    assert unseeded.shape == (2, model.config.image_tokens)


def test_a_gpu_decodes_with_a_bf16_state_by_default():
    model = model_on("fla")
    model.decode_state_dtype = "auto"  # the default
    with model._decoder("image", 2, torch.device("cuda"), True) as runner:
        assert runner.cache.ssm.dtype == torch.bfloat16
    from omnimamba.serving.images import ImageBatcher

    images = ImageBatcher(model, max_batch=2)
    try:
        assert images.cache.ssm.dtype == torch.bfloat16  # the server decodes as generate_images does
    finally:
        images.close()


@torch.no_grad()
def test_interleaved_generations_do_not_share_a_cache():
    model = model_on("fla")
    pixels, prompt = mmu_inputs()
    alone = model.generate_text(pixels, prompt, max_new_tokens=12, stop_at_eot=False)
    first = model.generate_text(pixels, prompt, max_new_tokens=12, stop_at_eot=False, stream=True)
    second = model.generate_text(pixels, prompt, max_new_tokens=12, stop_at_eot=False, stream=True)
    a, b = [], []
    for x, y in zip(first, second):
        a.append(x), b.append(y)
    assert torch.equal(torch.stack(a, 1), alone) and torch.equal(torch.stack(b, 1), alone)


@torch.no_grad()
def test_learned_mmu_positions_on_the_graphed_path_match_the_chunked_forward():
    """A model with MMU positions (the official release's): graphed decode feeds each token its position."""
    torch.manual_seed(0)
    base = model_on("reference")
    model = OmniMamba(base.config.replace(mmu_positions=256), backend="reference")
    model.load_state_dict(base.state_dict(), strict=False)  # everything but the new positions
    model = model.cuda().eval()
    model.set_backend("fla")
    pixels, prompt = mmu_inputs()
    tokens = model.generate_text(pixels, prompt, max_new_tokens=20, stop_at_eot=False, use_cuda_graph=True)
    eager = model.generate_text(pixels, prompt, max_new_tokens=20, stop_at_eot=False, use_cuda_graph=False)
    assert torch.equal(tokens, eager)
    x = model.mmu_embeddings(pixels, torch.cat([prompt, tokens], 1))  # positions included
    logits = model.answer_logits(model.backbone(x, task="mmu")[0, -21:-1])
    assert (logits.argmax(-1) == tokens[0]).float().mean() >= 0.95


def test_served_requests_on_graphed_steps_equal_each_request_alone():
    """The server's batchers replay their decode steps as CUDA graphs (one per bucket of slot counts):
    concurrent requests of different lengths, joining and leaving, each get what they get alone."""
    import numpy as np

    from helpers.serving import submit_concurrently
    from omnimamba.inference import answer, generate_images, prompt_ids, to_pixels
    from omnimamba.serving.batcher import TextBatcher, TextRequest
    from omnimamba.serving.images import ImageBatcher, ImageRequest

    model = model_on("fla")
    rng = np.random.default_rng(0)
    questions = ["how many circles are there?", "what color is the square?", "describe the image."]
    jobs = [(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8), questions[k % 3], 2 + (k * 5) % 11)
            for k in range(16)]
    alone = [answer(model, TOK, im, q, max_new_tokens=n) for im, q, n in jobs]
    batcher = TextBatcher(model, max_batch=5)
    try:
        assert batcher.graphed and sorted(batcher.runners) == [1, 2, 4, 5]
        reqs = [TextRequest(pixels=to_pixels([im], 64), ids=prompt_ids(TOK, q), max_tokens=n) for im, q, n in jobs]
        together = [TOK.decode(tokens).strip() for tokens in submit_concurrently(batcher, reqs)]
    finally:
        batcher.close()
    assert together == alone and batcher.requests_total == 16

    prompts = [("a red circle", 3.0, 0), ("two blue squares", 1.0, 1), ("a green triangle", 2.0, 2)]
    alone = [np.asarray(generate_images(model, TOK, [p], guidance_scale=g, seed=s)[0]) for p, g, s in prompts]
    images = ImageBatcher(model, max_batch=2)
    try:
        assert images.graphed and sorted(images.runners) == [1, 2]
        reqs = [images.submit(ImageRequest(*t2i_prefix(TOK, p, model.config.max_caption_tokens), guidance=g, seed=s))
                for p, g, s in prompts]
        together = [np.asarray(r.result(timeout=600)[0]) for r in reqs]
    finally:
        images.close()
    for a, b in zip(together, alone):
        assert np.array_equal(a, b)


def test_a_bf16_model_serves_both_tasks():
    """`omnimamba serve --dtype bfloat16`: float32 pixels from the request meet bf16 encoders."""
    pytest.importorskip("fastapi")
    import base64
    import io

    from fastapi.testclient import TestClient
    from PIL import Image

    from omnimamba.serving.app import create_app

    model = model_on("fla", torch.bfloat16)
    model.tokenizer = TOK
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    with TestClient(create_app(model, max_batch=4)) as client:
        chat = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "describe the image."}]}],
            "max_tokens": 8})
        image = client.post("/v1/images/generations", json={"prompt": "a red circle", "n": 2, "seed": 0})
    assert chat.status_code == 200, chat.text
    assert image.status_code == 200 and len(image.json()["data"]) == 2, image.text
