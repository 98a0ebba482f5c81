"""OmniMamba's configuration and the named presets (the paper's 1.3B model, its ablation model, the
embedded default)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ..errors import UserError
from ..mamba2 import Mamba2Config
from ..mamba2 import preset as mamba2_preset
from ..sequence import OFFICIAL_SPECIAL_TOKENS, SPECIAL_TOKENS, SpecialIds, check_conventions
from ..vision.understanding import UnderstandingConfig
from ..vision.vq import VQConfig


@dataclass(frozen=True)
class OmniMambaConfig:
    backbone: Mamba2Config = field(default_factory=lambda: mamba2_preset("mamba2-1.3b", vocab_size=50283))
    understanding: UnderstandingConfig = field(default_factory=UnderstandingConfig)
    vq: VQConfig = field(default_factory=VQConfig.vq16)
    # Base text vocabulary (tokenizer without OmniMamba's six special tokens, which follow it).
    text_base_vocab_size: int = 50277
    max_caption_tokens: int = 68   # 68 + 5 specials = the official release's 73 caption positions
    caption_dropout: float = 0.1   # rate at which training replaces a caption by the null caption (CFG)
    task_lora: bool = True
    lora_rank: int = 8
    lora_alpha: float = 32.0
    lora_dropout: float = 0.05
    decoupled_vocab: bool = True
    # "official": the release's tokens ([PAD] + nine after the base vocabulary, answers end at end-of-text),
    # its prompt templates, captions padded with [PAD] tokens the model reads, no learned null caption (its
    # unconditional caption is the text "A picture"). See omnimamba.sequence.
    conventions: str = "omnimamba"
    text_eos_id: int = 0           # official conventions: the base tokenizer's end-of-text id (GPT-NeoX: 0)
    mmu_positions: int = 0         # learned positions added to the MMU sequence (official release: 1500)

    def __post_init__(self) -> None:
        check_conventions(self.conventions)
        if self.conventions == "official" and self.caption_dropout > 0:
            raise UserError("OmniMambaConfig: official conventions have no learned null caption to drop captions "
                            "to; set caption_dropout to 0")
        if self.mmu_positions < 0:
            raise UserError(f"OmniMambaConfig.mmu_positions must be >= 0, got {self.mmu_positions}")
        need = self.text_vocab_size + (0 if self.decoupled_vocab else self.vq.codebook_size)
        if not self.decoupled_vocab and self.backbone.vocab_size < need:
            # Unified-vocabulary ablation: the codebook is appended to the text vocabulary.
            object.__setattr__(self, "backbone", self.backbone.replace(vocab_size=need))
        if self.backbone.padded_vocab_size < need:
            raise UserError(f"OmniMambaConfig: the backbone's embedding has {self.backbone.padded_vocab_size} "
                            f"rows but the vocabulary needs {need}; raise backbone.vocab_size")
        if self.lora_rank < 1 and self.task_lora:
            raise UserError(f"OmniMambaConfig.lora_rank must be >= 1, got {self.lora_rank}")
        if not 0 <= self.caption_dropout < 1:
            raise UserError(f"OmniMambaConfig.caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if self.max_caption_tokens < 1:
            raise UserError(f"OmniMambaConfig.max_caption_tokens must be >= 1, got {self.max_caption_tokens}")

    @property
    def text_vocab_size(self) -> int:
        added = SPECIAL_TOKENS if self.conventions == "omnimamba" else OFFICIAL_SPECIAL_TOKENS
        return self.text_base_vocab_size + len(added)

    @property
    def special(self) -> SpecialIds:
        if self.conventions == "official":
            return SpecialIds.official_after(self.text_base_vocab_size, self.text_eos_id)
        return SpecialIds.after(self.text_base_vocab_size)

    @property
    def image_tokens(self) -> int:
        return self.vq.num_tokens

    @property
    def t2i_length(self) -> int:
        """Longest T2I sequence: [T2I][SOT]{caption}[EOT][SOI]{codes}[EOI]."""
        return 5 + self.max_caption_tokens + self.image_tokens

    @property
    def image_sampling(self) -> dict:
        """Default image sampling: ours (guidance 3, full distribution), or the official inference_t2i.py's
        (greedy, top_k 1, no guidance)."""
        if self.conventions == "official":
            return {"guidance_scale": 1.0, "temperature": 1.0, "top_k": 1, "top_p": 1.0, "epsilon": 0.0}
        return {"guidance_scale": 3.0, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "epsilon": 0.0}

    def replace(self, **changes) -> "OmniMambaConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict) -> "OmniMambaConfig":
        raw = dict(raw)
        try:
            parts = {
                "backbone": Mamba2Config(**raw.pop("backbone")),
                "understanding": UnderstandingConfig(**raw.pop("understanding")),
                "vq": VQConfig(**raw.pop("vq")),
            }
            return cls(**parts, **raw)
        except (KeyError, TypeError) as e:
            raise UserError(f"not an OmniMamba config: {e}") from e


def shapes_config(size: str = "tiny", text_base_vocab_size: int | None = None, image_size: int = 64) -> OmniMambaConfig:
    """The embedded Shapes world's models (no pretrained weights exist for it): 'tiny' trains on a CPU in
    minutes (`omnimamba quickstart`), 'small' is the one-GPU recipe (configs/shapes-gpu.yaml). Both read
    images through a trained LlamaGen-architecture tokenizer's encoder (frozen, 2 x 2 patches merged: 64
    positions at 64 px) and write them as codes of a patch-local tokenizer (VQConfig.shapes_local), one per 4 x 4
    pixel patch: 256 at 64 px (the paper's count). `image_size` (a multiple of 8) is the world's
    (data.shapes.image_size, which the trainer passes).

    The backbone's causal conv spans one row of image codes and one more (d_conv 17 at 64 px, where Mamba-2 has
    4), so each code sees the one above it directly rather than through the state: the quickstart model's T2I loss
    fell from 0.54 to 0.42 nats per code in 300 steps, and on one GPU `shapes-small` answered 95.6 / 97.2 % of the
    test questions against 92.6 % (docs/results/shapes-gpu/conv-row)."""
    if text_base_vocab_size is None:
        from ..tokenizer import TextTokenizer

        text_base_vocab_size = TextTokenizer.shapes().base_vocab_size
    sizes = {  # d_model, n_layer, d_state, headdim, chunk_size, VQ channels, codebook
        "tiny": (128, 4, 32, 32, 16, 8, 256),
        "small": (512, 8, 64, 64, 64, 16, 512),
    }
    if size not in sizes:
        raise UserError(f"unknown Shapes model size {size!r}; sizes are {sorted(sizes)}")
    d, n, state, headdim, chunk, ch, codes = sizes[size]
    if image_size < 32 or image_size % 8:
        raise UserError(f"Shapes models take images of at least 32 px, a multiple of 8 (4 x 4 pixels a code, 2 x 2 "
                        f"codes merged for understanding); got {image_size}")
    return OmniMambaConfig(
        backbone=Mamba2Config(d_model=d, n_layer=n, vocab_size=text_base_vocab_size + 6, pad_vocab_size_multiple=8,
                              d_state=state, headdim=headdim, chunk_size=chunk, tie_embeddings=True,
                              d_conv=image_size // 4 + 1),
        # decoupled encoders (section 3.2): generation codes from a tokenizer whose codes are local patches,
        # understanding features from a LlamaGen-architecture tokenizer's encoder, which sees the whole image
        understanding=UnderstandingConfig(kind="vq-encoder", image_size=image_size, spatial_merge=2,
                                          vq=VQConfig.shapes(ch=ch, codebook_size=codes, image_size=image_size)),
        vq=VQConfig.shapes_local(ch=ch, codebook_size=codes, image_size=image_size),
        text_base_vocab_size=text_base_vocab_size,
        max_caption_tokens=24,
        lora_dropout=0.0,
    )


PRESETS = {
    # The paper: Mamba-2-1.3B, DINOv2 + SigLIP at 384 px, LlamaGen VQ-16 at 256 px (256 image tokens).
    "omnimamba-1.3b": lambda: OmniMambaConfig(),
    # The official release's checkpoint (hustvl/OmniMamba, OmniMamba-1.3b.pth): the same model read with its
    # own conventions: GPT-NeoX + [PAD] + nine tokens (50,287, embedding padded to 50,288), MMU positions.
    "omnimamba-1.3b-official": lambda: OmniMambaConfig(
        backbone=mamba2_preset("mamba2-1.3b", vocab_size=50287),
        conventions="official", mmu_positions=1500, caption_dropout=0.0,
    ),
    # The paper's ablations (section 4.6): Mamba-2-370M, CLIP at 224 px.
    "omnimamba-370m-ablation": lambda: OmniMambaConfig(
        backbone=mamba2_preset("mamba2-370m", vocab_size=50283),
        understanding=UnderstandingConfig(backbones=("vit_large_patch14_clip_224.openai",), image_size=224),
    ),
    # The embedded Shapes world (see shapes_config).
    "shapes-tiny": lambda: shapes_config("tiny"),
    "shapes-small": lambda: shapes_config("small"),
}


def preset(name: str, **overrides) -> OmniMambaConfig:
    if name not in PRESETS:
        raise UserError(f"unknown OmniMamba preset {name!r}; known presets: {sorted(PRESETS)}")
    cfg = PRESETS[name]()
    return cfg.replace(**overrides) if overrides else cfg

