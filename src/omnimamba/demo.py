"""A backbone demo that needs no data: train a tiny Mamba-2 to continue arithmetic progressions mod V,
then decode with the recurrent cache and check it against a full forward pass."""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .mamba2 import Mamba2LM, preset
from .training.optim import adamw


def progressions(n: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """(n, length) sequences x_t = (x_0 + t * d) mod vocab with random x_0 and d in 1..7."""
    start = torch.randint(0, vocab, (n, 1), generator=generator)
    step = torch.randint(1, 8, (n, 1), generator=generator)
    return (start + step * torch.arange(length)) % vocab


def backbone_demo(steps: int = 300, seed: int = 0, progress: bool = True) -> dict:
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    vocab = 64
    model = Mamba2LM(preset("mamba2-tiny", vocab_size=vocab, pad_vocab_size_multiple=1), backend="auto")
    opt = adamw(model.parameters(), lr=3e-3, betas=(0.9, 0.95))
    losses = []
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="train mamba2-tiny", disable=not progress)
    for _ in bar:
        seq = progressions(32, 33, vocab, gen)
        logits = model(seq[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, vocab), seq[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    train_s = time.perf_counter() - start

    model.eval()
    test = progressions(64, 24, vocab, gen)
    out = model.generate(test[:, :8], max_new_tokens=16, temperature=0)
    accuracy = (out[:, 8:] == test[:, 8:]).float().mean().item()
    with torch.no_grad():
        full = model(out[:, :-1])
        cache = model.allocate_cache(out.size(0))
        stitched = [model(out[:, :8], cache=cache)]
        stitched += [model.step(out[:, t], cache)[:, None] for t in range(8, out.size(1) - 1)]
    parity = ((torch.cat(stitched, 1) - full).norm() / full.norm()).item()
    return {
        "steps": steps,
        "first_loss": losses[0],
        "last_loss": sum(losses[-10:]) / min(10, len(losses)),
        "chance_loss": float(torch.log(torch.tensor(float(vocab)))),
        "continuation_accuracy": accuracy,
        "decode_vs_forward_rel_error": parity,
        "cache_bytes": cache.nbytes,
        "train_seconds": train_s,
    }
