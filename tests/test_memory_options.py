"""Training memory options give the training they replace: per-block activation checkpointing, the chunked
head + cross-entropy (no (tokens, vocabulary) float32 logits) and gradient accumulation over micro-batches,
against the plain forward and backward, on the CPU, in float32, with the recomputation counted so the options
are known to be on."""

import json

import pytest
import torch

from omnimamba.errors import UserError
from omnimamba.model import OmniMamba, preset
from omnimamba.model.loss import token_loss
from omnimamba.sequence import IGNORE_INDEX, MMUBatch, T2IBatch, mmu_example, t2i_prefix
from omnimamba.tokenizer import TextTokenizer
from omnimamba.training.config import config_from_dict
from omnimamba.training.loop import Trainer
from omnimamba.training.step import micro_splits

TOK = TextTokenizer.shapes()


def batches():
    gen = torch.Generator().manual_seed(1)
    turns = [("how many circles are there?", "two"), ("what color is the square?", "red"),
             ("describe the image.", "a big red square above a small blue circle")]
    mmu = MMUBatch.collate(torch.rand(3, 3, 64, 64, generator=gen), [mmu_example(TOK, [t]) for t in turns],
                           TOK.special)
    captions = ["a red circle", "two blue squares left of a green triangle"]
    t2i = T2IBatch.collate([t2i_prefix(TOK, c, 24) for c in captions],
                           torch.randint(0, 256, (2, 256), generator=gen), TOK.special)
    return mmu, t2i


def loss_and_grads(model, seed=0):
    mmu, t2i = batches()
    model.zero_grad()
    torch.manual_seed(seed)  # the LoRA dropout's masks
    out = model(mmu=mmu, t2i=t2i, t2i_drop=torch.tensor([False, True]))
    out["loss"].backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same_grads(grads, reference, tol):
    """Each parameter's gradient within `tol` of the reference's, relative to the reference's norm. Parameters
    whose true gradient is 0 (attention key biases, conv biases before a GroupNorm) hold rounding noise instead,
    which scales with the gradients flowing past them: those are held elementwise to 1e-6 of the model's largest
    gradient (the understanding encoder's first conv bias: 3.5e-8 apart, the largest gradient 0.62; every
    parameter with a true gradient agrees to within 7e-6 relative)."""
    assert set(grads) == set(reference)
    noise = 1e-6 * max(float(g.abs().max()) for g in reference.values())
    for name, g in grads.items():
        err = (g - reference[name]).norm() / reference[name].norm().clamp(min=1e-12)
        assert err < tol or (g - reference[name]).abs().max() < noise, (name, float(err))


def count_calls(module):
    calls = [0]
    module.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))  # the recomputation may stop early
    return calls


def test_chunked_loss_equals_the_plain_loss_and_gradients():
    torch.manual_seed(0)
    model = OmniMamba(preset("shapes-tiny"), backend="reference").train()
    plain, plain_grads = loss_and_grads(model)
    heads = count_calls(model.lm_head)
    model.loss_chunk = 7  # divides neither task's target count: a short last chunk
    chunked, grads = loss_and_grads(model)
    for key in ("mmu_loss", "t2i_loss", "mmu_tokens", "t2i_tokens"):
        torch.testing.assert_close(chunked[key], plain[key], rtol=1e-6, atol=0)
    assert chunked["mmu_logits"] is None and chunked["t2i_logits"] is None
    assert plain["mmu_logits"].shape[-1] == model.config.text_vocab_size
    assert model.lm_head.weight.grad is not None and model.image_head.weight.grad is not None
    assert_same_grads(grads, plain_grads, 1e-5)
    # forward: one empty call + ceil(targets / 7) chunks; backward: each chunk once more (recomputed)
    chunks = -(-int(plain["mmu_tokens"]) // 7)
    assert heads[0] == 1 + 2 * chunks


def test_chunked_loss_without_targets_is_zero_and_reaches_the_head():
    head = torch.nn.Linear(8, 11)
    hidden = torch.randn(2, 5, 8, requires_grad=True)
    targets = torch.full((2, 5), IGNORE_INDEX)
    logits, loss, tokens = token_loss(hidden, head, targets, chunk=3)
    assert logits is None and loss.item() == 0.0 and int(tokens) == 0
    loss.backward()
    assert torch.equal(head.weight.grad, torch.zeros_like(head.weight))


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = OmniMamba(preset("shapes-tiny", lora_dropout=0.1), backend="reference").train()
    with torch.no_grad():  # LoRA B starts at zero, which would hide the dropout before it
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    plain, plain_grads = loss_and_grads(model)
    blocks = count_calls(model.backbone.layers[0])
    model.backbone.gradient_checkpointing = True
    again, grads = loss_and_grads(model)
    assert blocks[0] == 2 * 2  # two tasks, each block run in the forward and again in the backward
    torch.testing.assert_close(again["loss"], plain["loss"], rtol=0, atol=0)
    assert_same_grads(grads, plain_grads, 1e-6)  # the recomputation draws the same dropout masks
    different, _ = loss_and_grads(model, seed=1)  # other masks: the dropout is really on
    assert not torch.equal(different["loss"], plain["loss"])
    before = blocks[0]
    with torch.no_grad():  # inference never recomputes
        model.eval()
        model(mmu=batches()[0])
    assert blocks[0] == before + 1


def test_checkpointing_some_blocks_recomputes_those_alone_with_the_same_gradients():
    torch.manual_seed(0)
    model = OmniMamba(preset("shapes-tiny"), backend="reference").train()
    plain, plain_grads = loss_and_grads(model)
    n = len(model.backbone.layers)
    assert n >= 2
    first, last = count_calls(model.backbone.layers[0]), count_calls(model.backbone.layers[-1])
    model.backbone.gradient_checkpointing, model.backbone.checkpoint_blocks = True, 1
    again, grads = loss_and_grads(model)
    assert (first[0], last[0]) == (2 * 2, 2)  # two tasks: the first block run twice each, the last once
    torch.testing.assert_close(again["loss"], plain["loss"], rtol=0, atol=0)
    assert_same_grads(grads, plain_grads, 1e-6)
    model.backbone.checkpoint_blocks = n + 5  # more than there are: every block
    assert model.backbone.n_recomputed() == n
    model.backbone.gradient_checkpointing = False  # the count alone turns nothing on
    assert model.backbone.n_recomputed() == 0


def test_a_negative_block_count_is_refused_by_name():
    with pytest.raises(UserError, match="run.checkpoint_blocks"):
        config_from_dict({"run": {"checkpoint_blocks": -1}})


def train_losses(out, batch=(2, 2), **run):
    config = config_from_dict({
        "model": {"preset": "shapes-tiny"}, "data": {"shapes": {"train_images": 32}},
        "stages": [{"name": "stage2-unified", "steps": 3, "lr": 0.002, "batch": list(batch)}],
        "run": {"out": str(out), "eval_images": 0, "eval_prompts": 0, "progress": False, "log_every": 1,
                "tensorboard": False, **run}})
    Trainer(config, log=lambda *a, **k: None).run()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # the loss and the gradient's norm (before clipping; Adam's update alone would hide a wrong gradient scale)
    return [(r["loss"], r["grad_norm"]) for r in rows if "loss" in r and r.get("stage") == "stage2-unified"]


def test_training_with_both_options_follows_the_plain_run(tmp_path):
    plain = train_losses(tmp_path / "plain")
    lean = train_losses(tmp_path / "lean", activation_checkpointing=True, loss_chunk=16)
    some = train_losses(tmp_path / "some", activation_checkpointing=True, checkpoint_blocks=1)
    assert len(plain) == 3
    torch.testing.assert_close(torch.tensor(lean), torch.tensor(plain), rtol=1e-4, atol=0)
    torch.testing.assert_close(torch.tensor(some), torch.tensor(plain), rtol=1e-4, atol=0)


def test_micro_batches_accumulate_to_the_whole_batch(tmp_path):
    """Gradient accumulation: the step's batch in micro-batches of 1 and 3 sequences per task (MMU 2, T2I 5:
    the tasks split over the same number of forwards) trains as the whole batch at once."""
    whole = train_losses(tmp_path / "whole", batch=[2, 5])
    for size in (1, 3):
        micro = train_losses(tmp_path / f"micro{size}", batch=[2, 5], micro_batch=size)
        # float32 sums in another order, through two Adam updates (which scale small gradient entries up): the
        # third step's gradient norm differs by 1.1e-5 relative with the 17-wide conv; a lost or doubly counted
        # micro-batch moves the figures by tens of percent
        torch.testing.assert_close(torch.tensor(micro), torch.tensor(whole), rtol=5e-5, atol=0)


def test_micro_splits_cover_each_task_once_within_the_size():
    for mmu, t2i, size in ((2, 5, 1), (2, 5, 3), (0, 7, 2), (6, 0, 4), (3, 48, 16), (4, 4, 0)):
        splits = micro_splits(list(range(mmu)), list(range(100, 100 + t2i)), size)
        assert [i for m, _ in splits for i in m] == list(range(mmu))
        assert [i for _, t in splits for i in t] == list(range(100, 100 + t2i))
        assert all(m or t for m, t in splits)
        if size:
            assert all(len(m) <= size and len(t) <= size for m, t in splits)
            assert len(splits) == -(-max(mmu, t2i) // size)
        else:
            assert len(splits) == 1


def test_negative_memory_options_are_refused():
    with pytest.raises(UserError, match="run.loss_chunk"):
        config_from_dict({"run": {"loss_chunk": -1}})
    with pytest.raises(UserError, match="run.micro_batch"):
        config_from_dict({"run": {"micro_batch": -1}})
