"""Reading and writing Mamba-2 checkpoints.

Two upstream formats are read from a local directory:
  * state-spaces (mamba_ssm): config.json with `d_model`, `n_layer`, `ssm_cfg`; pytorch_model.bin or
    model.safetensors with our own key names (`backbone.layers.N.mixer.*`);
  * transformers `Mamba2ForCausalLM`: config.json with `model_type: mamba2`; model.safetensors (possibly
    sharded) or pytorch_model.bin, keys as below.
We write the state-spaces format, weights in safetensors.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import Tensor

from ..errors import UserError
from ..fileio import read_json, read_safetensors, torch_load_weights
from .config import Mamba2Config

# transformers name -> our (state-spaces) name, for every key that differs; the rest are identical.
HF_KEY_MAP = {
    "backbone.embeddings.weight": "backbone.embedding.weight",
}

# state-spaces `ssm_cfg` / top-level field -> Mamba2Config field
SS_CONFIG_MAP = {
    "d_model": "d_model",
    "n_layer": "n_layer",
    "vocab_size": "vocab_size",
    "pad_vocab_size_multiple": "pad_vocab_size_multiple",
    "residual_in_fp32": "residual_in_fp32",
    "tie_embeddings": "tie_embeddings",
    "norm_epsilon": "norm_eps",
}
SS_SSM_CFG_MAP = {
    "d_state": "d_state",
    "d_conv": "d_conv",
    "expand": "expand",
    "headdim": "headdim",
    "ngroups": "ngroups",
    "chunk_size": "chunk_size",
    "conv_bias": "conv_bias",
    "bias": "bias",
    "dt_min": "dt_min",
    "dt_max": "dt_max",
    "dt_init_floor": "dt_init_floor",
    "dt_limit": "dt_limit",
    "A_init_range": "A_init_range",
}
# transformers Mamba2Config field -> Mamba2Config field
HF_CONFIG_MAP = {
    "hidden_size": "d_model",
    "num_hidden_layers": "n_layer",
    "vocab_size": "vocab_size",
    "state_size": "d_state",
    "conv_kernel": "d_conv",
    "expand": "expand",
    "head_dim": "headdim",
    "n_groups": "ngroups",
    "chunk_size": "chunk_size",
    "use_conv_bias": "conv_bias",
    "use_bias": "bias",
    "layer_norm_epsilon": "norm_eps",
    "residual_in_fp32": "residual_in_fp32",
    "tie_word_embeddings": "tie_embeddings",
    "time_step_min": "dt_min",
    "time_step_max": "dt_max",
    "time_step_floor": "dt_init_floor",
    "time_step_limit": "dt_limit",
}


class CheckpointError(UserError):
    """A checkpoint that cannot be read into the model it claims to be; the message names what is wrong."""


# --- configs ---------------------------------------------------------------------------------------------
def _state_spaces_config(raw: dict, where: Path) -> Mamba2Config:
    ssm_cfg = dict(raw.get("ssm_cfg") or {})
    layer = ssm_cfg.pop("layer", "Mamba2")
    if layer != "Mamba2":
        raise CheckpointError(f"{where}: ssm_cfg.layer is {layer!r}; only Mamba-2 checkpoints are supported")
    if raw.get("d_intermediate", 0) or raw.get("attn_layer_idx"):
        raise CheckpointError(f"{where}: hybrid checkpoints (d_intermediate / attn_layer_idx) are not supported")
    if not raw.get("rms_norm", True):
        raise CheckpointError(f"{where}: rms_norm=false (LayerNorm) checkpoints are not supported")
    fields = {ours: raw[theirs] for theirs, ours in SS_CONFIG_MAP.items() if theirs in raw}
    fields.update({ours: ssm_cfg[theirs] for theirs, ours in SS_SSM_CFG_MAP.items() if theirs in ssm_cfg})
    if ssm_cfg.get("norm_before_gate", False) or not ssm_cfg.get("rmsnorm", True):
        raise CheckpointError(f"{where}: only rmsnorm=True, norm_before_gate=False mixers are supported")
    if "dt_limit" in fields:
        fields["dt_limit"] = _dt_limit(fields["dt_limit"])
    fields.setdefault("tie_embeddings", True)  # mamba_ssm's MambaConfig default
    return Mamba2Config(**fields)


def _json_float(v) -> float:
    # JSON has no infinity: we write null; transformers >= 5 writes {"__float__": "Infinity"}.
    if v is None:
        return math.inf
    if isinstance(v, dict) and "__float__" in v:
        return float(v["__float__"])
    return float(v)


def _dt_limit(values) -> tuple[float, float]:
    return tuple(_json_float(v) for v in values)


def _hf_config(raw: dict, where: Path) -> Mamba2Config:
    fields = {ours: raw[theirs] for theirs, ours in HF_CONFIG_MAP.items() if theirs in raw}
    if "dt_limit" in fields:
        fields["dt_limit"] = _dt_limit(fields["dt_limit"])
    # transformers keeps the true vocabulary size: embedding rows = vocab_size, no padding.
    fields["pad_vocab_size_multiple"] = 1
    fields.setdefault("tie_embeddings", False)
    cfg = Mamba2Config(**fields)
    if "num_heads" in raw and raw["num_heads"] != cfg.nheads:
        raise CheckpointError(
            f"{where}: num_heads={raw['num_heads']} but hidden_size*expand/head_dim = {cfg.nheads}"
        )
    return cfg


def read_config(path: Path) -> tuple[Mamba2Config, str]:
    """Returns (config, format) with format 'state-spaces' or 'hf'."""
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{cfg_path} not found: a Mamba-2 checkpoint directory needs a config.json")
    raw = read_json(cfg_path, "Mamba-2 config")
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_path}: expected a JSON object")
    try:
        if raw.get("model_type") == "mamba2" or "hidden_size" in raw:
            return _hf_config(raw, cfg_path), "hf"
        if "d_model" in raw:
            return _state_spaces_config(raw, cfg_path), "state-spaces"
    except (TypeError, ValueError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"{cfg_path}: {e}") from e
    raise CheckpointError(
        f"{cfg_path}: neither a state-spaces config (d_model, n_layer) nor a transformers Mamba2 config "
        "(model_type 'mamba2')"
    )


# --- weights ---------------------------------------------------------------------------------------------
def read_weights(path: Path) -> dict[str, Tensor]:
    """All tensors of a checkpoint directory: model.safetensors, its sharded index, or pytorch_model.bin."""
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    binary = path / "pytorch_model.bin"
    if single.is_file():
        return read_safetensors(single, "Mamba-2 weights")
    if index.is_file():
        try:
            shards = sorted(set(read_json(index, "shard index")["weight_map"].values()))
        except (KeyError, TypeError, AttributeError):
            raise CheckpointError(f"{index}: no weight_map (a safetensors shard index)") from None
        state: dict[str, Tensor] = {}
        for shard in shards:
            if not (path / shard).is_file():
                raise CheckpointError(f"{index} names shard {shard}, which is missing from {path}")
            state.update(read_safetensors(path / shard, "Mamba-2 weight shard"))
        return state
    if binary.is_file():
        state = torch_load_weights(binary, "Mamba-2 weights")
        if not isinstance(state, dict):
            raise CheckpointError(f"{binary}: not a state dict")
        return state
    raise CheckpointError(f"{path}: no weights found (model.safetensors, its index, or pytorch_model.bin)")


def to_our_keys(state: dict[str, Tensor], fmt: str) -> dict[str, Tensor]:
    if fmt == "hf":
        return {HF_KEY_MAP.get(k, k): v for k, v in state.items()}
    return dict(state)


def load_into(model: torch.nn.Module, state: dict[str, Tensor], where: str, tied: bool) -> None:
    """Copy `state` into `model`, failing on any missing, unexpected or mis-shaped key (all listed at once)."""
    expected = model.state_dict()
    if tied:
        # The head shares the embedding; a checkpoint may or may not store it.
        expected.pop("lm_head.weight", None)
        state = {k: v for k, v in state.items() if k != "lm_head.weight"}
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    misshaped = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in sorted(set(state) & set(expected))
        if state[k].shape != expected[k].shape
    ]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_preview(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_preview(unexpected)}")
    if misshaped:
        problems.append(f"shape mismatches ({len(misshaped)}): {_preview(misshaped)}")
    if problems:
        raise CheckpointError(f"{where} does not match the model built from its config:\n  " + "\n  ".join(problems))
    model.load_state_dict(state, strict=not tied)


def _preview(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... (+{len(items) - n} more)" if len(items) > n else "")


def load_mamba2(path, backend: str = "auto", dtype: torch.dtype | None = None):
    from .model import Mamba2LM

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory; give the folder holding config.json and the weights")
    config, fmt = read_config(path)
    state = to_our_keys(read_weights(path), fmt)
    model = Mamba2LM(config, backend=backend)
    load_into(model, state, where=str(path), tied=config.tie_embeddings)
    return model.to(dtype) if dtype is not None else model


def config_to_state_spaces(config: Mamba2Config) -> dict:
    ssm_cfg = {"layer": "Mamba2"}
    ssm_cfg.update({theirs: getattr(config, ours) for theirs, ours in SS_SSM_CFG_MAP.items()})
    ssm_cfg["dt_limit"] = [v if math.isfinite(v) else None for v in config.dt_limit]
    raw = {theirs: getattr(config, ours) for theirs, ours in SS_CONFIG_MAP.items()}
    raw.update({"d_intermediate": 0, "rms_norm": True, "fused_add_norm": True, "ssm_cfg": ssm_cfg})
    return raw


def save_mamba2(model, path) -> None:
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)  # safetensors stores no aliases; the tie is in the config
    (path / "config.json").write_text(json.dumps(config_to_state_spaces(model.config), indent=2) + "\n")
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
