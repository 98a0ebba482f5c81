"""The fused decode step (ops/fused_step.py) against the unfused one, on the CPU through Triton's interpreter
(float32: the interpreter's bf16 matrix products are wrong; Triton 3.8 here), and which layers take it. Its bf16 and CUDA-graph
cases are in test_decode_gpu.py."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from omnimamba.lora import TaskLoRALinear
from omnimamba.mamba2 import Mamba2Config

ROOT = Path(__file__).resolve().parents[1]


# up to 8 rows each projection is one kernel with its norm (in_proj with the conv, out_proj with the residual),
# its products on CUDA cores (gemv) or tensor cores (dot); 3 rows: masked rows; 20: the GEMM path, and the
# few-rows path's tiles of 32 rows (taken by 16-bit weights when FEW_ROWS is above 8)
@pytest.mark.parametrize("batch,proj,few_rows", [(1, "default", 0), (1, "dot", 0), (3, "gemv", 0), (3, "dot", 0),
                                                 (20, "default", 0), (20, "dot", 32)])
def test_fused_step_matches_the_unfused_step_in_the_triton_interpreter(batch, proj, few_rows):
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("on a GPU the compiled kernels are tested instead (test_decode_gpu.py)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT / "src")}
    out = subprocess.run([sys.executable, str(ROOT / "tests/helpers/fused_step_parity.py"), "--batch", str(batch),
                          "--device", "cpu", "--proj", proj, "--few-rows", str(few_rows)], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    errors = json.loads(out.stdout.strip().splitlines()[-1])
    assert errors["shape"] == [batch, 64]
    assert errors["out"] < 1e-5 * errors["out_scale"], errors
    assert errors["conv"] < 1e-5 and errors["ssm"] < 1e-6, errors


def test_fused_step_covers_one_norm_group_width_four_conv_and_no_biases():
    from omnimamba.ops.fused_step import supports

    w = torch.empty(2, 2)
    base = Mamba2Config(d_model=64, n_layer=1, vocab_size=16, headdim=16, d_state=16)
    assert not supports(base, w, w, biases=False)  # a CPU weight: the kernels are compiled for CUDA
    if torch.cuda.is_available():
        w = w.cuda()
        assert supports(base, w, w, biases=False)
        assert not supports(base, w, w, biases=True)
        assert not supports(base.replace(ngroups=2), w, w, biases=False)
        assert not supports(base.replace(d_conv=3), w, w, biases=False)
        assert not supports(base, w.t(), w, biases=False)  # the kernels read rows of K contiguous values


def test_route_weight_is_the_matrix_the_route_multiplies_by():
    torch.manual_seed(0)
    layer = TaskLoRALinear(8, 6)
    torch.nn.init.normal_(layer.lora_B["t2i"].weight)
    x = torch.randn(3, 8)
    assert layer.route_weight(None) is layer.weight
    assert layer.route_weight("t2i") is None  # unmerged: two extra GEMMs, no single matrix
    layer.refresh_decode_weight("t2i")
    layer.decode_active.add("t2i")
    torch.testing.assert_close(x @ layer.route_weight("t2i").t(), layer(x, task="t2i"))
    layer.decode_active.clear()
    layer.merge("t2i")
    assert layer.route_weight("t2i") is layer.weight and layer.route_weight("mmu") is None
