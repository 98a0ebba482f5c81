"""Saving and loading OmniMamba: its own directories (config.json + model.safetensors + tokenizer.json), the
official release's checkpoint (see official.py), and a preset assembled from separately supplied upstream
weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import UserError
from ..fileio import manifested_folder, read_json, require_intact
from ..vision.vq import VQModel
from .config import OmniMambaConfig

if TYPE_CHECKING:
    from .core import OmniMamba


class CheckpointMixin:
    def save_pretrained(self, path: str | Path, tokenizer=None, state_dict: dict | None = None) -> None:
        """config.json + model.safetensors (+ tokenizer.json): everything `from_pretrained` needs.
        `state_dict` replaces the module's own (e.g. the gathered full state of an FSDP-sharded model)."""
        from safetensors.torch import save_file, save_model

        path = Path(path)
        with manifested_folder(path, "model folder"):
            (path / "config.json").write_text(json.dumps({"omnimamba": self.config.to_dict()}, indent=2) + "\n")
            if state_dict is None:
                save_model(self, str(path / "model.safetensors"), metadata={"format": "pt"})
            else:
                tied = {"lm_head.weight", "image_head.weight"} if self.config.backbone.tie_embeddings else set()
                save_file({k: v.contiguous() for k, v in state_dict.items() if k not in tied},
                          str(path / "model.safetensors"), metadata={"format": "pt"})
            tokenizer = tokenizer or self.tokenizer
            if tokenizer is not None:
                tokenizer.save(path / "tokenizer.json")

    @classmethod
    def from_pretrained(cls, path: str | Path, backend: str = "auto") -> "OmniMamba":
        from safetensors import SafetensorError
        from safetensors.torch import load_model

        from .official import is_official, load_official

        path = Path(path)
        if is_official(path):  # the release's checkpoint (file, or folder without our config.json)
            return load_official(path, backend=backend)
        cfg_path = path / "config.json"
        if not cfg_path.is_file():
            raise UserError(f"{path}: not an OmniMamba model directory (no config.json)")
        require_intact(path, "the model folder")
        raw = read_json(cfg_path, "model config")
        if not isinstance(raw, dict) or "omnimamba" not in raw:
            raise UserError(f"{cfg_path}: not an OmniMamba config (no 'omnimamba' key)")
        config = OmniMambaConfig.from_dict(raw["omnimamba"])
        # The encoders' weights are in model.safetensors: do not read their original files again.
        config = config.replace(understanding=config.understanding.replace(weights=()))
        model = cls(config, backend=backend)
        weights = path / "model.safetensors"
        if not weights.is_file():
            raise UserError(f"{path}: model.safetensors not found")
        try:
            missing, unexpected = load_model(model, str(weights), strict=False)
        except (SafetensorError, OSError) as e:  # a truncated, empty or foreign file
            raise UserError(f"{weights}: the model weights are damaged or not safetensors ({e})") from None
        if missing or unexpected:
            raise UserError(f"{weights} does not match its config: missing {missing[:8]}, "
                            f"unexpected {unexpected[:8]}")
        if (path / "tokenizer.json").is_file():
            from ..tokenizer import TextTokenizer

            model.tokenizer = TextTokenizer.from_file(path / "tokenizer.json")
        return model.eval()

    @classmethod
    def from_components(cls, config: OmniMambaConfig, mamba2_path: str | Path | None = None,
                        vq_path: str | Path | None = None, backend: str = "auto") -> "OmniMamba":
        """Build a preset from separately supplied local weights: a Mamba-2 checkpoint directory (state-spaces
        or transformers format), LlamaGen's VQ checkpoint; the understanding encoders' files are named in
        `config.understanding.weights`. New parts (LoRA, projector, image head...) start from scratch."""
        from ..mamba2 import Mamba2LM

        model = cls(config, backend=backend)
        if mamba2_path is not None:
            lm = Mamba2LM.from_pretrained(mamba2_path, backend="reference")
            if lm.config.d_model != config.backbone.d_model or lm.config.n_layer != config.backbone.n_layer:
                raise UserError(f"{mamba2_path}: d_model/n_layer {lm.config.d_model}/{lm.config.n_layer} do not "
                                f"match the preset's {config.backbone.d_model}/{config.backbone.n_layer}")
            rows = model.backbone.embedding.num_embeddings
            if lm.backbone.embedding.num_embeddings != rows:
                raise UserError(f"{mamba2_path}: embedding has {lm.backbone.embedding.num_embeddings} rows, "
                                f"the preset {rows}")
            own = model.backbone.state_dict()
            for k, v in lm.backbone.state_dict().items():
                own[k].copy_(v)
            if not config.backbone.tie_embeddings:
                model.lm_head.weight.data.copy_(lm.lm_head.weight)
        if vq_path is not None:
            model.vq.load_state_dict(VQModel.from_llamagen(vq_path, config.vq).state_dict())
            model.init_understanding_from_vq()
        return model
