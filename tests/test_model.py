"""The assembled OmniMamba on the tiny preset: both sequence formats, losses, modality-safe sampling,
checkpoints, component loading, ablation switches and errors."""

import pytest
import torch
import torch.nn.functional as F

from omnimamba.errors import UserError
from omnimamba.generation import epsilon_floor
from omnimamba.lora import TaskLoRALinear
from omnimamba.mamba2 import Mamba2LM
from omnimamba.model import OmniMamba, cfg_logits, preset
from omnimamba.sequence import IGNORE_INDEX, MMUBatch, T2IBatch, mmu_example, pad_left, t2i_prefix
from omnimamba.tokenizer import TextTokenizer

TOK = TextTokenizer.shapes()


def make_model(**overrides):
    torch.manual_seed(0)
    return OmniMamba(preset("shapes-tiny", **overrides), backend="reference")


def mmu_batch(n=2):
    turns = [("how many circles are there?", "two"), ("what color is the square?", "red")] * n
    return MMUBatch.collate(torch.rand(n, 3, 64, 64), [mmu_example(TOK, [t]) for t in turns[:n]], TOK.special)


def t2i_batch():
    captions = ["a red circle", "two blue squares left of a green triangle"]
    return T2IBatch.collate([t2i_prefix(TOK, c, 24) for c in captions], torch.randint(0, 256, (2, 256)),
                            TOK.special)


def test_mmu_text_padded_to_a_multiple_changes_neither_the_loss_nor_the_logits_before_the_padding():
    model = make_model().eval()
    turns = [("how many circles are there?", "two"), ("what color is the square?", "red")]
    examples = [mmu_example(TOK, [t]) for t in turns]
    pixels = torch.rand(2, 3, 64, 64)
    plain = MMUBatch.collate(pixels, examples, TOK.special)
    padded = MMUBatch.collate(pixels, examples, TOK.special, multiple=32)
    width = plain.text_ids.size(1)
    assert padded.text_ids.size(1) % 32 == 0 and padded.text_ids.size(1) > width
    assert (padded.labels[:, width:] == IGNORE_INDEX).all() and (padded.text_ids[:, width:] == TOK.special.pad).all()
    with torch.no_grad():
        a, b = model.forward_mmu(plain, reduction="sum"), model.forward_mmu(padded, reduction="sum")
    assert int(a[2]) == int(b[2])
    torch.testing.assert_close(b[1], a[1])
    torch.testing.assert_close(b[0][:, :width], a[0])


def test_mixed_batch_forward_and_loss_backward():
    model = make_model()
    mb, tb = mmu_batch(), t2i_batch()
    out = model(mmu=mb, t2i=tb)
    mmu_logits, mmu_loss, t2i_logits, t2i_loss = (out[k] for k in ("mmu_logits", "mmu_loss", "t2i_logits",
                                                                   "t2i_loss"))
    torch.testing.assert_close(out["loss"], mmu_loss + t2i_loss)
    assert mmu_logits.shape == (2, mb.text_ids.size(1), model.config.text_vocab_size)
    assert t2i_logits.shape == (2, 256, 256)
    # near chance at initialisation: log(vocab) for text, log(K) for codes
    assert abs(t2i_loss.item() - torch.log(torch.tensor(256.0)).item()) < 1.5
    (mmu_loss + t2i_loss).backward()
    lora = model.backbone.layers[0].mixer.in_proj
    assert lora.lora_A["mmu"].weight.grad is not None and lora.lora_A["t2i"].weight.grad is not None
    assert model.projector.projector[0].weight.grad is not None


def test_each_task_uses_only_its_route():
    model = make_model()
    _, loss = model.task_forward(mmu_batch(), "mmu")
    loss.backward()
    for layer in model.backbone.layers:
        assert layer.mixer.in_proj.lora_B["t2i"].weight.grad is None
        assert layer.mixer.in_proj.lora_B["mmu"].weight.grad is not None


def test_mmu_loss_only_on_answer_tokens():
    model = make_model()
    mb = mmu_batch()
    logits, loss = model.task_forward(mb, "mmu")
    keep = mb.labels != -100
    manual = torch.nn.functional.cross_entropy(logits[keep], mb.labels[keep])
    torch.testing.assert_close(loss, manual)


@pytest.mark.parametrize("decoupled", [True, False])
def test_sampling_stays_in_its_modality(decoupled):
    model = make_model(decoupled_vocab=decoupled).eval()
    with torch.no_grad():  # make the wrong modality very tempting in the shared head
        model.lm_head.weight[model.config.text_vocab_size:].mul_(0).add_(5.0)
    tb = t2i_batch()
    for seed in range(3):
        codes = model.generate_image_codes(tb.prefix_ids, tb.prefix_mask, tb.caption_mask, temperature=1.5,
                                           seed=seed)
        assert codes.shape == (2, 256) and int(codes.min()) >= 0 and int(codes.max()) < 256
    prompts, mask = pad_left([TOK.encode("user: how many circles? assistant:"), TOK.encode("user: hi")],
                             TOK.special.eot)
    for seed in range(3):
        out = model.generate_text(torch.rand(2, 3, 64, 64), prompts, mask, max_new_tokens=12, temperature=1.5,
                                  seed=seed)
        valid = (out < model.config.text_base_vocab_size) | (out == TOK.special.eot)
        assert bool(valid.all())


def test_text_generation_batched_equals_one_by_one_and_streams():
    model = make_model().eval()
    images = torch.rand(2, 3, 64, 64)
    p = [TOK.encode("user: how many circles are there? assistant:"), TOK.encode("user: what? assistant:")]
    ids, mask = pad_left(p, TOK.special.eot)
    batched = model.generate_text(images, ids, mask, max_new_tokens=6)
    for i in range(2):
        single = model.generate_text(images[i:i + 1], torch.tensor([p[i]]), max_new_tokens=6)
        n = single.size(1)
        assert torch.equal(batched[i, :n], single[0])
    streamed = torch.stack(list(model.generate_text(images, ids, mask, max_new_tokens=6, stream=True)), 1)
    assert torch.equal(streamed, batched)


@torch.no_grad()
def test_answer_logits_keep_text_ids_and_the_end_token_and_block_every_other_special_id():
    model = make_model().eval()
    hidden = torch.randn(3, model.config.backbone.d_model)
    full = model.text_logits(hidden).float()
    logits = model.answer_logits(hidden)
    base, end = model.config.text_base_vocab_size, model.special.end
    assert base <= end < full.size(-1) and logits.shape == full.shape
    assert torch.equal(logits[:, :base], full[:, :base]) and torch.equal(logits[:, end], full[:, end])
    others = [i for i in range(base, full.size(-1)) if i != end]
    assert others and bool(torch.isneginf(logits[:, others]).all())
    assert torch.equal(model.answer_logits(hidden), logits)  # the cached mask gives the same again


@torch.no_grad()
def test_text_generation_stops_at_the_step_where_every_row_has_ended():
    model = make_model().eval()
    end = model.special.end
    answer_logits = model.answer_logits
    calls = []

    def ending(hidden):  # row 0 ends at step 2, row 1 at step 4
        logits = answer_logits(hidden)
        step = len(calls)
        calls.append(step)
        for row, at in ((0, 2), (1, 4)):
            if step >= at:
                logits[row, end] = 1e4
        return logits

    model.answer_logits = ending
    images = torch.rand(2, 3, 64, 64)
    ids, mask = pad_left([TOK.encode("user: how many circles are there? assistant:")] * 2, TOK.special.eot)
    tokens = model.generate_text(images, ids, mask, max_new_tokens=10)
    assert tokens.shape == (2, 5) and len(calls) == 5  # no token sampled past the step where both ended
    assert (tokens[0, 2:] == end).all() and tokens[1, 4] == end and (tokens[1, :4] != end).all()
    calls.clear()
    assert torch.equal(model.generate_text(images, ids, mask, max_new_tokens=10, stop_at_eot=False)[:, :2],
                       tokens[:, :2])


@torch.no_grad()
def test_chunked_prefill_equals_the_whole_prefill():
    """prefill_chunk: the prompt (image, left-padded text) in chunks that continue the cache, the first
    holding padding and real positions, gives the same states and tokens (float64: rounding stays far below
    the tolerance)."""
    model = make_model().double().eval()
    images = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    p = [TOK.encode("user: how many circles are there? assistant:"), TOK.encode("user: what? assistant:")]
    ids, mask = pad_left(p, TOK.special.eot)
    x, full_mask, _ = model.mmu_prefill_inputs(images, ids, mask)
    whole = model.allocate_cache(2)
    hidden = model.prefill(x, whole, full_mask, "mmu")
    tokens = model.generate_text(images, ids, mask, max_new_tokens=8, stop_at_eot=False)
    calls = [0]
    model.backbone.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    model.prefill_chunk = 7  # row 2's 4 padded positions (moved to the front) share the first chunk
    chunked = model.allocate_cache(2)
    torch.testing.assert_close(model.prefill(x, chunked, full_mask, "mmu"), hidden, rtol=1e-10, atol=1e-12)
    assert calls[0] == -(-x.size(1) // 7) and chunked.seqlen_offset == whole.seqlen_offset == x.size(1)
    torch.testing.assert_close(chunked.conv, whole.conv, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(chunked.ssm, whole.ssm, rtol=1e-10, atol=1e-12)
    assert torch.equal(model.generate_text(images, ids, mask, max_new_tokens=8, stop_at_eot=False), tokens)


@torch.no_grad()
def test_decoding_on_merged_route_weights_equals_the_lora_route():
    """Generation runs in_proj on a merged copy W + dW of the active route: same tokens as the unmerged
    route, the copy follows weight changes, and the base weight is untouched."""
    model = make_model().double().eval()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.normal_(0, 0.05)
    images = torch.rand(2, 3, 64, 64, dtype=torch.float64)
    ids = torch.tensor([TOK.encode("user: how many circles are there? assistant:")] * 2)
    weight = model.backbone.layers[0].mixer.in_proj.weight.clone()
    for _ in range(2):  # the second round after changing a LoRA weight: the merged copy is refreshed
        model.decode_with_merged_lora = False
        plain = model.generate_text(images, ids, max_new_tokens=8, stop_at_eot=False)
        plain_codes = model.generate_image_codes(*t2i_args(), guidance_scale=2.0, temperature=0.0)
        model.decode_with_merged_lora = True
        assert torch.equal(model.generate_text(images, ids, max_new_tokens=8, stop_at_eot=False), plain)
        assert torch.equal(model.generate_image_codes(*t2i_args(), guidance_scale=2.0, temperature=0.0),
                           plain_codes)
        model.backbone.layers[1].mixer.in_proj.lora_B["mmu"].weight.mul_(-3)
        model.backbone.layers[1].mixer.in_proj.lora_B["t2i"].weight.mul_(-3)
    in_proj = model.backbone.layers[0].mixer.in_proj
    assert torch.equal(in_proj.weight, weight) and set(in_proj.decode_weights) == {"mmu", "t2i"}
    assert not in_proj.decode_active  # nothing stays active after generation


def t2i_args():
    tb = t2i_batch()
    return tb.prefix_ids, tb.prefix_mask, tb.caption_mask


def test_guidance_mixes_conditional_and_null_caption_rows():
    cond, uncond = torch.tensor([[1.0, 3.0]]), torch.tensor([[2.0, 2.0]])
    torch.testing.assert_close(cfg_logits(cond, uncond, 3.0), torch.tensor([[-1.0, 5.0]]))
    model = make_model().eval()
    tb = t2i_batch()
    greedy = dict(temperature=0.0)
    plain = model.generate_image_codes(tb.prefix_ids, tb.prefix_mask, tb.caption_mask, **greedy)
    with torch.no_grad():
        model.caption_embed.null_caption.normal_()
    guided = model.generate_image_codes(tb.prefix_ids, tb.prefix_mask, tb.caption_mask, guidance_scale=4.0,
                                        **greedy)
    assert not torch.equal(plain, guided)
    with pytest.raises(UserError, match="guidance_scale must be >= 0"):
        model.generate_image_codes(tb.prefix_ids, tb.prefix_mask, tb.caption_mask, guidance_scale=-1)


def test_guided_decoding_equals_guidance_over_the_training_forward():
    # The whole guidance path (null caption, positions, both rows in one batch) against the teacher-forced
    # training forward: greedy guided codes are the argmax of the guided logits of the codes before them.
    model = make_model().eval()
    with torch.no_grad():
        model.caption_embed.null_caption.normal_()
    tb = t2i_batch()
    codes = model.generate_image_codes(tb.prefix_ids, tb.prefix_mask, tb.caption_mask, guidance_scale=3.0,
                                       temperature=0.0)
    forced = T2IBatch(tb.prefix_ids, tb.prefix_mask, tb.caption_mask, codes)
    with torch.no_grad():
        cond, _ = model.forward_t2i(forced, drop=torch.zeros(2, dtype=torch.bool))
        uncond, _ = model.forward_t2i(forced, drop=torch.ones(2, dtype=torch.bool))
    assert torch.equal(cfg_logits(cond, uncond, 3.0).argmax(-1), codes)


def test_epsilon_floor_drops_what_the_reference_finds_unlikely_and_keeps_its_best():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0], [5.0, 0.0, 0.0, 0.0]])
    reference = torch.tensor([[3.0, 2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    probs = torch.softmax(reference, -1)  # row 0: 0.644 0.237 0.087 0.032; row 1: uniform 0.25
    out = epsilon_floor(logits, reference, 0.05)
    assert torch.equal(torch.isinf(out), probs < 0.05) and torch.equal(out[~torch.isinf(out)],
                                                                       logits[probs >= 0.05])
    out = epsilon_floor(logits, reference, 0.9)  # above every probability: each row's most likely stays
    assert torch.equal(torch.isfinite(out), torch.tensor([[True, False, False, False], [True] * 4]))


def test_guided_sampling_with_a_floor_draws_only_what_the_conditional_model_allows():
    # Teacher-forced conditional logits of the sampled codes: every code drawn with epsilon has conditional
    # probability >= epsilon (guidance never lifts the conditional model's tail); without it some do not.
    model = make_model().eval()
    with torch.no_grad():
        model.caption_embed.null_caption.normal_()
    tb = t2i_batch()
    eps = 1.0 / model.config.vq.codebook_size  # about half of the codes lie below it at each position
    below = {}
    for epsilon in (eps, 0.0):
        codes = model.generate_image_codes(tb.prefix_ids, tb.prefix_mask, tb.caption_mask, guidance_scale=3.0,
                                           temperature=1.0, seed=0, epsilon=epsilon)
        with torch.no_grad():
            cond, _ = model.forward_t2i(T2IBatch(tb.prefix_ids, tb.prefix_mask, tb.caption_mask, codes),
                                        drop=torch.zeros(2, dtype=torch.bool))
        p = torch.softmax(cond.float(), -1).gather(-1, codes[..., None])[..., 0]
        below[epsilon] = int((p < eps * (1 - 1e-4)).sum())
    assert below[eps] == 0 and below[0.0] > 10
    with pytest.raises(UserError, match="epsilon must be in"):
        model.generate_image_codes(tb.prefix_ids, tb.prefix_mask, tb.caption_mask, epsilon=1.0)


def test_the_null_caption_gets_a_gradient_in_training_even_when_nothing_is_dropped():
    # Under FSDP2 every process must give every trained parameter a gradient (tests/test_training.py, the
    # one-process-drops case): with no caption dropped the null caption's gradient is zeros, not None, and the
    # output is that of the captions themselves.
    from omnimamba.model.embeddings import CaptionEmbedder

    torch.manual_seed(0)
    embed = CaptionEmbedder(16, 4)
    x, mask = torch.randn(2, 6, 16), torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 1, 1, 1]], dtype=torch.bool)
    kept = embed(x, mask, torch.zeros(2, dtype=torch.bool))
    kept.sum().backward()
    assert embed.null_caption.grad is not None and not embed.null_caption.grad.any()
    torch.testing.assert_close(kept, embed(x, mask, None), rtol=0, atol=0)
    embed.zero_grad()
    embed(x, mask, torch.tensor([True, False])).sum().backward()
    assert embed.null_caption.grad.abs().sum() > 0  # a dropped caption trains it


def test_image_code_positions_do_not_depend_on_the_caption():
    # The official release's layout: captions right-aligned in max_caption_tokens slots, so code j is always
    # at the same position (its place in the image grid), whatever the caption's length.
    model = make_model()
    prefixes = [t2i_prefix(TOK, c, 24) for c in ("a red circle", "two blue squares left of a green triangle")]
    ids, mask = pad_left([p[0] for p in prefixes], TOK.special.eot)
    table = model.t2i_pos_embed[0]
    prefix = model._t2i_positions(mask, 0)
    start = model.t2i_image_start
    assert start == 4 + 24
    for row, (p_ids, _) in enumerate(prefixes):
        first = ids.size(1) - len(p_ids)
        assert torch.equal(prefix[row, first], table[0]) and torch.equal(prefix[row, first + 1], table[1])
        assert torch.equal(prefix[row, -1], table[start - 1]) and torch.equal(prefix[row, -2], table[start - 2])
    torch.testing.assert_close(model._t2i_positions(mask, 3, 2), table[start + 3:start + 5])


def test_save_and_load_round_trip(tmp_path):
    model = make_model().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "m", tokenizer=TOK)
    again = OmniMamba.from_pretrained(tmp_path / "m", backend="reference").eval()
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert TextTokenizer.from_file(tmp_path / "m").special == TOK.special
    with pytest.raises(UserError, match="no config.json"):
        OmniMamba.from_pretrained(tmp_path)


def test_from_components_loads_a_mamba2_checkpoint(tmp_path):
    cfg = preset("shapes-tiny")
    lm = Mamba2LM(cfg.backbone, backend="reference")
    lm.save_pretrained(tmp_path / "mamba2")
    model = OmniMamba.from_components(cfg, mamba2_path=tmp_path / "mamba2", backend="reference")
    assert torch.equal(model.backbone.layers[1].mixer.in_proj.weight, lm.backbone.layers[1].mixer.in_proj.weight)
    assert torch.equal(model.lm_head.weight, lm.backbone.embedding.weight)


def test_ablation_switches():
    no_lora = make_model(task_lora=False)
    assert not any(isinstance(l.mixer.in_proj, TaskLoRALinear) for l in no_lora.backbone.layers)
    unified = make_model(decoupled_vocab=False)
    assert not hasattr(unified, "image_head")
    assert unified.backbone.embedding.num_embeddings >= unified.config.text_vocab_size + 256
    _, loss = unified.task_forward(t2i_batch(), "t2i")
    assert torch.isfinite(loss)


def test_a_unified_vocabulary_trains_over_both_modalities_ids():
    """Table 4's unified vocabulary: the cross-entropy spans text and image ids together (the model has to learn
    which modality to emit); the logits returned are the task's own modality's, which sampling uses."""
    unified = make_model(decoupled_vocab=False).eval()
    V = unified.config.text_vocab_size
    seen = []
    full_head = unified.unified_logits
    unified.unified_logits = lambda h: seen.append(full_head(h)) or seen[-1]
    for task, batch in (("t2i", t2i_batch()), ("mmu", mmu_batch())):
        seen.clear()
        logits, loss = unified.task_forward(batch, task)
        (full,) = seen
        assert full.size(-1) == V + 256
        if task == "t2i":
            targets, own = batch.image_codes, full[..., V:]
            manual = F.cross_entropy(full.flatten(0, 1), (targets + V).flatten())
        else:
            targets, own = batch.labels, full[..., :V]
            manual = F.cross_entropy(full.flatten(0, 1), targets.flatten(), ignore_index=-100)
        torch.testing.assert_close(logits, own)
        torch.testing.assert_close(loss, manual)
        # the other modality's ids take probability too: more loss than over the task's own ids alone
        assert loss.item() > F.cross_entropy(own.flatten(0, 1), targets.flatten(), ignore_index=-100).item() + 1e-3


def test_lora_share_of_the_paper_preset():
    with torch.device("meta"):
        model = OmniMamba(preset("omnimamba-1.3b"), backend="reference")
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    c = model.config.backbone
    per_layer = 2 * 8 * (c.d_model + c.d_in_proj)  # two routes of rank 8 on in_proj
    assert lora == c.n_layer * per_layer == 8_110_080


def test_errors():
    model = make_model()
    mb = mmu_batch()
    with pytest.raises(UserError, match="takes 64x64 images"):
        model(mmu=MMUBatch(torch.rand(2, 3, 32, 32), mb.text_ids, mb.labels))
    with pytest.raises(UserError, match="RGB"):
        model(mmu=MMUBatch(torch.rand(2, 1, 64, 64), mb.text_ids, mb.labels))
    with pytest.raises(ValueError, match="unknown task 'vqa'"):
        model.task_forward(mb, "vqa")
    with pytest.raises(UserError, match="unknown encoder"):
        OmniMamba(preset("shapes-tiny").replace(understanding=preset("omnimamba-1.3b").understanding.replace(
            kind="timm", backbones=("not_a_vit",))))
    with pytest.raises(UserError, match="at most 24"):
        t2i_prefix(TOK, "red " * 30, 24)
    with pytest.raises(UserError, match="unknown OmniMamba preset"):
        preset("omnimamba-7b")
