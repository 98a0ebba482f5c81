"""`omnimamba params`: parameters per module of a preset."""

from __future__ import annotations

import torch

from .config import preset
from .core import OmniMamba


def parameter_report(preset_name: str) -> str:
    """A table of parameters per module of a preset (built on the meta device: no memory, no weights)."""
    with torch.device("meta"):
        model = OmniMamba(preset(preset_name), backend="reference")
    groups: dict[str, int] = {}
    for name, p in model.named_parameters():
        key = "task LoRA (in_proj)" if "lora_" in name else name.split(".")[0]
        groups[key] = groups.get(key, 0) + p.numel()
    total = sum(groups.values())
    backbone = groups.get("backbone", 0)
    embedding = model.backbone.embedding.weight.numel()
    lora = groups.get("task LoRA (in_proj)", 0)
    lines = [f"{preset_name}: {total:,} parameters", f"{'module':<24}{'parameters':>16}{'share':>9}"]
    for key, n in sorted(groups.items(), key=lambda kv: -kv[1]):
        lines.append(f"{key:<24}{n:>16,}{n / total:>9.2%}")
    if lora:
        lines.append(f"task LoRA vs the Mamba-2 backbone: {lora / backbone:.2%} of all its weights, "
                     f"{lora / (backbone - embedding):.2%} of its weights without the (tied) embedding")
    return "\n".join(lines)
