"""Evaluating a model on the Shapes world: answers and generated images, scored by the Shapes scorer."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..data.formats import images_to_tensor, picture_grid
from ..inference import answer, generate_images
from ..sequence import IGNORE_INDEX, MMUBatch, T2IBatch, mmu_example, t2i_prefix
from .shapes_scorer import (FAILURES, T2I_CATEGORIES, MMURecord, colours_kept, format_failures, mmu_eval_set, score_mmu,
                            score_t2i, t2i_eval_set)


@torch.no_grad()
def evaluate_mmu(model, tokenizer, world, split: str = "val", n_images: int = 50, batch_size: int = 64,
                 max_new_tokens: int = 48) -> tuple[dict, list[tuple]]:
    """Greedy answers to every question of the first n_images images of `split`."""
    items = mmu_eval_set(world, split, n_images)
    records, shown = [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        images = [world.sample(split, i).image for i, _ in chunk]
        preds = answer(model, tokenizer, images, [q.question for _, q in chunk], max_new_tokens=max_new_tokens)
        for (i, q), p in zip(chunk, preds):
            records.append(MMURecord(q.type, q.answer, p, q.pope))
            shown.append((i, q.question, q.answer, p))
    return score_mmu(records), shown


@torch.no_grad()
def tokenizer_round_trip(vq, world, split: str = "test", n_prompts: int = 48) -> dict:
    """The T2I scorer on `split`'s ground-truth renders after the VQ tokenizer's encode + decode ('round_trip':
    the ceiling any generated image meets), and per colour the share of drawn objects that keep it."""
    from ..vision.vq import to_uint8

    prompts = t2i_eval_set(world, split, n_prompts)
    samples = [world.sample(split, i) for _, i in prompts]
    device = next(vq.parameters()).device
    images = list(to_uint8(vq.decode(vq.encode(images_to_tensor([s.image for s in samples]).to(device) * 2 - 1))))
    return {"round_trip": score_t2i(images, [p for p, _ in prompts]),
            "colours_kept": colours_kept([s.objects for s in samples], images)}


@torch.no_grad()
def evaluate_t2i(model, tokenizer, world, split: str = "val", n_prompts: int = 24, guidance_scale: float = 3.0,
                 temperature: float = 1.0, top_k: int = 0, seed: int = 0, batch_size: int = 32,
                 epsilon: float = 0.0) -> tuple[dict, list]:
    prompts = [p for p, _ in t2i_eval_set(world, split, n_prompts)]
    images = generate_images(model, tokenizer, prompts, guidance_scale=guidance_scale, temperature=temperature,
                             top_k=top_k, seed=seed, batch_size=batch_size, epsilon=epsilon)
    arrays = [np.asarray(im) for im in images]
    return score_t2i(arrays, prompts), list(zip(arrays, prompts))


@torch.no_grad()
def split_losses(model, tokenizer, world, split: str = "test", n_images: int = 50, batch_size: int = 32) -> dict:
    """The model's mean negative log-likelihood (nats per target token) of a split's ground truth: the answer
    tokens of every question of the first n_images images (MMU), and the tokenizer's codes of those images
    under their first caption (T2I). Lower is better; unlike sampled scores it carries no sampling noise, so
    it tells apart models whose scores are still close. The likelihood is the one sampling draws from: over the
    task's own modality (a unified vocabulary's other modality masked, as when sampling), so vocabularies compare.
    Also `<task>_off_modality`: the mean of -log P(the task's own modality) at those positions, in nats, what a
    unified vocabulary loses to the other modality's ids before the masking (0 for decoupled vocabularies)."""
    device = next(model.parameters()).device
    was_training, loss_chunk = model.training, model.loss_chunk
    model.eval()
    model.loss_chunk = 0  # the logits are needed
    samples = [world.sample(split, i) for i in range(n_images)]
    total = {"mmu": [0.0, 0, 0.0], "t2i": [0.0, 0, 0.0]}  # masked loss sum, targets, loss sum as trained

    def add(task, out, targets):
        logits = out[0].flatten(0, 1).float()
        total[task][0] += float(F.cross_entropy(logits, targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"))
        total[task][1] += int(out[2])
        total[task][2] += float(out[1])

    items = [(i, q) for i, s in enumerate(samples) for q in s.questions]
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        batch = MMUBatch.collate(images_to_tensor([samples[i].image for i, _ in chunk]),
                                 [mmu_example(tokenizer, [(q.question, q.answer)]) for _, q in chunk],
                                 tokenizer.special)
        batch = batch.to(device)
        add("mmu", model.forward_mmu(batch, reduction="sum"), batch.labels)
    codes = _image_codes(model, samples, batch_size)
    for batch in _t2i_batches(model, tokenizer, [s.captions[0] for s in samples], codes, False, batch_size):
        add("t2i", model.forward_t2i(batch, reduction="sum"), batch.image_codes)
    model.train(was_training)
    model.loss_chunk = loss_chunk
    out = {}
    for task, (masked, n, trained) in total.items():
        out[f"{task}_loss"] = masked / max(n, 1)
        # the trained loss's per-token log-probabilities are the masked ones plus log P(own modality)
        out[f"{task}_off_modality"] = 0.0 if model.config.decoupled_vocab else max(trained - masked, 0.0) / max(n, 1)
    return out


def _image_codes(model, samples, batch_size: int) -> torch.Tensor:
    """The tokenizer's codes (n, tokens) of the samples' images, encoded batch_size at a time, on the CPU."""
    device = next(model.parameters()).device
    return torch.cat([model.vq.encode(images_to_tensor([s.image for s in samples[i:i + batch_size]]).to(device) * 2 - 1)
                      for i in range(0, len(samples), batch_size)]).long().cpu()


def _t2i_batches(model, tokenizer, captions: list[str], codes: torch.Tensor, drop: bool, batch_size: int):
    """T2I batches on the model's device: each caption's prefix (the null caption where `drop`) and its codes."""
    device = next(model.parameters()).device
    for i in range(0, len(captions), batch_size):
        prefixes = [t2i_prefix(tokenizer, c, model.config.max_caption_tokens) for c in captions[i:i + batch_size]]
        yield T2IBatch.collate(prefixes, codes[i:i + batch_size], tokenizer.special, [drop] * len(prefixes)).to(device)


def caption_information(model, tokenizer, world, split: str = "test", n_images: int = 50, batch_size: int = 32
                        ) -> dict:
    """How much the model's image codes depend on the caption, in nats per code (the loss as trained), over the
    tokenizer's codes of a split's first n_images images on a plain background (a textured background's noise is
    no caption's business, and a model trained with data.shapes.t2i_plain never saw it): under their own first
    caption ('own'), under the next image's caption ('other'; a lower bound where two images share a caption),
    and under the learned null caption that guidance contrasts with ('null', None for a model without one).
    'information' = other - own: what the caption tells the model; 'guidance_gap' = null - own: the difference
    guidance amplifies."""
    if n_images < 2:
        raise ValueError(f"caption_information needs at least 2 images, got {n_images}")
    was_training = model.training
    model.eval()
    scenes = (world.sample(split, i) for i in itertools.count())
    samples = list(itertools.islice((s for s in scenes if not s.textured), n_images))
    own = [s.captions[0] for s in samples]
    rows = {"own": (own, False), "other": (own[1:] + own[:1], False)}
    if model.caption_embed.null_caption is not None:
        rows["null"] = (own, True)
    out = {"null": None}
    with torch.no_grad():
        codes = _image_codes(model, samples, batch_size)
        for name, (captions, drop) in rows.items():
            total, count = 0.0, 0
            for batch in _t2i_batches(model, tokenizer, captions, codes, drop, batch_size):
                result = model.forward_t2i(batch, reduction="sum")
                total, count = total + float(result[1]), count + int(result[2])
            out[name] = total / count
    model.train(was_training)
    out["information"] = out["other"] - out["own"]
    out["guidance_gap"] = None if out["null"] is None else out["null"] - out["own"]
    return out


def save_evaluation_picture(path: str | Path, generated: list, answered: list, world, split: str,
                            n: int = 8) -> None:
    """One PNG: generated images with their prompts, then images with a question, the model's answer and the truth."""
    items = [(img, f"prompt: {p}") for img, p in generated[:n]]
    # one question from each of n different images
    by_image = {}
    for row in answered:
        by_image.setdefault(row[0], []).append(row)
    picks = [rows[k % len(rows)] for k, rows in enumerate(by_image.values())][:n]
    for i, q, gold, pred in picks:
        items.append((world.sample(split, i).image, f"Q: {q} A: {pred} (true: {gold})"))
    picture_grid(items, path, columns=4)


def guidance_sweep(model, tokenizer, world, split: str = "val", n_prompts: int = 48,
                   scales: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0, 5.0), seeds: tuple[int, ...] = (0, 1, 2),
                   temperature: float = 1.0, top_k: int = 0, log=print, epsilon: float = 0.0) -> dict:
    """T2I score for each guidance scale, over sampling seeds: how much classifier-free guidance adds, and
    which scale to use. Returns {scale: {"mean", "std", "per_seed", per-category means}}."""
    result = {}
    for scale in scales:
        runs = [evaluate_t2i(model, tokenizer, world, split, n_prompts, scale, temperature, top_k, seed,
                             epsilon=epsilon)[0] for seed in seeds]
        overall = np.array([r["overall"] for r in runs])
        row = {"mean": float(overall.mean()), "std": float(overall.std(ddof=1)) if len(runs) > 1 else 0.0,
               "per_seed": overall.tolist()}
        for cat in T2I_CATEGORIES:
            if cat in runs[0]:
                row[cat] = float(np.mean([r[cat] for r in runs]))
        row["failures"] = {why: sum(r["failures"].get(why, 0) for r in runs) for why in FAILURES
                           if any(why in r["failures"] for r in runs)}
        result[str(scale)] = row
        log(f"guidance {scale:>4g}: T2I {row['mean']:.1%} ± {row['std']:.1%} over seeds {list(seeds)}; "
            f"failures: {format_failures(row['failures'])}")
    return result
