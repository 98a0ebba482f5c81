"""Training checkpoints: model, optimizer, RNG and data position, in safetensors + JSON.

A checkpoint is written into a temporary folder, its manifest (each file's size and SHA-256) written last, and
the folder renamed into place only then, so a run killed mid-write never leaves a half-written checkpoint that
looks like a good one; a checkpoint damaged later fails its manifest, and resuming falls back to the newest
one that verifies.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import UserError
from ..fileio import read_json, read_safetensors, verify_manifest, write_manifest, writing
from . import faults

PREFIX = "ckpt-"


def _name(stage_index: int, step: int) -> str:
    return f"{PREFIX}{stage_index:02d}-{step:08d}"


def _names_in_order(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    """The parameter name of each optimizer index (the order of its param groups' params)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def _is_sharded(model: torch.nn.Module) -> bool:
    return any(hasattr(p, "full_tensor") for p in model.parameters())  # FSDP2's parameters are DTensors


def optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The optimizer's full state keyed by parameter name, as torch's distributed state-dict API gives it,
    whatever the process layout: one process, DDP, or FSDP2 (gathered; every rank must call this then)."""
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

        return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    sd, names = opt.state_dict(), _names_in_order(model, opt)
    return {"state": {names[i]: s for i, s in sd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}


def optimizer_tensors(osd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """A name-keyed optimizer state as safetensors tensors `state.<name>.<key>` plus JSON metadata."""
    tensors = {}
    for name, state in osd["state"].items():
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{name}.{key}"] = t.detach().cpu().contiguous()
    return tensors, {"param_groups": osd["param_groups"], "keyed_by": "name"}


def load_optimizer(model: torch.nn.Module, opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                   meta: dict) -> None:
    """Restore what `optimizer_tensors` wrote into `opt`, for any process layout (a checkpoint written by 2
    processes resumes on 1 and back). Checkpoints keyed by optimizer index (before names) read too."""
    names = _names_in_order(model, opt)
    by_index = meta.get("keyed_by") != "name"
    state: dict[str, dict] = {}
    for tensor_name, t in tensors.items():
        name, key = tensor_name[len("state."):].rsplit(".", 1)
        state.setdefault(names[int(name)] if by_index else name, {})[key] = t
    groups = meta["param_groups"]
    if by_index:
        groups = [{**g, "params": [names[i] for i in g["params"]]} for g in groups]
    if _is_sharded(model):
        # not strict: a parameter without a gradient so far (a caption never dropped yet) has no Adam state,
        # as in a plain optimizer's state dict
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, opt, {"state": state, "param_groups": groups},
                                 options=StateDictOptions(full_state_dict=True, strict=False))
        return
    device = next(p.device for g in opt.param_groups for p in g["params"])
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(state) - set(index))
    if unknown:
        raise UserError(f"checkpoint optimizer state names parameters this stage does not train: {unknown[:5]}")
    opt.load_state_dict({
        "state": {index[n]: {k: (v if k == "step" else v.to(device)) for k, v in s.items()} for n, s in state.items()},
        "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in groups]})


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"rng.cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"rng.cuda.{i}"] = s
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["rng.cpu"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(root: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, stage_index: int,
                    stage: str, step: int, extra: dict | None = None, keep: int = 2,
                    model_state: dict | None = None, optim_state: dict | None = None) -> Path:
    """Write <root>/ckpt-SS-NNNNNNNN atomically; keep the newest `keep` checkpoints. `model_state` and
    `optim_state`: full states gathered beforehand (FSDP2, where every rank takes part in gathering them and
    one writes); by default taken from `model` and `opt` here."""
    final = root / _name(stage_index, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    weights = _unique_state(model) if model_state is None else _unique_tensors(model_state)
    osd = optimizer_state(model, opt) if optim_state is None else optim_state
    with writing(final, "checkpoint"):
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in weights.items()}, str(tmp / "model.safetensors"))
        faults.point("checkpoint-model-written")
        opt_t, opt_meta = optimizer_tensors(osd)
        save_file({**opt_t, **rng_tensors()}, str(tmp / "optimizer.safetensors"))
        state = {"stage_index": stage_index, "stage": stage, "step": step, "optimizer": opt_meta, **(extra or {})}
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
        faults.point("checkpoint-files-written")
        write_manifest(tmp)
        faults.point("checkpoint-manifest-written")
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    faults.point("checkpoint-renamed")
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the aliases of tied weights (safetensors stores no shared tensors)."""
    return _unique_tensors(model.state_dict(keep_vars=True))


def _unique_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out, seen = {}, set()
    for k, v in state.items():
        key = (v.data_ptr(), v.shape) if v.device.type != "meta" else id(v)
        if key in seen:
            continue
        seen.add(key)
        out[k] = v.detach()
    return out


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a folder only gets its final name when complete)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def newest_intact(root: Path, log=print) -> Path | None:
    """The newest checkpoint whose files match its manifest and read back, saying which newer ones were
    skipped and why; None if there is none."""
    for path in reversed(list_checkpoints(root)):
        problems = verify_manifest(path, required=True)
        if not problems:
            try:
                read_json(path / "state.json", "checkpoint state")
                return path
            except UserError as e:
                problems = [str(e)]
        log(f"--resume: skipping {path.name}: " + "; ".join(problems))
    return None


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer | None) -> dict:
    """Restore model, optimizer and RNG from `path` into `model` as it is now: whole, in DDP, or sharded by
    FSDP2 (every rank calls this and reads the files), whatever layout wrote the checkpoint."""
    state = read_json(path / "state.json", "checkpoint state")
    weights = read_safetensors(path / "model.safetensors", "checkpoint weights")
    if _is_sharded(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        names = set(model.state_dict())
        missing, unexpected = sorted(names - set(weights)), sorted(set(weights) - names)
        if not unexpected:
            set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {k for k in missing if k.endswith(("lm_head.weight", "image_head.weight"))}
    if set(missing) - tied or unexpected:
        raise UserError(f"{path}: checkpoint does not match the model: missing {sorted(set(missing) - tied)[:8]}, "
                        f"unexpected {unexpected[:8]}")
    tensors = read_safetensors(path / "optimizer.safetensors", "checkpoint optimizer state")
    if opt is not None:
        load_optimizer(model, opt, {k: v for k, v in tensors.items() if k.startswith("state.")}, state["optimizer"])
    restore_rng({k: v for k, v in tensors.items() if k.startswith("rng.")})
    return state


def resume_check(state: dict, stages: list, started_with: dict | None, now: dict) -> list[str]:
    """Refuse a checkpoint (its state.json) that this config's stages cannot continue; otherwise the settings
    that differ from the config the run was started with (its train_config.json, if any; `now` as that file
    would hold it), as 'key: old -> new' in --set's key syntax, for the log."""
    index, name, step = state["stage_index"], state["stage"], state["step"]
    names = [s.name for s in stages]
    if index >= len(stages) or names[index] != name:
        raise UserError(f"--resume: the newest checkpoint is at step {step} of stage {name!r} (stage {index}), but "
                        f"this config's stages are {names}: resume with the config the run was started with "
                        "(run.out's train_config.json), or set run.out to a new folder")
    if step >= stages[index].steps:
        raise UserError(f"--resume: the newest checkpoint is at step {step} of {name!r}, past the "
                        f"{stages[index].steps} steps this config gives it: set stages.{index}.steps above {step}, "
                        "or set run.out to a new folder")
    if started_with is None:
        return []
    before, after = _flat(started_with), _flat(now)
    return [f"{k}: {before.get(k, '(unset)')} -> {after.get(k, '(unset)')}"
            for k in sorted(set(before) | set(after)) if before.get(k) != after.get(k)]


def _flat(value, prefix: str = "") -> dict:
    """{'stages': [{'steps': 5}]} -> {'stages.0.steps': 5}; lists of plain values stay whole."""
    if isinstance(value, dict):
        items = value.items()
    elif isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value):
        items = enumerate(value)
    else:
        return {prefix: value}
    out = {}
    for k, v in items:
        out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    return out
