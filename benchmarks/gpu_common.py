"""Shared by the GPU benchmarks: the Transformer baseline, timing, the memory roofline and result files.

Every model here has random weights: speed and memory do not depend on the weights' values, and no
checkpoint can be downloaded where these run. Each result file says so.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from importlib import metadata
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
RANDOM_WEIGHTS = "random weights (speed and memory do not depend on them)"


def versions() -> dict:
    out = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("triton", "transformers", "flash-linear-attention", "fla-core", "timm"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def device_info() -> dict:
    props = torch.cuda.get_device_properties(0)
    return {"device": props.name, "memory_GiB": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count, **versions()}


def copy_bandwidth(gib: float = 2.0, repeat: int = 20) -> float:
    """Measured device memory bandwidth in bytes/s: a large device-to-device copy, bytes read + written."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(repeat):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * gib * 2**30 / sorted(times)[len(times) // 2]


def sync_time() -> float:
    torch.cuda.synchronize()
    return time.perf_counter()


def median_seconds(fn, repeat: int, warmup: int = 1) -> tuple[float, object]:
    """Median wall seconds of `repeat` synchronised calls after `warmup` untimed ones (kernel compilation,
    graph capture); returns it with the last call's result."""
    for _ in range(warmup):
        fn()
    times, out = [], None
    for _ in range(repeat):
        t0 = sync_time()
        out = fn()
        times.append(sync_time() - t0)
    return statistics.median(times), out


def gib(nbytes: int | float) -> float:
    return round(nbytes / 2**30, 3)


# --- the Transformer baseline ----------------------------------------------------------------------------
# DeepSeek-LLM-1.3B's shape, JanusFlow's language model (LLaMA architecture): 24 layers, d 2048, 16 heads,
# MLP 5504, vocabulary 102400. The position limit is raised so that 100k-token sequences are allowed.
LLAMA_1_3B = dict(hidden_size=2048, intermediate_size=5504, num_hidden_layers=24, num_attention_heads=16,
                  num_key_value_heads=16, vocab_size=102400, max_position_embeddings=131072,
                  rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)


def llama_baseline(vocab_size: int | None = None, dtype=torch.bfloat16):
    """A LLaMA-style ~1.3B decoder from transformers, random weights, SDPA attention, on the GPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    shape = dict(LLAMA_1_3B, **({} if vocab_size is None else {"vocab_size": vocab_size}))
    config = LlamaConfig(**shape, attn_implementation="sdpa", bos_token_id=0, eos_token_id=1, pad_token_id=0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def kv_cache_bytes(length: int, batch: int = 1, dtype_bytes: int = 2) -> int:
    c = LLAMA_1_3B
    head_dim = c["hidden_size"] // c["num_attention_heads"]
    return 2 * c["num_hidden_layers"] * c["num_key_value_heads"] * head_dim * length * batch * dtype_bytes


def param_bytes(module: torch.nn.Module) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


class DecodeClock:
    """A transformers streamer that times the decode phase of `generate` (batch 1): its first call carries
    the prompt, its second the first generated token, which ends the prefill; it then resets the peak-memory
    counter, so `peak` is the decode phase's."""

    def __init__(self):
        self.calls = 0
        self.t_first = self.t_start = None

    def start(self) -> None:
        self.t_start = sync_time()

    def put(self, value) -> None:
        self.calls += 1
        if self.calls == 2:
            self.t_first = sync_time()
            torch.cuda.reset_peak_memory_stats()

    def end(self) -> None:
        self.t_end = sync_time()
        self.peak = torch.cuda.max_memory_allocated()


# Kernel classes of a profiled step, first match wins (lower-case substrings of the kernel's name).
KERNEL_CLASSES = (
    ("attention", ("flash", "fmha", "attention", "sdpa")),  # before GEMMs: cuDNN's attention names sm90_ too
    ("matrix multiply", ("nvjet", "gemm", "cutlass", "xmma", "cublas", "sm90_", "sm80_", "ampere_")),
    ("SSM scan (fla chunk kernels)", ("chunk_", "gla", "recurrent", "ssd")),
    ("causal conv", ("causal_conv", "conv1d", "conv_")),
    ("optimizer", ("multi_tensor", "adam")),
    ("cross-entropy / softmax", ("softmax", "cross_entropy", "nll_loss", "logsumexp")),
    ("inductor fused (norms, glue)", ("triton_",)),
    ("norms", ("rms", "layer_norm", "layernorm")),
    ("copies and casts", ("copy", "cast", "memcpy", "memset", "fill")),
)


def kernel_breakdown(kernels: list[tuple[str, float]]) -> list[tuple[str, float, int]]:
    """(kernel name, GPU microseconds) pairs summed by KERNEL_CLASSES, anything unmatched as "other elementwise and
    reductions": (class, microseconds, kernels) rows, largest first."""
    totals: dict[str, list] = {}
    for name, us in kernels:
        low = name.lower()
        cls = next((c for c, keys in KERNEL_CLASSES if any(k in low for k in keys)),
                   "other elementwise and reductions")
        row = totals.setdefault(cls, [0.0, 0])
        row[0] += us
        row[1] += 1
    return sorted(((c, us, n) for c, (us, n) in totals.items()), key=lambda r: -r[1])


def profiled_kernels(prof) -> list[tuple[str, float]]:
    """The GPU kernels of a torch.profiler run with their self GPU microseconds (CPU-side ops, which would count
    their kernels a second time, left out)."""
    out = []
    for evt in prof.key_averages():
        if "CUDA" not in str(getattr(evt, "device_type", "")):
            continue
        out.append((evt.key, float(evt.self_device_time_total)))
    return out


def breakdown_table(kernels: list[tuple[str, float]]) -> str:
    rows = kernel_breakdown(kernels)
    total = sum(us for _, us, _ in rows) or 1.0
    lines = [f"{'kernel class':<36} {'GPU ms':>9} {'share':>7} {'kernels':>8}"]
    lines += [f"{c:<36} {us / 1e3:>9.1f} {us / total:>7.1%} {n:>8}" for c, us, n in rows]
    lines.append(f"{'total':<36} {total / 1e3:>9.1f}")
    return "\n".join(lines)


def write_json(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    """benchmarks/results/<name>.json, and a copy under $OUT when the device tool runs this."""
    return _write(out_dir or RESULTS, f"{name}.json", json.dumps(payload, indent=2) + "\n")


def write_log(name: str, text: str) -> Path:
    """benchmarks/results/logs/<name>, and a copy under $OUT/logs when the device tool runs this."""
    return _write(RESULTS, f"logs/{name}", text)


def _write(root: Path, relative: str, text: str) -> Path:
    """root/relative, and $OUT/relative when set; returns the first."""
    for d in [root] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else []):
        (d / relative).parent.mkdir(parents=True, exist_ok=True)
        (d / relative).write_text(text)
    return root / relative


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def failure(e: BaseException) -> str:
    """One line for a failed measurement (an out-of-memory or a compile error is a result too)."""
    text = str(e).strip().splitlines()
    return f"failed: {type(e).__name__}" + (f": {text[0][:160]}" if text else "")


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "-" if v is None else str(v)
