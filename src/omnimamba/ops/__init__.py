"""The kernel seam: every Mamba-2 computation the model needs, behind one small interface.

A backend is a module exposing the functions of KERNEL_NAMES with the signatures of `omnimamba.ops.reference`,
which is the spec. GPU backends must match it in tests.
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

KERNEL_NAMES = ("ssd_chunked", "ssd_step", "ssd_decode", "causal_conv", "conv_step", "add_rmsnorm", "gated_rmsnorm")

# name -> module path; a backend is imported only when asked for, so optional GPU packages stay optional.
BACKENDS = {
    "reference": "omnimamba.ops.reference",
    "fla": "omnimamba.ops.fla",  # CUDA + flash-linear-attention (optional extra: pip install omnimamba[gpu])
}


def _fast_backend_available() -> str | None:
    for name in BACKENDS:
        if name == "reference":
            continue
        try:
            module = importlib.import_module(BACKENDS[name])
        except ImportError:
            continue
        if getattr(module, "is_available", lambda: False)():
            return name
    return None


def resolve_backend_name(name: str = "auto") -> str:
    """'auto' -> the first available fast backend on CUDA, else 'reference'; other names are checked."""
    if name == "auto":
        return (_fast_backend_available() if torch.cuda.is_available() else None) or "reference"
    if name not in BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose one of {['auto', *BACKENDS]}")
    return name


def load_backend(name: str = "auto") -> ModuleType:
    """Import and return the backend module for `name` ('auto', 'reference', ...)."""
    resolved = resolve_backend_name(name)
    try:
        module = importlib.import_module(BACKENDS[resolved])
    except ImportError as e:
        raise ImportError(f"kernel backend {resolved!r} needs a package that is not installed: {e}") from e
    missing = [k for k in KERNEL_NAMES if not hasattr(module, k)]
    if missing:
        raise TypeError(f"kernel backend {resolved!r} lacks {missing}")
    return module
