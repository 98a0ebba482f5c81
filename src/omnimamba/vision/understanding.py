"""The understanding encoder (OmniMamba section 3.2): continuous patch features for MMU.

`TimmEncoder` runs one or more timm ViTs on the same image and concatenates their patch features along the
channel axis (Prismatic's "fused" DINOv2 + SigLIP); `FusedMLPProjector` maps them into the LM's width.
`TinyConvEncoder` is the from-scratch encoder of the embedded default, where no pretrained ViT exists.
All encoders take images (b, 3, H, W) in [0, 1] and return features (b, n_patches, feature_dim).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from ..errors import UserError
from .vq import VQConfig

# Prismatic's "dinosiglip-vit-so-384px" pair, as used by OmniMamba (27 x 27 = 729 patches each).
DINOSIGLIP_384 = ("vit_large_patch14_reg4_dinov2.lvd142m", "vit_so400m_patch14_siglip_384")
# The paper's ablation encoder: CLIP ViT-L/14 at 224 px.
CLIP_224 = ("vit_large_patch14_clip_224.openai",)


@dataclass(frozen=True)
class UnderstandingConfig:
    """kind 'timm': `backbones` are timm model names run on the same image, features concatenated;
    `weights` optionally names a local checkpoint per backbone. kind 'tiny': a small conv encoder trained
    from scratch. kind 'vq-encoder': the architecture of a VQ tokenizer's encoder, read continuously
    (before quantisation), initialised from a trained tokenizer: the embedded default's pretrained encoder.
    `vq` names that tokenizer's architecture when it is not the generation tokenizer's (the trainer then trains
    one of its own for understanding, as the paper decouples the two encoders); None: the generation
    tokenizer's encoder."""

    kind: str = "timm"
    backbones: tuple[str, ...] = DINOSIGLIP_384
    weights: tuple[str | None, ...] = ()
    image_size: int = 384
    tiny_width: int = 128
    tiny_patch: int = 8
    # Concatenate the features of each spatial_merge x spatial_merge block of patches before the projector
    # (Qwen2-VL's patch merger): a sequence spatial_merge^2 times shorter that keeps every feature.
    spatial_merge: int = 1
    vq: VQConfig | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "backbones", tuple(self.backbones))
        object.__setattr__(self, "weights", tuple(self.weights))
        if isinstance(self.vq, dict):  # read back from a saved config
            object.__setattr__(self, "vq", VQConfig(**self.vq))
        if self.vq is not None and self.kind != "vq-encoder":
            raise UserError(f"UnderstandingConfig.vq is for kind 'vq-encoder' only, got kind {self.kind!r}")
        if self.kind not in ("timm", "tiny", "vq-encoder"):
            raise UserError(f"UnderstandingConfig.kind must be 'timm', 'tiny' or 'vq-encoder', got {self.kind!r}")
        if self.kind == "timm" and not self.backbones:
            raise UserError("UnderstandingConfig.backbones is empty: name at least one timm ViT")
        if self.weights and len(self.weights) != len(self.backbones):
            raise UserError(f"UnderstandingConfig.weights has {len(self.weights)} entries for "
                            f"{len(self.backbones)} backbones; give one path (or null) per backbone")
        if self.image_size <= 0:
            raise UserError(f"UnderstandingConfig.image_size must be positive, got {self.image_size}")
        if self.spatial_merge < 1:
            raise UserError(f"UnderstandingConfig.spatial_merge must be >= 1, got {self.spatial_merge}")

    def replace(self, **changes) -> "UnderstandingConfig":
        return dataclasses.replace(self, **changes)


def check_images(images: Tensor, size: int, what: str) -> None:
    if images.dim() != 4 or images.size(1) != 3:
        raise UserError(f"{what} takes RGB images of shape (batch, 3, {size}, {size}), got {tuple(images.shape)}")
    if images.shape[-2:] != (size, size):
        raise UserError(f"{what} takes {size}x{size} images, got {images.shape[-2]}x{images.shape[-1]}; "
                        f"resize them first (omnimamba's image loaders do)")


def _load_local_weights(model: nn.Module, path: str, name: str) -> None:
    from ..fileio import read_safetensors, torch_load_weights

    p = Path(path)
    if not p.is_file():
        raise UserError(f"weights for encoder {name!r} not found: {p}")
    if p.suffix == ".safetensors":
        state = read_safetensors(p, f"weights of encoder {name!r}")
    else:
        state = torch_load_weights(p, f"weights of encoder {name!r}")
        state = state.get("state_dict", state.get("model", state)) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise UserError(f"{p}: not a state dict for encoder {name!r}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"{p} does not match timm model {name!r}:\n{e}") from e


class TimmEncoder(nn.Module):
    """Patch features of the second-to-last block of each ViT (as Prismatic), concatenated on channels."""

    def __init__(self, config: UnderstandingConfig):
        super().__init__()
        import timm

        self.config = config
        self.encoders = nn.ModuleList()
        for i, name in enumerate(config.backbones):
            if not timm.is_model(name):
                raise UserError(f"unknown encoder {name!r}: not a timm model name (see timm.list_models())")
            model = timm.create_model(name, pretrained=False, num_classes=0, img_size=config.image_size)
            if config.weights and config.weights[i]:
                _load_local_weights(model, config.weights[i], name)
            self.encoders.append(model)
        grids = {tuple(m.patch_embed.grid_size) for m in self.encoders}
        if len(grids) != 1:
            raise UserError(f"encoders {config.backbones} give different patch grids {sorted(grids)} at "
                            f"{config.image_size}px; fused features need the same grid")
        self.num_patches = math.prod(grids.pop())
        self.feature_dim = sum(m.embed_dim for m in self.encoders)
        for m in self.encoders:
            cfg = m.pretrained_cfg
            m.register_buffer("pixel_mean", torch.tensor(cfg.get("mean", (0.5,) * 3)).view(1, 3, 1, 1), persistent=False)
            m.register_buffer("pixel_std", torch.tensor(cfg.get("std", (0.5,) * 3)).view(1, 3, 1, 1), persistent=False)

    def forward(self, images: Tensor) -> Tensor:
        check_images(images, self.config.image_size, "the understanding encoder")
        feats = []
        for m in self.encoders:
            x = (images - m.pixel_mean) / m.pixel_std
            feats.append(m.get_intermediate_layers(x, n=[len(m.blocks) - 2])[0])
        return torch.cat(feats, dim=-1)


class TinyConvEncoder(nn.Module):
    """Three stride-2 conv stages (for patch 8) and a learned position per patch: (b, (H/8)^2, width)."""

    def __init__(self, config: UnderstandingConfig):
        super().__init__()
        self.config = config
        stages = max(1, int(math.log2(config.tiny_patch)))
        if 2 ** stages != config.tiny_patch or config.image_size % config.tiny_patch:
            raise UserError(f"tiny encoder: patch {config.tiny_patch} must be a power of 2 dividing "
                            f"image_size {config.image_size}")
        w = config.tiny_width
        layers, cin = [], 3
        for s in range(stages):
            cout = w if s == stages - 1 else max(w // 2 ** (stages - 1 - s), 16)
            layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1), nn.GELU()]
            cin = cout
        layers.append(nn.Conv2d(cin, w, 1))
        self.net = nn.Sequential(*layers)
        self.num_patches = (config.image_size // config.tiny_patch) ** 2
        self.feature_dim = w
        self.pos = nn.Parameter(torch.randn(1, self.num_patches, w) * 0.02)

    def forward(self, images: Tensor) -> Tensor:
        check_images(images, self.config.image_size, "the understanding encoder")
        return self.net(images * 2 - 1).flatten(2).transpose(1, 2) + self.pos


class VQEncoderFeatures(nn.Module):
    """Continuous features of a VQ-style encoder (no quantisation): (b, grid^2, z_channels).

    No pretrained semantic ViT exists for the embedded Shapes world and none can be downloaded; an
    encoder trained on reconstruction (the tokenizer's) is the self-supervised stand-in, kept frozen as
    the paper keeps DINOv2 and SigLIP. Its weights are copied from a trained tokenizer of its architecture
    (`OmniMamba.init_understanding_from_vq`)."""

    def __init__(self, config: UnderstandingConfig, vq_config):
        super().__init__()
        from .vq import build_encoder

        if vq_config.image_size != config.image_size:
            raise UserError(f"vq-encoder understanding: image_size {config.image_size} differs from the VQ's "
                            f"{vq_config.image_size}")
        self.config = config
        self.encoder = build_encoder(vq_config)
        self.num_patches = vq_config.num_tokens
        self.feature_dim = vq_config.z_channels

    def forward(self, images: Tensor) -> Tensor:
        check_images(images, self.config.image_size, "the understanding encoder")
        return self.encoder(images * 2 - 1).flatten(2).transpose(1, 2)


def merge_patches(features: Tensor, k: int) -> Tensor:
    """(b, g*g, c) patch features in raster order -> (b, (g/k)^2, c*k*k): each k x k block of neighbouring
    patches becomes one, its features concatenated (row by row within the block)."""
    if k == 1:
        return features
    b, n, c = features.shape
    g = math.isqrt(n)
    if g * g != n or g % k:
        raise UserError(f"spatial_merge {k} needs a square grid of patches whose side it divides; got {n} patches")
    x = features.reshape(b, g // k, k, g // k, k, c).permute(0, 1, 3, 2, 4, 5)
    return x.reshape(b, (g // k) ** 2, k * k * c)


def build_understanding_encoder(config: UnderstandingConfig, vq_config=None) -> nn.Module:
    if config.kind == "tiny":
        return TinyConvEncoder(config)
    if config.kind == "vq-encoder":
        return VQEncoderFeatures(config, config.vq or vq_config)
    return TimmEncoder(config)


class FusedMLPProjector(nn.Module):
    """Prismatic's "fused-gelu-mlp": Linear(f, 4f) -> GELU -> Linear(4f, d) -> GELU -> Linear(d, d)."""

    def __init__(self, feature_dim: int, d_model: int):
        super().__init__()
        hidden = 4 * feature_dim
        self.projector = nn.Sequential(
            nn.Linear(feature_dim, hidden), nn.GELU(), nn.Linear(hidden, d_model), nn.GELU(),
            nn.Linear(d_model, d_model),
        )

    def forward(self, features: Tensor) -> Tensor:
        return self.projector(features)
