"""Training the VQ tokenizer of the embedded default: reconstruction + codebook + commitment losses
(the perceptual-free variant: no LPIPS or GAN term, which would need pretrained networks)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import UserError
from ..vision.vq import VQConfig, VQModel
from .data import images_to_tensor


def train_vq(vq: VQModel, images_of, n_images: int, steps: int, lr: float, batch: int, seed: int = 0,
             device="cpu", progress: bool = True) -> dict:
    from tqdm import tqdm

    vq.to(device).train()
    vq.requires_grad_(True)
    opt = torch.optim.AdamW(vq.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = np.random.default_rng([seed, 41])
    history = []
    bar = tqdm(range(steps), desc="train VQ tokenizer", disable=not progress)
    for step in bar:
        for g in opt.param_groups:  # cosine decay to 10%
            g["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / max(1, steps))))
        idx = rng.integers(n_images, size=batch)
        x = images_to_tensor([images_of(int(i)) for i in idx]).to(device) * 2 - 1
        rec, _, q = vq(x)
        recon = F.mse_loss(rec, x) + F.l1_loss(rec, x)
        loss = recon + q["codebook"] + q["commitment"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vq.parameters(), 1.0)
        opt.step()
        history.append(recon.item())
        bar.set_postfix(recon=f"{recon.item():.4f}")
    vq.eval()
    vq.requires_grad_(False)
    return {"steps": steps, "final_recon_loss": float(np.mean(history[-20:])) if history else None}


def save_vq(vq: VQModel, path: str | Path) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"vq": dataclasses.asdict(vq.config)}, indent=1))
    save_file({k: v.contiguous().cpu() for k, v in vq.state_dict().items()}, str(path / "model.safetensors"))


def load_vq(path: str | Path, config: VQConfig | None = None) -> VQModel:
    """A VQ directory written by `save_vq`, or LlamaGen's checkpoint file (e.g. vq_ds16_c2i.pt)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file():
        return VQModel.from_llamagen(path, config)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{path}: neither a VQ checkpoint file nor a VQ directory with config.json")
    vq = VQModel(VQConfig(**json.loads(cfg_file.read_text())["vq"]))
    vq.load_state_dict(load_file(str(path / "model.safetensors")))
    return vq.eval()
