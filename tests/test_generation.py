"""Sampling: filters against their definitions, seeds, EOS, batching with left padding."""

import pytest
import torch

from omnimamba.generation import filter_logits, sample_next_token


def test_top_k_keeps_exactly_k():
    logits = torch.tensor([[1.0, 5.0, 3.0, 4.0, 2.0]])
    kept = torch.isfinite(filter_logits(logits, top_k=2))
    assert kept.tolist() == [[False, True, False, True, False]]


def test_top_p_keeps_smallest_nucleus():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    logits = probs.log()
    assert torch.isfinite(filter_logits(logits, top_p=0.5)).tolist() == [[True, False, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.8)).tolist() == [[True, True, False, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.81)).tolist() == [[True, True, True, False]]
    assert torch.isfinite(filter_logits(logits, top_p=0.01)).tolist() == [[True, False, False, False]]


def test_sampling_follows_the_distribution():
    logits = torch.tensor([[0.0, 1.0, 2.0]]).repeat(20000, 1)
    tokens = sample_next_token(logits, temperature=1.0, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(tokens, minlength=3).float() / tokens.numel()
    torch.testing.assert_close(freq, torch.softmax(torch.tensor([0.0, 1.0, 2.0]), 0), atol=0.015, rtol=0)


@pytest.mark.parametrize("rows,vocab,temperature,top_k", [(1, 50, 1.0, 0), (32, 16384, 1.0, 0), (3, 7, 0.7, 3)])
def test_sampling_draws_what_torch_multinomial_draws(rows, vocab, temperature, top_k):
    """sample_next_token avoids torch.multinomial's synchronising check but draws the same tokens from the same
    generator and leaves it in the same state, so seeded results made with multinomial still reproduce."""
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(rows)) * 3
    for seed in range(3):
        ours, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        for _ in range(4):  # consecutive draws: the generators stay in step
            probs = torch.softmax(filter_logits(logits / temperature, top_k), -1)
            expected = torch.multinomial(probs, 1, generator=theirs).squeeze(-1)
            assert torch.equal(sample_next_token(logits, temperature, top_k, generator=ours), expected)
        assert torch.equal(ours.get_state(), theirs.get_state())


def test_greedy_is_argmax():
    logits = torch.randn(4, 10)
    assert torch.equal(sample_next_token(logits, temperature=0), logits.argmax(-1))


def test_same_seed_same_tokens_none_varies(tiny_model):
    ids = torch.randint(0, 512, (2, 5))
    a = tiny_model.generate(ids, 20, temperature=1.0, seed=7)
    b = tiny_model.generate(ids, 20, temperature=1.0, seed=7)
    assert torch.equal(a, b) and a.shape == (2, 25)
    runs = {tuple(tiny_model.generate(ids, 20, temperature=1.0, seed=None).flatten().tolist()) for _ in range(3)}
    assert len(runs) > 1


def test_greedy_matches_argmax_of_full_forward(tiny_model):
    ids = torch.randint(0, 512, (1, 6))
    out = tiny_model.generate(ids, 8, temperature=0)
    with torch.no_grad():
        for t in range(6, 14):
            assert out[0, t] == tiny_model(out[:, :t])[0, -1, :512].argmax()


def test_eos_pads_finished_sequences(tiny_model):
    ids = torch.randint(0, 512, (3, 4))
    free = tiny_model.generate(ids, 6, temperature=0)
    eos = int(free[0, 5])  # the second token generated for row 0
    out = tiny_model.generate(ids, 6, temperature=0, eos_token_id=eos)
    assert (out[0, 5:] == eos).all()
    for row in range(3):
        hits = (out[row, 4:] == eos).nonzero()
        if len(hits):
            assert (out[row, 4 + hits[0, 0]:] == eos).all()


def test_batched_left_padded_equals_one_by_one(tiny_model):
    prompts = [torch.randint(1, 512, (n,)) for n in (3, 9, 6)]
    width = max(len(p) for p in prompts)
    ids = torch.zeros(3, width, dtype=torch.long)
    mask = torch.zeros(3, width)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = p
        mask[i, width - len(p):] = 1
    batched = tiny_model.generate(ids, 10, temperature=0, attention_mask=mask)
    for i, p in enumerate(prompts):
        single = tiny_model.generate(p[None], 10, temperature=0)
        assert torch.equal(batched[i, width:], single[0, len(p):])


def test_bad_sampling_arguments(tiny_model):
    ids = torch.tensor([[1, 2]])
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        tiny_model.generate(ids, 3, temperature=-1)
    with pytest.raises(ValueError, match="temperature must be a finite number >= 0"):
        tiny_model.generate(ids, 3, temperature=float("nan"))
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        tiny_model.generate(ids, 3, top_k=-1)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\]"):
        tiny_model.generate(ids, 3, top_p=0)
    with pytest.raises(ValueError, match="max_new_tokens must be >= 0"):
        tiny_model.generate(ids, -2)
