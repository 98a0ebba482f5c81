"""The official OmniMamba release (github.com/hustvl/OmniMamba, weights hustvl/OmniMamba): its checkpoint read
into our model key for key, and written back.

The release saves `OmniMamba.state_dict()` (models/omnimamba.py) to one file, OmniMamba-1.3b.pth:

    vision_backbone.{dino,siglip}_featurizer.*   timm ViTs (models/cobra/backbones/vision/dinosiglip_vit.py)
    projector.projector.{0,2,4}.*                Prismatic's fused GELU MLP (models/cobra/nn_utils.py)
    llm_backbone.vqvae.*                         LlamaGen VQ-16 (llamagen_tokenizer/tokenizer_image/vq_model.py)
    llm_backbone.mamba.backbone.*                MixerModel (models/stage2/mixer_seq_simple.py): embedding,
        layers.{i}.{norm,mixer}.* (mamba_ssm Mamba2; in_proj.{mmu,t2i}_lora_{A,B}0 from models/stage2/lora.py),
        norm_f, img_embeddings (GPT2Embeddings with project_in), pos_embed, mmu_pos_embed, caption_embed.cap_proj
    llm_backbone.mamba.{lm_head,img_head}.weight MambaLMHeadModel's heads, tied to embedding / img_embeddings

Our names differ only in prefix and in the LoRA routes' (see `official_name`); nothing is reshaped. Its
tokenizer is GPT-NeoX-20B's (EleutherAI/gpt-neox-20b), which the user supplies as tokenizer.json.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import UserError

if TYPE_CHECKING:
    from .config import OmniMambaConfig
    from .core import OmniMamba

CHECKPOINT_NAMES = ("OmniMamba-1.3b.pth", "OmniMamba-1.3b.safetensors", "model.safetensors", "pytorch_model.bin")
VQ_NAME = "vq_ds16_t2i.pt"  # LlamaGen's T2I tokenizer, peizesun/llamagen_t2i: the release loads it separately
LLM = "llm_backbone.mamba."
# Usage counters of LlamaGen's quantizer (a buffer, not a weight): read when present, not required (the
# release pops it from the VQ checkpoint it loads).
OPTIONAL = ("llm_backbone.vqvae.quantize.codebook_used",)

_RENAMES = (  # (our name, official name), regular expressions over whole names, first match wins
    (r"backbone\.layers\.(\d+)\.mixer\.in_proj\.lora_([AB])\.(mmu|t2i)\.weight",
     LLM + r"backbone.layers.\1.mixer.in_proj.\3_lora_\g<2>0.weight"),
    (r"backbone\.(.*)", LLM + r"backbone.\1"),
    (r"lm_head\.weight", LLM + "lm_head.weight"),
    (r"image_head\.weight", LLM + "img_head.weight"),
    (r"image_embedding\.(.*)", LLM + r"backbone.img_embeddings.\1"),
    (r"t2i_pos_embed", LLM + "backbone.pos_embed"),
    (r"mmu_pos_embed", LLM + "backbone.mmu_pos_embed"),
    (r"caption_embed\.(fc[12]\.weight)", LLM + r"backbone.caption_embed.cap_proj.\1"),
    (r"projector\.(.*)", r"projector.\1"),
    (r"vq\.(.*)", r"llm_backbone.vqvae.\1"),
)


def _featurizers(config: "OmniMambaConfig") -> tuple[str, ...]:
    """Cobra's names for the vision backbone's timm models: a DINOv2 + SigLIP pair, or one featurizer."""
    n = len(config.understanding.backbones)
    if config.understanding.kind != "timm" or n > 2:
        raise UserError("the official layout has a timm vision backbone of one or two ViTs (dinosiglip); this "
                        f"config's understanding encoder is {config.understanding.kind!r} with {n}")
    return ("dino_featurizer", "siglip_featurizer") if n == 2 else ("featurizer",)


def official_name(name: str, config: "OmniMambaConfig") -> str:
    """Our state-dict key -> the official checkpoint's."""
    m = re.fullmatch(r"understanding\.encoders\.(\d+)\.(.*)", name)
    if m:
        return f"vision_backbone.{_featurizers(config)[int(m.group(1))]}.{m.group(2)}"
    for ours, theirs in _RENAMES:
        if re.fullmatch(ours, name):
            return re.sub(ours, theirs, name)
    raise UserError(f"{name}: no official name (a part of our model the release does not have)")


def _check_config(config: "OmniMambaConfig") -> None:
    bad = []
    if config.conventions != "official":
        bad.append("conventions 'official'")
    if not (config.task_lora and config.decoupled_vocab and config.backbone.tie_embeddings):
        bad.append("task LoRA, decoupled vocabularies and tied heads")
    if config.lora_rank != 8 or config.lora_alpha != 32:
        bad.append("LoRA rank 8, alpha 32 (models/stage2/lora.py)")
    if bad:
        raise UserError(f"the official layout needs {'; '.join(bad)}; start from preset 'omnimamba-1.3b-official'")


def to_official(model: "OmniMamba") -> dict[str, torch.Tensor]:
    """Our model's weights under the official names (tied heads written under both names, as torch.save of the
    release's state_dict does)."""
    _check_config(model.config)
    return {official_name(k, model.config): v for k, v in model.state_dict().items()}


def find_checkpoint(path: str | Path) -> Path:
    """The official checkpoint file: `path` itself, or the one file of CHECKPOINT_NAMES in the folder."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise UserError(f"{path}: no such file or folder (the official checkpoint, e.g. OmniMamba-1.3b.pth)")
    found = [path / n for n in CHECKPOINT_NAMES if (path / n).is_file()]
    if not found:
        raise UserError(f"{path}: no official checkpoint in it (looked for {', '.join(CHECKPOINT_NAMES)}); "
                        "download OmniMamba-1.3b.pth from hustvl/OmniMamba into it")
    return found[0]


def is_official(path: str | Path) -> bool:
    path = Path(path)
    if path.is_dir():
        return not (path / "config.json").is_file() and any((path / n).is_file() for n in CHECKPOINT_NAMES)
    return path.suffix in (".pth", ".pt", ".bin")


def read_state(path: Path) -> dict[str, torch.Tensor]:
    from ..fileio import read_safetensors, torch_load_weights

    if path.suffix == ".safetensors":
        state = read_safetensors(path, "official checkpoint")
    else:
        state = torch_load_weights(path, "official checkpoint")
        for wrapper in ("model", "state_dict", "module"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state dict of tensors")
    if not any(k.startswith(LLM) for k in state):
        raise UserError(f"{path}: not an official OmniMamba checkpoint (no {LLM}* keys), nor beside an omnimamba "
                        "config.json")
    return state


def load_official(path: str | Path, config: "OmniMambaConfig | None" = None, vq_path: str | Path | None = None,
                  tokenizer_path: str | Path | None = None, backend: str = "auto") -> "OmniMamba":
    """Build our model from the official checkpoint at `path` (file or folder; see find_checkpoint).

    config: defaults to preset 'omnimamba-1.3b-official'. LlamaGen's VQ comes from the checkpoint, else from
    `vq_path` or vq_ds16_t2i.pt beside it; the vision backbone from the checkpoint, else from the timm files
    named in config.understanding.weights. tokenizer.json (GPT-NeoX-20B's) beside it or at `tokenizer_path`.
    Every official key must land in our model and every weight of ours must come from one: anything left over
    or missing is an error that names it.
    """
    from .config import preset
    from .core import OmniMamba

    ckpt = find_checkpoint(path)
    folder = ckpt.parent
    config = config or preset("omnimamba-1.3b-official")
    _check_config(config)
    state = read_state(ckpt)
    _check_tied(state, ckpt)

    # Every file the model needs is found (or refused) before the model is built, a minute for the 1.3B.
    has_vision = any(k.startswith("vision_backbone.") for k in state)
    if not has_vision and not any(config.understanding.weights):
        raise UserError(f"{ckpt} holds no vision_backbone.* weights; name the timm checkpoints of "
                        f"{list(config.understanding.backbones)} in config.understanding.weights")
    if has_vision:  # read from the checkpoint, not from the timm files
        config = config.replace(understanding=config.understanding.replace(weights=()))
    vq_file = None
    if not any(k.startswith("llm_backbone.vqvae.") for k in state):
        vq_file = Path(vq_path) if vq_path else folder / VQ_NAME
        if not vq_file.is_file():
            raise UserError(f"{ckpt} holds no llm_backbone.vqvae.* weights and {vq_file} does not exist; download "
                            f"{VQ_NAME} (peizesun/llamagen_t2i) beside it or pass its path")
    tokenizer = _official_tokenizer(tokenizer_path or folder / "tokenizer.json", config)

    model = OmniMamba(config, backend=backend)
    own = model.state_dict()
    expected = {official_name(k, config): k for k in own}
    if not has_vision:
        expected = {o: k for o, k in expected.items() if not o.startswith("vision_backbone.")}
    if vq_file is not None:
        expected = {o: k for o, k in expected.items() if not o.startswith("llm_backbone.vqvae.")}
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(o for o in expected if o not in state and o not in OPTIONAL and not _tied_source_present(o, state))
    if unexpected or missing:
        raise UserError(f"{ckpt} does not match the model's official layout (preset omnimamba-1.3b-official unless "
                        f"a config is given): {len(missing)} keys missing {missing[:6]}, {len(unexpected)} left "
                        f"over {unexpected[:6]}")
    with torch.no_grad():
        for o, k in expected.items():
            if o not in state:
                continue
            value = state[o]
            if value.shape != own[k].shape:
                raise UserError(f"{ckpt}: {o} has shape {tuple(value.shape)}, the model expects {tuple(own[k].shape)} "
                                "(is the config the release's?)")
            own[k].copy_(value)
    if vq_file is not None:
        from ..vision.vq import VQModel

        model.vq.load_state_dict(VQModel.from_llamagen(vq_file, config.vq).state_dict())
    model.tokenizer = tokenizer
    return model.eval()


_TIED = {LLM + "lm_head.weight": LLM + "backbone.embedding.weight",
         LLM + "img_head.weight": LLM + "backbone.img_embeddings.word_embeddings.weight"}


def _tied_source_present(name: str, state: dict) -> bool:
    """A tied head may be saved once, under its embedding's name (safetensors drops shared tensors)."""
    return name in _TIED and _TIED[name] in state


def _check_tied(state: dict, ckpt: Path) -> None:
    for head, emb in _TIED.items():
        if head in state and emb in state and not torch.equal(state[head], state[emb]):
            raise UserError(f"{ckpt}: {head} differs from {emb}; the release ties them (tie_embeddings), and so "
                            "does our model")


def _official_tokenizer(path: Path, config: "OmniMambaConfig"):
    from ..tokenizer import TextTokenizer

    path = Path(path)
    if not path.is_file():
        return None  # answer/generate then say where to put it
    tok = TextTokenizer.official(path)
    if tok.base_vocab_size != config.text_base_vocab_size or tok.special != config.special:
        raise UserError(f"{path}: {tok.base_vocab_size} base tokens, end-of-text at {tok.special.end}; the checkpoint "
                        f"needs {config.text_base_vocab_size} and {config.text_eos_id} (GPT-NeoX-20B's tokenizer.json)")
    return tok


def save_official(model: "OmniMamba", path: str | Path) -> Path:
    """Write our model as the release's checkpoint file (torch.save of the state dict, official names)."""
    from ..fileio import writing

    path = Path(path)
    with writing(path, "official checkpoint"):
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        torch.save({k: v.detach().contiguous() for k, v in to_official(model).items()}, tmp)
        tmp.replace(path)
    return path
