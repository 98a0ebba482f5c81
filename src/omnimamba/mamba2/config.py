"""Mamba-2 configuration and the named presets of the published state-spaces checkpoints."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Mamba2Config:
    """Hyper-parameters of a Mamba-2 language model (defaults: mamba_ssm's `Mamba2` and `MambaConfig`)."""

    d_model: int = 768
    n_layer: int = 24
    vocab_size: int = 50277
    pad_vocab_size_multiple: int = 16
    d_state: int = 128
    d_conv: int = 4
    expand: int = 2
    headdim: int = 64
    ngroups: int = 1
    chunk_size: int = 256
    conv_bias: bool = True
    bias: bool = False
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    tie_embeddings: bool = True
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_limit: tuple[float, float] = (0.0, math.inf)
    A_init_range: tuple[float, float] = (1.0, 16.0)

    def __post_init__(self) -> None:
        positive = ("d_model", "n_layer", "vocab_size", "pad_vocab_size_multiple", "d_state", "d_conv",
                    "expand", "headdim", "ngroups", "chunk_size")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"Mamba2Config.{name} must be a positive integer, got {value!r}")
        if self.d_inner % self.headdim:
            raise ValueError(
                f"Mamba2Config: d_inner = expand * d_model = {self.d_inner} is not a multiple of "
                f"headdim = {self.headdim}"
            )
        if self.nheads % self.ngroups:
            raise ValueError(
                f"Mamba2Config: nheads = {self.nheads} is not a multiple of ngroups = {self.ngroups}"
            )
        if not self.norm_eps > 0:
            raise ValueError(f"Mamba2Config.norm_eps must be > 0, got {self.norm_eps}")
        object.__setattr__(self, "dt_limit", tuple(float(v) for v in self.dt_limit))
        object.__setattr__(self, "A_init_range", tuple(float(v) for v in self.A_init_range))

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    @property
    def nheads(self) -> int:
        return self.d_inner // self.headdim

    @property
    def conv_dim(self) -> int:
        """Channels of the conv over xBC: x (d_inner) then B and C (ngroups * d_state each)."""
        return self.d_inner + 2 * self.ngroups * self.d_state

    @property
    def d_in_proj(self) -> int:
        """in_proj's output: z (d_inner), xBC (conv_dim), dt (nheads)."""
        return self.d_inner + self.conv_dim + self.nheads

    @property
    def padded_vocab_size(self) -> int:
        m = self.pad_vocab_size_multiple
        return math.ceil(self.vocab_size / m) * m

    def replace(self, **changes) -> "Mamba2Config":
        return dataclasses.replace(self, **changes)


# The state-spaces/mamba2-* checkpoints: GPT-NeoX tokenizer (50277 tokens, padded to 50288), d_state 128,
# headdim 64, tied embeddings, residual in fp32.
PRESETS: dict[str, Mamba2Config] = {
    "mamba2-130m": Mamba2Config(d_model=768, n_layer=24),
    "mamba2-370m": Mamba2Config(d_model=1024, n_layer=48),
    "mamba2-780m": Mamba2Config(d_model=1536, n_layer=48),
    "mamba2-1.3b": Mamba2Config(d_model=2048, n_layer=48),
    "mamba2-2.7b": Mamba2Config(d_model=2560, n_layer=64),
    # Small enough for tests and CPU demos; not a published checkpoint.
    "mamba2-tiny": Mamba2Config(d_model=64, n_layer=2, vocab_size=512, d_state=16, headdim=16, chunk_size=32),
}


def preset(name: str, **overrides) -> Mamba2Config:
    """A named preset, optionally with fields replaced."""
    if name not in PRESETS:
        raise ValueError(f"unknown Mamba-2 preset {name!r}; known presets: {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]
