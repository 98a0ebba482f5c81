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


def optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            t = value if torch.is_tensor(value) else torch.tensor(value)
            tensors[f"state.{idx}.{key}"] = t.detach().cpu().contiguous()
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    device = next(p.device for g in opt.param_groups for p in g["params"])
    for s in state.values():
        for key in s:
            if key != "step":
                s[key] = s[key].to(device)
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


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
                    stage: str, step: int, extra: dict | None = None, keep: int = 2) -> Path:
    """Write <root>/ckpt-SS-NNNNNNNN atomically; keep the newest `keep` checkpoints."""
    final = root / _name(stage_index, step)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    with writing(final, "checkpoint"):
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in _unique_state(model).items()},
                  str(tmp / "model.safetensors"))
        faults.point("checkpoint-model-written")
        opt_t, opt_meta = optimizer_tensors(opt)
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
    out, seen = {}, set()
    for k, v in model.state_dict(keep_vars=True).items():
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
    state = read_json(path / "state.json", "checkpoint state")
    weights = read_safetensors(path / "model.safetensors", "checkpoint weights")
    missing, unexpected = model.load_state_dict(weights, strict=False)
    tied = {k for k in missing if k.endswith(("lm_head.weight", "image_head.weight"))}
    if set(missing) - tied or unexpected:
        raise UserError(f"{path}: checkpoint does not match the model: missing {sorted(set(missing) - tied)[:8]}, "
                        f"unexpected {unexpected[:8]}")
    tensors = read_safetensors(path / "optimizer.safetensors", "checkpoint optimizer state")
    if opt is not None:
        load_optimizer(opt, {k: v for k, v in tensors.items() if k.startswith("state.")}, state["optimizer"])
    restore_rng({k: v for k, v in tensors.items() if k.startswith("rng.")})
    return state
