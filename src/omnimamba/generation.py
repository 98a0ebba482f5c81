"""Sampling with the recurrent cache: one prefill over the prompt, then O(1) work per new token."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .errors import UserError


def check_sampling_args(temperature: float, top_k: int, top_p: float, epsilon: float = 0.0) -> None:
    if not math.isfinite(temperature) or temperature < 0:
        raise UserError(f"temperature must be a finite number >= 0 (0 means greedy), got {temperature}")
    if top_k < 0:
        raise UserError(f"top_k must be >= 0 (0 means no top-k filter), got {top_k}")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1], got {top_p}")
    if not 0 <= epsilon < 1:
        raise UserError(f"epsilon must be in [0, 1) (0 means no floor), got {epsilon}")


def filter_logits(logits: Tensor, top_k: int = 0, top_p: float = 1.0) -> Tensor:
    """Set to -inf every logit outside the top-k and outside the nucleus of mass top_p. logits (b, V)."""
    if top_k and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits.float(), dim=-1).cumsum(-1)
        # Drop a token when the mass before it already reaches top_p; the most likely token always stays.
        drop_sorted = (cum - torch.softmax(sorted_logits.float(), dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def epsilon_floor(logits: Tensor, reference: Tensor, epsilon: float) -> Tensor:
    """epsilon-sampling's truncation (Hewitt et al., 2022): logits (b, V) set to -inf wherever the probability
    under `reference` (b, V) logits is below epsilon; each row's most likely token under `reference` stays.
    With guidance the reference is the conditional model: guidance then reorders only what the caption's model
    finds plausible, instead of lifting its tail (uncond + s * (cond - uncond) grows wherever the unconditional
    model is even less likely than the conditional one, however unlikely both are)."""
    probs = torch.softmax(reference.float(), dim=-1)
    return logits.masked_fill(probs < torch.clamp(probs.amax(-1, keepdim=True), max=epsilon), float("-inf"))


def sample_next_token(
    logits: Tensor,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
) -> Tensor:
    """logits (b, V) -> token ids (b,). Greedy (argmax) when temperature is 0."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = filter_logits(logits.float() / temperature, top_k, top_p)
    probs = torch.softmax(logits, dim=-1)
    # torch.multinomial(probs, 1) draws exactly this (exponential noise from the same generator, argmax of
    # probs / noise: the same tokens, the generator left in the same state), but first checks the
    # probabilities with a .item(), which waits for the GPU at every token; this leaves the GPU a step ahead.
    noise = torch.empty_like(probs).exponential_(1, generator=generator)
    return (probs / noise).argmax(dim=-1)


def make_generator(seed: int | None, device: torch.device) -> torch.Generator | None:
    """A seeded generator on `device`, or None (the global RNG) when seed is None."""
    if seed is None:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


class DoneFlag:
    """"Has every row finished?" read one step late without stalling a GPU: `post(flag)` queues the flag's
    copy to pinned host memory behind the work that computes it; `read()` waits for that copy alone, so the
    next step, launched between the two, is already queued and the GPU never idles while the host decides.
    (bool() on a CUDA tensor would wait for every launched kernel, the next step's included.) On a CPU both
    are plain reads."""

    def __init__(self, device: torch.device):
        self._cuda = torch.device(device).type == "cuda"
        if self._cuda:
            self._host = torch.zeros((), dtype=torch.bool, pin_memory=True)
            self._copied = torch.cuda.Event()
        self._flag: Tensor | None = None

    def post(self, flag: Tensor) -> None:
        if self._cuda:
            self._host.copy_(flag, non_blocking=True)
            self._copied.record()
        else:
            self._flag = flag

    def read(self) -> bool:
        if self._cuda:
            self._copied.synchronize()
            return bool(self._host)
        return bool(self._flag)


@torch.no_grad()
def generate(
    model,
    input_ids: Tensor,
    max_new_tokens: int,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id: int | None = None,
    seed: int | None = None,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """Continue each prompt of `input_ids` (b, l) by up to `max_new_tokens` tokens.

    Prompts of different lengths are left-padded with `attention_mask` (b, l) marking real tokens. A
    sequence that emitted `eos_token_id` is padded with it afterwards; generation stops when all have.
    Returns (b, l + new) token ids, prompts included.
    """
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_sampling_args(temperature, top_k, top_p)
    model.check_input_ids(input_ids)
    device = input_ids.device
    generator = make_generator(seed, device)
    cache = model.allocate_cache(input_ids.size(0), device=device)
    logits = model(input_ids, cache=cache, attention_mask=attention_mask)[:, -1]
    vocab = model.config.vocab_size  # never sample the padding rows of the embedding
    out = [input_ids]
    finished = torch.zeros(input_ids.size(0), dtype=torch.bool, device=device)
    for i in range(max_new_tokens):
        token = sample_next_token(logits[:, :vocab], temperature, top_k, top_p, generator)
        if eos_token_id is not None:
            token = token.masked_fill(finished, eos_token_id)
            finished |= token == eos_token_id
        out.append(token[:, None])
        if (eos_token_id is not None and bool(finished.all())) or i == max_new_tokens - 1:
            break
        logits = model.step(token, cache)
    return torch.cat(out, dim=1)
