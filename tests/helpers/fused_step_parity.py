"""Run a small Mamba-2 LM's decode steps fused (ops/fused_step.py) and unfused (reference kernels) side by side
and print, as JSON, the largest differences in outputs and states. Run with TRITON_INTERPRET=1 on a CPU (the
kernels then run in Triton's interpreter), or on a GPU.

    python tests/helpers/fused_step_parity.py --batch 3 --dtype float32
"""

import argparse
import json

import torch

from omnimamba.mamba2 import Mamba2Config
from omnimamba.mamba2.model import Mamba2LM
from omnimamba.ops import fused_step


def compare(batch: int, dtype: torch.dtype, device: str, steps: int = 3, fused_values: list | None = None) -> dict:
    """The largest absolute differences fused - unfused over `steps` decode steps after a 5-token prefill, and the
    largest magnitudes of the unfused values (`out_scale`, `conv_scale`, `ssm_scale`). fused_values: a list that
    receives each step's fused output, conv state and SSM state (copies)."""
    torch.manual_seed(0)
    cfg = Mamba2Config(d_model=64, n_layer=2, vocab_size=100, pad_vocab_size_multiple=8, headdim=16, d_state=32,
                       chunk_size=16, conv_bias=True)
    model = Mamba2LM(cfg, backend="reference").eval()
    with torch.no_grad():  # norms and D away from their initial ones, so a mix-up of them shows
        for layer in model.backbone.layers:
            for w in (layer.norm.weight, layer.mixer.norm.weight):
                w.normal_(1, 0.1)
            layer.mixer.D.normal_()
        model.backbone.norm_f.weight.normal_(1, 0.1)
    model = model.to(device, dtype)
    bb = model.backbone
    ref_cache, fused_cache = model.allocate_cache(batch), model.allocate_cache(batch)
    errors = {"out": 0.0, "conv": 0.0, "ssm": 0.0}
    scales = dict.fromkeys(errors, 0.0)
    with torch.no_grad():
        prompt = torch.randint(0, cfg.vocab_size, (batch, 5), device=device)
        model(prompt, cache=ref_cache)
        model(prompt, cache=fused_cache)
        for _ in range(steps):
            emb = bb.embedding(torch.randint(0, cfg.vocab_size, (batch,), device=device))
            ref = bb.step(emb, ref_cache)
            out = fused_step.decode_step(bb.layers, [b.mixer.in_proj.weight for b in bb.layers], emb,
                                         fused_cache.conv, fused_cache.ssm, bb.norm_f.weight, bb.norm_f.eps)
            if fused_values is not None:
                fused_values.extend(t.clone() for t in (out, fused_cache.conv, fused_cache.ssm))
            for key, (x, y) in {"out": (out, ref), "conv": (fused_cache.conv, ref_cache.conv),
                                "ssm": (fused_cache.ssm, ref_cache.ssm)}.items():
                errors[key] = max(errors[key], (x.float() - y.float()).abs().max().item())
                scales[key] = max(scales[key], y.float().abs().max().item())
    return {**errors, **{f"{k}_scale": v for k, v in scales.items()}, "dtype": str(out.dtype),
            "shape": list(out.shape)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=3)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--proj", choices=["default", "gemv", "dot"], default="default",
                    help="the few-rows path's projections on CUDA cores (gemv) or tensor cores (dot) "
                    "(default: the committed choice; one row takes the 16-bit one-row tiles in float32 too)")
    ap.add_argument("--few-rows", type=int, default=0,
                    help="take the few-rows path up to this many rows whatever the dtype (default: the module's)")
    a = ap.parse_args()
    fs = fused_step
    if a.proj == "default" and a.batch == 1:  # float32 weights: one row on the 16-bit models' one-row tiles
        fs._IN_TILE_FP32, fs._OUT_TILE_FP32 = fs._IN_TILE_ONE_ROW, fs._OUT_TILE_ONE_ROW
    elif a.proj != "default":  # the same launches for every row count and dtype
        dot = a.proj == "dot"
        fs._IN_TILE = fs._IN_TILE_ONE_ROW = fs._IN_TILE_MANY = fs._IN_TILE_FP32 = (
            fs._IN_TILE if dot else fs._IN_TILE_FP32)
        fs._OUT_TILE = fs._OUT_TILE_ONE_ROW = fs._OUT_TILE_MANY = fs._OUT_TILE_FP32 = (
            {"DOT": True, "BLOCK_N": 16, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3} if dot
            else fs._OUT_TILE_FP32)
    if a.few_rows:
        fs.few_rows = lambda m, dtype: m <= a.few_rows
    print(json.dumps(compare(a.batch, getattr(torch, a.dtype), a.device, a.steps)))


if __name__ == "__main__":
    main()
