"""The generation tokenizer: LlamaGen's VQ model (VQGAN-style encoder/decoder, l2-normalised codebook).

Module names follow LlamaGen's `tokenizer/tokenizer_image/vq_model.py`, so its published checkpoint
`vq_ds16_c2i.pt` (state dict under "model") loads key for key into `VQModel(VQConfig.vq16())`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError


@dataclass(frozen=True)
class VQConfig:
    codebook_size: int = 16384
    codebook_embed_dim: int = 8
    codebook_l2_norm: bool = True
    commit_loss_beta: float = 0.25
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    num_res_blocks: int = 2
    z_channels: int = 256
    dropout: float = 0.0
    image_size: int = 256
    norm_groups: int = 32
    # LlamaGen's: GroupNorm and self-attention, through which every latent depends on the whole image. "channel"
    # normalises each position over its channels alone and attention=False drops the attention blocks, so a
    # code depends on its neighbourhood only (see VQConfig.shapes_local).
    norm: str = "group"
    attention: bool = True
    # "conv": LlamaGen's encoder; "patch": each code a function of its own downsample x downsample pixel patch
    # (one strided convolution, then per-position layers), so equal patches always get equal codes
    encoder: str = "conv"

    def __post_init__(self) -> None:
        object.__setattr__(self, "ch_mult", tuple(self.ch_mult))
        if self.norm not in ("group", "channel"):
            raise ValueError(f"VQConfig.norm must be 'group' or 'channel', got {self.norm!r}")
        if self.encoder not in ("conv", "patch"):
            raise ValueError(f"VQConfig.encoder must be 'conv' or 'patch', got {self.encoder!r}")
        for name in ("codebook_size", "codebook_embed_dim", "ch", "num_res_blocks", "z_channels", "image_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"VQConfig.{name} must be positive, got {getattr(self, name)}")
        if self.image_size % self.downsample:
            raise ValueError(f"VQConfig.image_size={self.image_size} is not a multiple of the downsampling "
                             f"factor {self.downsample}")
        for m in self.ch_mult:
            if self.norm == "group" and (self.ch * m) % self.norm_groups:
                raise ValueError(f"VQConfig: channels ch*mult={self.ch * m} not divisible by norm_groups="
                                 f"{self.norm_groups}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample

    @property
    def num_tokens(self) -> int:
        """Image tokens per image: (image_size / downsample)^2."""
        return self.grid_size ** 2

    @classmethod
    def vq16(cls) -> "VQConfig":
        """LlamaGen VQ-16 at 256 px: 16 x 16 = 256 codes from a codebook of 16,384 x 8."""
        return cls()

    @classmethod
    def shapes(cls, ch: int = 8, codebook_size: int = 256, image_size: int = 64) -> "VQConfig":
        """LlamaGen's architecture at the embedded Shapes world's size: 64 px images, 4x downsampling -> 16 x 16
        = 256 codes per image (the paper's count), each code a 4 x 4 pixel patch."""
        return cls(codebook_size=codebook_size, ch=ch, ch_mult=(1, 2, 4), num_res_blocks=1, z_channels=64,
                   image_size=image_size, norm_groups=8)

    @classmethod
    def shapes_local(cls, ch: int = 8, codebook_size: int = 256, image_size: int = 64) -> "VQConfig":
        """The Shapes generation tokenizer: `shapes` with a patch encoder, ChannelNorm and no attention, so a code
        is its 4 x 4 patch's alone. LlamaGen's encoder gives the flat background of one image over 200 different
        codes (its GroupNorm and attention see the whole image): image codes that carry the whole image's context
        in every position are what an autoregressive model cannot predict one at a time (README, "Tokenizer")."""
        return cls.shapes(ch, codebook_size, image_size).replace(encoder="patch", norm="channel", attention=False)

    def replace(self, **changes) -> "VQConfig":
        return dataclasses.replace(self, **changes)


def to_uint8(pixels: Tensor):
    """Decoder output (b, 3, H, W) in [-1, 1] -> (b, H, W, 3) uint8 numpy images."""
    return ((pixels.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()


class ChannelNorm(nn.Module):
    """Layer norm over the channels at each position (b, c, h, w): GroupNorm's parameters, none of its
    dependence on the rest of the image."""

    def __init__(self, channels: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x.transpose(1, -1), x.shape[1:2], self.weight, self.bias, self.eps).transpose(1, -1)


def _norm(channels: int, groups: int) -> nn.Module:
    """groups 0: ChannelNorm (VQConfig.norm 'channel')."""
    return nn.GroupNorm(groups, channels, eps=1e-6, affine=True) if groups else ChannelNorm(channels)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = _norm(cin, groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2 = _norm(cout, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, with 1x1-conv projections."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        n = self.norm(x)
        q, k, v = (t.reshape(b, 1, c, h * w).transpose(-1, -2) for t in (self.q(n), self.k(n), self.v(n)))
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, h, w)
        return x + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # asymmetric padding, as in taming-transformers


class Upsample(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _run_level(block: nn.Module, h: Tensor) -> Tensor:
    """One resolution level: its residual blocks, each followed by its attention block where it has one."""
    for i, res in enumerate(block.res):
        h = res(h)
        if len(block.attn):
            h = block.attn[i](h)
    return h


def _groups(cfg: VQConfig) -> int:
    """GroupNorm's group count, 0 for ChannelNorm."""
    return cfg.norm_groups if cfg.norm == "group" else 0


def _mid_blocks(channels: int, groups: int, cfg: VQConfig) -> nn.ModuleList:
    """The lowest resolution's middle: residual, attention, residual (residual, residual without attention)."""
    attn = [AttnBlock(channels, groups)] if cfg.attention else []
    return nn.ModuleList([ResnetBlock(channels, channels, groups, cfg.dropout), *attn,
                          ResnetBlock(channels, channels, groups, cfg.dropout)])


class Encoder(nn.Module):
    def __init__(self, cfg: VQConfig, in_channels: int = 3):
        super().__init__()
        g, nres = _groups(cfg), len(cfg.ch_mult)
        self.conv_in = nn.Conv2d(in_channels, cfg.ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        cin = cfg.ch
        for level, mult in enumerate(cfg.ch_mult):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks):
                block.res.append(ResnetBlock(cin, cfg.ch * mult, g, cfg.dropout))
                cin = cfg.ch * mult
                if level == nres - 1 and cfg.attention:
                    block.attn.append(AttnBlock(cin, g))
            if level != nres - 1:
                block.downsample = Downsample(cin)
            self.conv_blocks.append(block)
        self.mid = _mid_blocks(cin, g, cfg)
        self.norm_out = _norm(cin, g)
        self.conv_out = nn.Conv2d(cin, cfg.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.conv_blocks:
            h = _run_level(block, h)
            if hasattr(block, "downsample"):
                h = block.downsample(h)
        for m in self.mid:
            h = m(h)
        return self.conv_out(F.silu(self.norm_out(h)))


def build_encoder(cfg: VQConfig) -> nn.Module:
    return PatchEncoder(cfg) if cfg.encoder == "patch" else Encoder(cfg)


class PatchEncoder(nn.Module):
    """VQConfig.encoder 'patch': a strided convolution over each patch, then residual blocks of 1 x 1
    convolutions with ChannelNorm: a patch's latent sees no other pixel."""

    def __init__(self, cfg: VQConfig, in_channels: int = 3):
        super().__init__()
        width, s = cfg.ch * cfg.ch_mult[-1], cfg.downsample
        self.conv_in = nn.Conv2d(in_channels, width, s, stride=s)
        self.res = nn.ModuleList([PointwiseBlock(width) for _ in range(cfg.num_res_blocks + 1)])
        self.norm_out = ChannelNorm(width)
        self.conv_out = nn.Conv2d(width, cfg.z_channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for block in self.res:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class PointwiseBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm1, self.conv1 = ChannelNorm(channels), nn.Conv2d(channels, channels, 1)
        self.norm2, self.conv2 = ChannelNorm(channels), nn.Conv2d(channels, channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.silu(self.norm2(self.conv1(F.silu(self.norm1(x))))))


class Decoder(nn.Module):
    def __init__(self, cfg: VQConfig, out_channels: int = 3):
        super().__init__()
        g, nres = _groups(cfg), len(cfg.ch_mult)
        cin = cfg.ch * cfg.ch_mult[-1]
        self.conv_in = nn.Conv2d(cfg.z_channels, cin, 3, padding=1)
        self.mid = _mid_blocks(cin, g, cfg)
        self.conv_blocks = nn.ModuleList()
        for level in reversed(range(nres)):
            block = nn.Module()
            block.res, block.attn = nn.ModuleList(), nn.ModuleList()
            for _ in range(cfg.num_res_blocks + 1):
                block.res.append(ResnetBlock(cin, cfg.ch * cfg.ch_mult[level], g, cfg.dropout))
                cin = cfg.ch * cfg.ch_mult[level]
                if level == nres - 1 and cfg.attention:
                    block.attn.append(AttnBlock(cin, g))
            if level != 0:
                block.upsample = Upsample(cin)
            self.conv_blocks.append(block)
        self.norm_out = _norm(cin, g)
        self.conv_out = nn.Conv2d(cin, out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for m in self.mid:
            h = m(h)
        for block in self.conv_blocks:
            h = _run_level(block, h)
            if hasattr(block, "upsample"):
                h = block.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class VectorQuantizer(nn.Module):
    def __init__(self, cfg: VQConfig):
        super().__init__()
        self.l2_norm = cfg.codebook_l2_norm
        self.beta = cfg.commit_loss_beta
        self.embedding = nn.Embedding(cfg.codebook_size, cfg.codebook_embed_dim)
        with torch.no_grad():
            self.embedding.weight.uniform_(-1.0 / cfg.codebook_size, 1.0 / cfg.codebook_size)
            if self.l2_norm:
                self.embedding.weight.copy_(F.normalize(self.embedding.weight, dim=-1))
        # LlamaGen keeps a ring buffer of recently used codes in its checkpoints; kept for key parity.
        self.register_buffer("codebook_used", torch.zeros(65536))

    def codebook(self) -> Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=-1) if self.l2_norm else w

    def forward(self, z: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """z (b, c, h, w) -> (quantised z with straight-through gradient, codes (b, h, w), losses)."""
        z = z.permute(0, 2, 3, 1)
        if self.l2_norm:
            z = F.normalize(z, dim=-1)
        e = self.codebook()
        flat = z.reshape(-1, z.size(-1))
        dist = flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * flat @ e.t()
        codes = dist.argmin(dim=1)
        zq = e[codes].view(z.shape)
        losses = {
            "codebook": F.mse_loss(zq, z.detach()),
            "commitment": self.beta * F.mse_loss(z, zq.detach()),
        }
        zq = z + (zq - z).detach()
        return zq.permute(0, 3, 1, 2), codes.view(z.shape[:-1]), losses

    def lookup(self, codes: Tensor) -> Tensor:
        """codes (b, h, w) -> (b, c, h, w)."""
        return self.codebook()[codes].permute(0, 3, 1, 2)


class VQModel(nn.Module):
    """encode(images) -> codes (b, n), decode(codes) -> images; images are (b, 3, H, W) in [-1, 1]."""

    def __init__(self, config: VQConfig = VQConfig()):
        super().__init__()
        self.config = config
        self.encoder = build_encoder(config)
        self.decoder = Decoder(config)
        self.quantize = VectorQuantizer(config)
        self.quant_conv = nn.Conv2d(config.z_channels, config.codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(config.codebook_embed_dim, config.z_channels, 1)

    def check_images(self, images: Tensor) -> None:
        s = self.config.image_size
        if images.dim() != 4 or images.size(1) != 3 or images.shape[-2:] != (s, s):
            raise UserError(f"the VQ tokenizer takes images of shape (batch, 3, {s}, {s}), got "
                            f"{tuple(images.shape)}; resize or crop to {s}x{s} RGB first")

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """Reconstruction (b, 3, H, W), codes (b, h, w), quantiser losses (and the latents under "z",
        (b*h*w, c), as the quantiser compares them): the training pass."""
        self.check_images(images)
        z = self.quant_conv(self.encoder(images))
        zq, codes, losses = self.quantize(z)
        flat = z.permute(0, 2, 3, 1).reshape(-1, z.size(1))
        losses["z"] = F.normalize(flat, dim=-1) if self.quantize.l2_norm else flat
        return self.decoder(self.post_quant_conv(zq)), codes, losses

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """(b, 3, H, W) in [-1, 1] -> codes (b, grid*grid), row-major (raster order)."""
        self.check_images(images)
        _, codes, _ = self.quantize(self.quant_conv(self.encoder(images)))
        return codes.flatten(1)

    def decode(self, codes: Tensor) -> Tensor:
        """codes (b, grid*grid) -> images (b, 3, H, W), roughly in [-1, 1]."""
        g = self.config.grid_size
        if codes.dim() != 2 or codes.size(1) != g * g:
            raise UserError(f"decode takes codes of shape (batch, {g * g}), got {tuple(codes.shape)}")
        if int(codes.min()) < 0 or int(codes.max()) >= self.config.codebook_size:
            raise UserError(f"image codes must lie in 0..{self.config.codebook_size - 1}")
        z = self.quantize.lookup(codes.view(-1, g, g))
        return self.decoder(self.post_quant_conv(z))

    @classmethod
    def from_llamagen(cls, path: str | Path, config: VQConfig | None = None) -> "VQModel":
        """Load LlamaGen's checkpoint (e.g. vq_ds16_c2i.pt): a dict with the state dict under "model"
        (or "ema", or the state dict itself). Missing or unexpected keys are errors."""
        from ..fileio import torch_load_weights

        raw = torch_load_weights(path, "VQ checkpoint")
        state = raw.get("model", raw.get("ema", raw)) if isinstance(raw, dict) else raw
        if not isinstance(state, dict):
            raise UserError(f"{path}: not a VQ state dict")
        model = cls(config or VQConfig.vq16())
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:  # lists missing, unexpected and mis-shaped keys
            raise UserError(f"{path} does not match the VQ model {model.config}:\n{e}") from e
        return model
