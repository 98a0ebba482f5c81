"""Where the Shapes tokenizer's training step goes (`vq_train` of configs/shapes-gpu.yaml: the shapes-small VQ,
batch 64, 64 px), as training/vq.py runs it: building the batch from uncached and cached Shapes samples, and the
model's step (forward, loss, backward, clipping, AdamW) in float32, under bf16 autocast, and in channels-last
layout. Ratios are against float32 in the same run.

    python benchmarks/vq_step.py [--steps 50] [--batch 64]

Writes benchmarks/results/vq_step.json (or under $OUT when set).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import numpy as np
import torch

import gpu_common as gc
from omnimamba.data.formats import images_to_tensor
from omnimamba.data.shapes import ShapesConfig, ShapesWorld
from omnimamba.model.config import shapes_config
from omnimamba.training.optim import adamw
from omnimamba.training.vq import reconstruction_loss
from omnimamba.vision.vq import VQModel


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def batch_build_ms(world: ShapesWorld, n: int, batch: int, steps: int) -> float:
    rng = np.random.default_rng(0)
    t = time.perf_counter()
    for _ in range(steps):
        images_to_tensor([world.sample("train", int(i)).image for i in rng.integers(n, size=batch)])
    return (time.perf_counter() - t) / steps * 1e3


def model_step_ms(device: str, batch: int, steps: int, autocast: bool, channels_last: bool) -> float:
    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    vq = VQModel(shapes_config("small").vq).to(device, memory_format=layout).train()
    opt = adamw(vq.parameters(), lr=1e-3)
    x = (torch.rand(batch, 3, 64, 64, device=device) * 2 - 1).contiguous(memory_format=layout)
    ctx = torch.autocast(device, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()

    def step():
        with ctx:
            rec, _, q = vq(x)
            loss = reconstruction_loss(rec.float(), x, 10.0) + q["codebook"] + q["commitment"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vq.parameters(), 1.0)
        opt.step()

    for _ in range(3):
        step()
    sync()
    t = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return (time.perf_counter() - t) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--batch", type=int, default=64)
    a = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    world = ShapesWorld(ShapesConfig(image_size=64), seed=0, cache=True)
    rows = {"batch, uncached samples": batch_build_ms(world, 50_000, a.batch, a.steps)}
    world = ShapesWorld(ShapesConfig(image_size=64), seed=0, cache=True)
    world.samples("train", 512)
    rows["batch, cached samples"] = batch_build_ms(world, 512, a.batch, a.steps)
    for name, kw in {"model step, float32": dict(autocast=False, channels_last=False),
                     "model step, bf16 autocast": dict(autocast=True, channels_last=False),
                     "model step, float32, channels-last": dict(autocast=False, channels_last=True),
                     "model step, bf16 autocast, channels-last": dict(autocast=True, channels_last=True)}.items():
        rows[name] = model_step_ms(device, a.batch, a.steps, **kw)
    base = rows["model step, float32"]
    print(f"Shapes tokenizer training step, batch {a.batch}, {device}")
    print(f"{'':44s} {'ms':>8s} {'vs float32 step':>16s}")
    for name, ms in rows.items():
        print(f"{name:44s} {ms:8.2f} {ms / base:15.2f}x")
    info = gc.device_info() if device == "cuda" else {"device": "cpu", "torch": torch.__version__}
    gc.write_json("vq_step", {"device": info, "batch": a.batch, "steps": a.steps, "ms": rows})


if __name__ == "__main__":
    main()
