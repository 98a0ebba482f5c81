"""Fixed launch configurations for flash-linear-attention's autotuned kernels on Hopper GPUs.

fla autotunes a kernel the first time it meets a new key (shapes, dtypes, flags), compiling every candidate: on a
fresh H200 the first shapes-small training step waited over 300 s for fourteen such autotunes (two device calls
of 2026-12-01, `benchmarks/results/logs/fla_autotune_h200.log`), and every lent machine starts fresh. On a Hopper GPU
(compute capability 9.x) `pin()` narrows each kernel below to the one configuration fla's autotuner chose for
Mamba-2's shapes (d_state 128 after padding, headdim 64) on that H200, so a fresh machine compiles one per kernel.
Elsewhere, or with OMNIMAMBA_FLA_AUTOTUNE=1, fla autotunes as it always does. A pin that matches none of a
kernel's candidates (another fla version) leaves that kernel alone.
"""

from __future__ import annotations

import functools
import importlib
import os

# (module, kernel) -> the configuration's meta-parameters, num_warps and num_stages
PINS: dict[tuple[str, str], dict] = {
    ("fla.modules.norm.layernorm", "layer_norm_fwd_kernel"): {"BT": 32, "num_warps": 4, "num_stages": 3},
    ("fla.modules.norm.layernorm", "layer_norm_bwd_kernel"): {"BT": 32, "num_warps": 8, "num_stages": 3},
    ("fla.modules.causal_conv1d.ops", "causal_conv1d_fwd_kernel"): {"BD": 64, "num_warps": 4, "num_stages": 3},
    ("fla.ops.utils.cumsum", "chunk_local_cumsum_scalar_kernel"): {"num_warps": 1, "num_stages": 3},
    ("fla.ops.common.chunk_h", "chunk_fwd_kernel_h"): {"BK": 64, "BV": 64, "num_warps": 4, "num_stages": 2},
    ("fla.ops.common.chunk_h", "chunk_bwd_kernel_dh"): {"BK": 64, "BV": 64, "num_warps": 4, "num_stages": 3},
    ("fla.ops.common.chunk_o", "chunk_fwd_kernel_o"): {"BK": 64, "BV": 64, "num_warps": 4, "num_stages": 3},
    ("fla.ops.common.chunk_o", "chunk_bwd_kernel_dqkwg"): {"num_warps": 4, "num_stages": 3},
    ("fla.ops.common.chunk_o", "chunk_bwd_kernel_dv"): {"num_warps": 4, "num_stages": 2},
    ("fla.modules.causal_conv1d.ops", "causal_conv1d_bwd_kernel"): {"BD": 32, "num_warps": 4, "num_stages": 3},
}


def _autotuner(obj):
    """The triton Autotuner inside fla's decorators (heuristics wrap it), or None."""
    from triton.runtime.autotuner import Autotuner

    for _ in range(4):
        if isinstance(obj, Autotuner):
            return obj
        obj = getattr(obj, "fn", None)
    return None


def _matches(config, want: dict) -> bool:
    meta = {k: v for k, v in want.items() if k not in ("num_warps", "num_stages")}
    return (all(config.kwargs.get(k) == v for k, v in meta.items())
            and config.num_warps == want.get("num_warps", config.num_warps)
            and config.num_stages == want.get("num_stages", config.num_stages))


def narrow(tuner, want: dict) -> bool:
    """Keep only the first of `tuner`'s configurations that matches `want`; False (unchanged) if none does."""
    keep = [c for c in tuner.configs if _matches(c, want)]
    if not keep:
        return False
    tuner.configs = keep[:1]
    return True


@functools.cache
def pin() -> tuple[str, ...]:
    """Apply PINS where they hold (once per process); returns the kernels pinned."""
    import torch

    if os.environ.get("OMNIMAMBA_FLA_AUTOTUNE") == "1" or not torch.cuda.is_available():
        return ()
    if torch.cuda.get_device_capability()[0] != 9:
        return ()
    pinned = []
    for (module, name), want in PINS.items():
        try:
            tuner = _autotuner(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            continue
        if tuner is not None and narrow(tuner, want):
            pinned.append(f"{module}.{name}")
    return tuple(pinned)
