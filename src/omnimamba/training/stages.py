"""Freeze plans of the decoupled two-stage training (paper section 3.5, Fig. 4).

    stage1-mmu      projector + MMU LoRA (+ MMU positions)                backbone, encoders, T2I route frozen
    stage1-t2i      T2I LoRA + image head / embedding + T2I positions + caption embedder
                                                                         backbone, encoders, MMU route frozen
    stage2-unified  everything but the vision encoders (understanding encoder, VQ)
"""

from __future__ import annotations

import torch.nn as nn

from .config import STAGES


def _lora_params(model, task: str):
    for name, p in model.backbone.named_parameters():
        if f"lora_A.{task}." in name or f"lora_B.{task}." in name:
            yield p


def never_trained(model: nn.Module, train_understanding: bool = False) -> tuple[nn.Module, ...]:
    """The modules no stage trains (apply_freeze_plan): the VQ tokenizer, and the understanding encoder unless
    `train_understanding`."""
    return (model.vq,) if train_understanding else (model.vq, model.understanding)


def apply_freeze_plan(model: nn.Module, stage: str, train_understanding: bool = False) -> None:
    """Set requires_grad for `stage`. `train_understanding` unfreezes the understanding encoder, for
    encoders that have no pretrained weights (the embedded default's tiny encoder)."""
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; stages are {list(STAGES)}")
    model.requires_grad_(False)
    trainable: list[nn.Parameter] = []
    if stage == "stage1-mmu":
        trainable += list(model.projector.parameters()) + list(_lora_params(model, "mmu"))
        if model.config.mmu_positions:  # new like the projector; the MMU counterpart of stage1-t2i's positions
            trainable += [model.mmu_pos_embed]
    elif stage == "stage1-t2i":
        trainable += list(_lora_params(model, "t2i"))
        trainable += list(model.caption_embed.parameters()) + [model.t2i_pos_embed]
        if model.config.decoupled_vocab:
            trainable += list(model.image_embedding.parameters()) + list(model.image_head.parameters())
        else:  # the unified-vocabulary ablation's image rows live in the shared embedding
            trainable += [model.backbone.embedding.weight, model.lm_head.weight]
    else:
        for name, module in model.named_children():
            if name not in ("understanding", "vq"):
                trainable += list(module.parameters())
        trainable += list(model.parameters(recurse=False))  # t2i_pos_embed, mmu_pos_embed
    if train_understanding and stage != "stage1-t2i":
        trainable += list(model.understanding.parameters())
    for p in trainable:
        p.requires_grad_(True)


def freeze_summary(model: nn.Module) -> str:
    """Trainable / frozen parameter counts per top-level module, so the freeze plan is visible."""
    rows: dict[str, list[int]] = {}
    seen = set()
    for name, p in model.named_parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        key = "task LoRA" if ".lora_" in name else name.split(".")[0]
        row = rows.setdefault(key, [0, 0])
        row[0 if p.requires_grad else 1] += p.numel()
    lines = [f"{'module':<18}{'trainable':>14}{'frozen':>14}"]
    for key, (t, f) in rows.items():
        lines.append(f"{key:<18}{t:>14,}{f:>14,}")
    total_t = sum(r[0] for r in rows.values())
    total_f = sum(r[1] for r in rows.values())
    lines.append(f"{'total':<18}{total_t:>14,}{total_f:>14,}")
    return "\n".join(lines)
