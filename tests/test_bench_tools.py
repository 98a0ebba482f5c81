"""benchmarks/gpu_common.py's profile summary: kernels summed by class (pure Python, so checked here on the CPU)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import gpu_common as gc  # noqa: E402


def test_kernels_are_summed_by_class_largest_first():
    kernels = [
        ("nvjet_sm90_tst_192x208_64x4_1x2_h_bz_coopB_TNT", 700.0),
        ("sm90_xmma_gemm_bf16bf16_bf16f32", 300.0),
        ("chunk_bwd_kernel_dqkwg", 650.0),
        ("chunk_fwd_kernel_h", 130.0),
        ("triton_poi_fused__to_copy_add_mul_select_silu_slice_6", 320.0),  # inductor's, though it names a copy
        ("void at::native::direct_copy_kernel_cuda(...)", 25.0),
        ("causal_conv1d_bwd_kernel", 410.0),
        ("multi_tensor_apply_kernel<FusedAdamMathFunctor>", 90.0),
        ("void at::native::reduce_kernel<sum>", 5.0),
        ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_3_64x64x128", 4.0),
    ]
    rows = gc.kernel_breakdown(kernels)
    assert rows == [("matrix multiply", 1000.0, 2), ("SSM scan (fla chunk kernels)", 780.0, 2),
                    ("causal conv", 410.0, 1), ("inductor fused (norms, glue)", 320.0, 1), ("optimizer", 90.0, 1),
                    ("copies and casts", 25.0, 1), ("other elementwise and reductions", 5.0, 1),
                    ("attention", 4.0, 1)]
    table = gc.breakdown_table(kernels).splitlines()
    assert table[1].split()[-3:] == ["1.0", "38.0%", "2"]  # 1,000 us of 2,634 us
    assert table[-1].split() == ["total", "2.6"]
