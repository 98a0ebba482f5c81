"""Reading and writing the project's files so that damage is named and never half-taken.

Readers turn a truncated, empty or foreign file into one `UserError` naming the file and what it should be;
tensors are read without unpickling code (safetensors, or torch.load with weights_only). Writers report a full
disk or a read-only folder as one clear error. A folder written with `write_manifest` records each file's size
and SHA-256, written last; `verify_manifest` checks them before a load trusts the folder.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
from contextlib import contextmanager
from pathlib import Path

from .errors import UserError

MANIFEST = "manifest.json"


@contextmanager
def writing(path: str | Path, what: str = "file"):
    """Turn an OSError while writing `path` (disk full, read-only folder, no permission) into one clear error."""
    try:
        yield
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO):
            raise UserError(f"cannot write the {what} {path}: {e.strerror or e}") from e
        raise


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} not found: {path}")
    return path


def read_json(path: str | Path, what: str = "JSON file") -> object:
    path = _existing(path, what)
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: the {what} is damaged or not JSON ({e})") from None


def read_safetensors(path: str | Path, what: str = "weights") -> dict:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = _existing(path, what)
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:  # a truncated, empty or foreign file
        raise UserError(f"{path}: the {what} file is damaged or not safetensors ({e})") from None


def torch_load_weights(path: str | Path, what: str = "weights") -> object:
    """torch.load with weights_only=True: tensors and plain containers, never arbitrary pickled code."""
    import torch

    path = _existing(path, what)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: the {what} file is damaged, not a PyTorch checkpoint, or holds more than "
                        f"tensors ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_file(path: Path) -> None:
    with path.open("rb") as f:
        os.fsync(f.fileno())


def write_manifest(folder: str | Path) -> Path:
    """Record every file of `folder` (size, SHA-256) in manifest.json, written last and atomically; the files
    are flushed to disk first, so a manifest never vouches for data still in the page cache."""
    folder = Path(folder)
    entries = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.name != MANIFEST and not p.name.startswith("."):
            fsync_file(p)
            entries[p.name] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    tmp = folder / f".{MANIFEST}.tmp"
    with writing(folder / MANIFEST, "manifest"):
        tmp.write_text(json.dumps({"files": entries}, indent=1) + "\n")
        fsync_file(tmp)
        os.replace(tmp, folder / MANIFEST)
    return folder / MANIFEST


@contextmanager
def manifested_folder(path: str | Path, what: str):
    """Write a folder's files inside the block: its old manifest goes first (until the new one, the folder is
    not vouched for), the new one is written last; write errors are reported as `writing` does."""
    path = Path(path)
    with writing(path, what):
        path.mkdir(parents=True, exist_ok=True)
        (path / MANIFEST).unlink(missing_ok=True)
        yield path
        write_manifest(path)


def verify_manifest(folder: str | Path, required: bool = True) -> list[str]:
    """Problems found (empty when every recorded file is there with its size and checksum). Without a
    manifest: a problem if `required`, else nothing to check."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        return [f"{folder}: no {MANIFEST} (written last: the folder was never completed)"] if required else []
    try:
        entries = json.loads(path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        return [f"{path}: damaged"]
    problems = []
    for name, meta in entries.items():
        p = folder / name
        if not p.is_file():
            problems.append(f"{p}: missing")
        elif p.stat().st_size != meta["bytes"]:
            problems.append(f"{p}: {p.stat().st_size} bytes, the manifest says {meta['bytes']}")
        elif _sha256(p) != meta["sha256"]:
            problems.append(f"{p}: checksum differs from the manifest (the file was altered or damaged)")
    return problems


def require_intact(folder: str | Path, what: str) -> None:
    """One clear error if `folder` has a manifest that its files no longer match."""
    problems = verify_manifest(folder, required=False)
    if problems:
        raise UserError(f"{what} {folder} fails verification: " + "; ".join(problems))
