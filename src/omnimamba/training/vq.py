"""Training the VQ tokenizer of the embedded default: reconstruction + codebook + commitment losses
(the perceptual-free variant: no LPIPS or GAN term, which would need pretrained networks)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import torch

from ..errors import UserError
from ..fileio import manifested_folder, read_json, read_safetensors, require_intact
from ..vision.vq import VQConfig, VQModel
from ..data.formats import images_to_tensor
from .optim import adamw


def reconstruction_loss(rec: torch.Tensor, x: torch.Tensor, foreground_weight: float = 0.0) -> torch.Tensor:
    """MSE + L1, optionally weighting pixels away from the image's median colour (its background) by
    1 + foreground_weight: on mostly-empty images this makes small objects' colour and shape learnt first."""
    err = (rec - x).pow(2) + (rec - x).abs()
    if foreground_weight:
        background = x.flatten(2).median(dim=2).values[..., None, None]
        fg = ((x - background).abs().sum(1, keepdim=True) > 0.15).float()
        err = err * (1 + foreground_weight * fg)
    return err.mean()


def reinit_vq_(vq: VQModel, seed: int) -> VQModel:
    """Give `vq` the initial weights a VQModel of its config draws from `seed` alone (the global RNG is left as it
    was), so a tokenizer trained from scratch does not depend on what was drawn before it: built inside the
    model, its init followed the backbone's shape, and a wider conv (d_conv 4 -> 17) gave the quickstart a
    tokenizer whose red, yellow and orange latents collapsed (round trip 77 %, red and yellow kept 0 %); the
    same settings from seeds 0, 1, 2 kept every colour (round trip 99.0, 94.8, 93.8 %)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        fresh = VQModel(vq.config)
    vq.load_state_dict(fresh.state_dict())
    return vq


def train_vq(vq: VQModel, images_of, n_images: int, steps: int, lr: float, batch: int, seed: int = 0,
             device="cpu", progress: bool = True, foreground_weight: float = 0.0,
             record=None, record_every: int = 10, restart: str = "dead", desc: str = "train VQ tokenizer") -> dict:
    """Train `vq` on images_of(i), i < n_images. `record(step, {"recon_loss": ...})` is called every
    `record_every` steps (the run's metrics). `restart` says which codes are moved onto which latents every
    RESTART_EVERY steps (restart_codes)."""
    from tqdm import tqdm

    # On a CPU the convolutions run faster in NHWC (channels-last) layout: 0.165 -> 0.136 s per step of the
    # quickstart's tokenizer (batch 8) on this project's 2-core machine; the layout is put back at the end
    # (safetensors stores contiguous tensors). The same computation (its rounding may differ); GPUs keep their
    # layout (not measured).
    layout = torch.channels_last if torch.device(device).type == "cpu" else torch.contiguous_format
    vq.to(device, memory_format=layout).train()
    vq.requires_grad_(True)
    opt = adamw(vq.parameters(), lr=lr, betas=(0.9, 0.95))
    rng = np.random.default_rng([seed, 41])
    gen = torch.Generator().manual_seed(seed)
    history: list[float] = []
    pending: list[torch.Tensor] = []  # losses not yet read back: no device sync every step
    usage = torch.zeros(vq.config.codebook_size, dtype=torch.long, device=device)
    bar = tqdm(range(steps), desc=desc, disable=not progress)
    for step in bar:
        for g in opt.param_groups:  # cosine decay to 10%
            g["lr"] = lr * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * step / max(1, steps))))
        idx = rng.integers(n_images, size=batch)
        x = (images_to_tensor([images_of(int(i)) for i in idx]).to(device) * 2 - 1).contiguous(memory_format=layout)
        rec, codes, q = vq(x)
        recon = reconstruction_loss(rec, x, foreground_weight)
        loss = recon + q["codebook"] + q["commitment"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vq.parameters(), 1.0)
        opt.step()
        usage += torch.bincount(codes.flatten(), minlength=usage.numel())
        if step % RESTART_EVERY == 0 and step < steps * 0.8:
            restart_codes(vq, q["z"].detach(), usage, gen, first=step == 0, mode=restart)
            usage.zero_()
        pending.append(recon.detach())
        if step % record_every == 0 or step == steps - 1:
            history += torch.stack(pending).tolist()
            pending.clear()
            bar.set_postfix(recon=f"{history[-1]:.4f}")
            if record is not None:
                record(step, {"recon_loss": float(np.mean(history[-record_every:]))})
    vq.to(memory_format=torch.contiguous_format).eval()
    vq.requires_grad_(False)
    return {"steps": steps, "final_recon_loss": float(np.mean(history[-20:])) if history else None}


RESTART_EVERY = 20


RESTART_MODES = ("dead", "split")


@torch.no_grad()
def restart_codes(vq: VQModel, z: torch.Tensor, usage: torch.Tensor, gen: torch.Generator,
                  first: bool = False, mode: str = "dead") -> int:
    """Move codebook vectors onto current latents z (at the first step: all of them onto random latents, a
    data-dependent initialisation). Without this a small VQ collapses onto a handful of codes.

    mode "dead": the codes unused since the last restart, onto latents drawn uniformly.
    mode "split": also the codes used less than a tenth as often as the average one, onto latents drawn in
    proportion to their squared distance from their nearest code (k-means++'s rule), so the freed codes go
    where the codebook quantises worst (on Shapes: small objects whose colours share a code) rather than to
    the background that most latents are. (Drawing them by the decoder's pixel error instead, 3394a6f, did no
    better: docs/results/quickstart-cpu/tokenizer.)"""
    if mode not in RESTART_MODES:
        raise UserError(f"vq_train.restart must be one of {', '.join(RESTART_MODES)}, got {mode!r}")
    table = vq.quantize.embedding.weight
    if first:
        moved = torch.arange(table.size(0))
    elif mode == "split":
        moved = (usage < 0.1 * usage.sum() / usage.numel()).nonzero().flatten().cpu()
    else:
        moved = (usage == 0).nonzero().flatten().cpu()
    if len(moved):
        if first or mode == "dead":
            pick = torch.randint(0, z.size(0), (len(moved),), generator=gen)
        else:
            err = torch.cdist(z.float(), vq.quantize.codebook().float()).min(dim=1).values.pow(2).cpu()
            pick = torch.multinomial(err + 1e-12, len(moved), replacement=True, generator=gen)
        table[moved.to(table.device)] = z[pick.to(z.device)] + 0.01 * torch.randn(len(moved), z.size(1), generator=gen).to(z)
    return len(moved)


def save_vq(vq: VQModel, path: str | Path) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    with manifested_folder(path, "VQ tokenizer folder"):
        (path / "config.json").write_text(json.dumps({"vq": dataclasses.asdict(vq.config)}, indent=1))
        save_file({k: v.contiguous().cpu() for k, v in vq.state_dict().items()}, str(path / "model.safetensors"))


def load_into(vq: VQModel, path: str | Path, what: str) -> VQModel:
    """Load the tokenizer folder `path` (save_vq's) into `vq`, which must have its architecture; `what` names it in
    the error (a run folder trained by another version, say)."""
    saved = load_vq(path)
    if saved.config != vq.config:
        changed = [f"{f.name} {getattr(saved.config, f.name)!r} (wanted {getattr(vq.config, f.name)!r})"
                   for f in dataclasses.fields(VQConfig) if getattr(saved.config, f.name) != getattr(vq.config, f.name)]
        raise UserError(f"{what}: {path} holds a tokenizer of another architecture: {', '.join(changed)}; give the "
                        f"folder of a tokenizer of this model's architecture, or a run.out without it to train one")
    vq.load_state_dict(saved.state_dict())
    return vq


def load_vq(path: str | Path, config: VQConfig | None = None) -> VQModel:
    """A VQ directory written by `save_vq`, or LlamaGen's checkpoint file (e.g. vq_ds16_c2i.pt)."""
    path = Path(path)
    if path.is_file():
        return VQModel.from_llamagen(path, config)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise UserError(f"{path}: neither a VQ checkpoint file nor a VQ directory with config.json")
    require_intact(path, "the VQ tokenizer folder")
    raw = read_json(cfg_file, "VQ config")
    try:
        vq = VQModel(VQConfig(**raw["vq"]))
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{cfg_file}: not a VQ config ({e})") from None
    try:
        vq.load_state_dict(read_safetensors(path / "model.safetensors", "VQ weights"))
    except RuntimeError as e:  # missing / unexpected / mis-shaped keys
        raise UserError(f"{path / 'model.safetensors'} does not match {cfg_file}:\n{e}") from None
    return vq.eval()
