"""ops/fla_pins.py: narrowing an autotuned kernel to one launch configuration, and where pinning applies."""

import pytest

triton = pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from omnimamba.ops import fla_pins  # noqa: E402


def _kernel():
    configs = [triton.Config({"B": b}, num_warps=w, num_stages=s) for b in (16, 32) for w in (2, 4) for s in (2, 3)]

    @triton.autotune(configs=configs, key=["n"])
    @triton.heuristics({"EVEN": lambda args: args["n"] % 2 == 0})
    @triton.jit
    def copy(x, y, n, B: tl.constexpr, EVEN: tl.constexpr):
        i = tl.program_id(0) * B + tl.arange(0, B)
        tl.store(y + i, tl.load(x + i, mask=i < n), mask=i < n)

    return copy


def test_narrow_keeps_exactly_the_matching_configuration_and_leaves_a_kernel_without_one_alone():
    tuner = fla_pins._autotuner(_kernel())
    assert tuner is not None and len(tuner.configs) == 8
    assert fla_pins.narrow(tuner, {"B": 32, "num_warps": 4, "num_stages": 3})
    (kept,) = tuner.configs
    assert (kept.kwargs["B"], kept.num_warps, kept.num_stages) == (32, 4, 3)
    other = fla_pins._autotuner(_kernel())
    assert not fla_pins.narrow(other, {"B": 64, "num_warps": 4})
    assert len(other.configs) == 8
    assert fla_pins._autotuner(lambda: None) is None


def test_every_pin_names_a_kernel_parameter_layout():
    # the pins' meta-parameters are the ones fla's kernels take (BT for norms, BD for convs, BK/BV for chunks)
    for (module, name), want in fla_pins.PINS.items():
        assert module.startswith("fla.") and "kernel" in name, (module, name)
        assert {"num_warps", "num_stages"} <= set(want) and set(want) <= {"BT", "BD", "BK", "BV", "num_warps",
                                                                            "num_stages"}


def test_pin_is_off_without_a_hopper_gpu_or_when_autotuning_is_asked_for(monkeypatch):
    import torch

    fla_pins.pin.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fla_pins.pin() == ()
    fla_pins.pin.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (8, 0))
    assert fla_pins.pin() == ()
    fla_pins.pin.cache_clear()
    monkeypatch.setenv("OMNIMAMBA_FLA_AUTOTUNE", "1")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a: (9, 0))
    assert fla_pins.pin() == ()
    fla_pins.pin.cache_clear()
