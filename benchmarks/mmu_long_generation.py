"""Long multimodal-understanding generation (the paper's Fig. 1 c-d): image + prompt, then forced greedy
generation, at total sequence lengths up to 100k tokens. One GPU, one run, random weights.

For each total length L the prompt is filled so that prefill + `--window` generated tokens end at L, and the
decode phase is timed on its own: tokens/s = generated tokens after the first / their wall time, at context
length L (the per-token cost a generation pays once it is that long). Peak memory is the decode phase's
(weights + cache + per-step buffers); the prefill's own peak is reported beside it.

Rows:
  omnimamba             the 1.3B preset (DINOv2 + SigLIP at 384 px), bf16, fused kernels, CUDA-graph decode
  omnimamba-eager       the same without CUDA graphs
  omnimamba-chunked     the same as omnimamba with the prompt prefilled --prefill-chunk positions at a time
                        (model.prefill_chunk): the prefill's peak memory then stops growing with the prompt
  llama-stock           transformers LLaMA ~1.3B (DeepSeek-LLM-1.3B shape), SDPA, its stock `generate`
  llama-static-compile  the same with a static cache and torch.compile: `generate` with
                        cache_implementation="static", which compiles the decode step itself (the setting
                        transformers documents as its fastest)
and the memory roofline: the bytes one decode step must read (weights, state or KV cache) over the measured
copy bandwidth.

With --batch B, B sequences of the same length decode together (tokens/s counts all rows; ms/token is one step;
B images, B prompts) and the JSON is mmu_long_generation_batchB.json: long prompts at large B need
omnimamba-chunked, whose prefill peak stays flat (a whole-prompt prefill of B x 100k positions does not fit).

    python benchmarks/mmu_long_generation.py [--lengths 1024 4096 ...] [--window 128] [--budget-s 420]
    python benchmarks/mmu_long_generation.py --batch 16 --lengths 1024 16384 100000 \
        --systems omnimamba-chunked llama-static-compile
"""

from __future__ import annotations

import argparse
import time

import torch

import gpu_common as gc
from omnimamba.model import OmniMamba, preset

COLUMNS = ["system", "batch", "length", "tokens_per_s", "ms_per_token", "roofline_ms", "peak_decode_GiB",
           "peak_prefill_GiB", "prefill_s", "note"]


def build_omnimamba():
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = OmniMamba(preset("omnimamba-1.3b"), backend="auto")
    return model.to(torch.bfloat16).eval()


@torch.no_grad()
def run_omnimamba(model, length: int, window: int, graph: bool, batch: int = 1,
                  stop_at_eot: bool = False) -> dict:
    """stop_at_eot: decode as an answer does (checking after each token whether every row has ended), else
    `window` tokens whatever comes."""
    cfg = model.config
    size = cfg.understanding.image_size
    pixels = torch.rand(batch, 3, size, size, device="cuda", dtype=torch.bfloat16)
    n_image = model.encode_images(pixels[:1]).size(1)
    prompt_len = length - window - 4 - n_image
    prompt = torch.randint(0, cfg.text_base_vocab_size, (batch, prompt_len), device="cuda")
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    t0 = gc.sync_time()
    steps = model.generate_text(pixels, prompt, max_new_tokens=window, stream=True, stop_at_eot=stop_at_eot,
                                use_cuda_graph=graph)
    next(steps)  # prefill and the first token
    t1 = gc.sync_time()
    prefill_peak = torch.cuda.max_memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    n = sum(1 for _ in steps)
    t2 = gc.sync_time()
    return {"tokens_per_s": batch * n / (t2 - t1), "ms_per_token": 1e3 * (t2 - t1) / n, "prefill_s": t1 - t0,
            "tokens": n + 1,
            "peak_decode_GiB": gc.gib(torch.cuda.max_memory_allocated()), "peak_prefill_GiB": gc.gib(prefill_peak)}


@torch.no_grad()
def run_llama(model, length: int, window: int, static: bool, batch: int = 1) -> dict:
    ids = torch.randint(2, model.config.vocab_size, (batch, length - window), device="cuda")
    clock = gc.DecodeClock()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    kwargs = {"cache_implementation": "static"} if static else {}
    clock.start()
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=window, min_new_tokens=window,
                   do_sample=False, streamer=clock, **kwargs)
    clock.end()
    n = clock.calls - 2  # generated tokens after the first
    prefill_peak = None  # the clock resets the counter at the first token; the prefill's peak is not kept
    return {"tokens_per_s": batch * n / (clock.t_end - clock.t_first), "ms_per_token": 1e3 * (clock.t_end - clock.t_first) / n,
            "prefill_s": clock.t_first - clock.t_start, "peak_decode_GiB": gc.gib(clock.peak),
            "peak_prefill_GiB": prefill_peak}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 16384, 32768, 65536, 100000])
    ap.add_argument("--window", type=int, default=128, help="generated tokens timed at each length")
    ap.add_argument("--systems", nargs="+", default=["omnimamba", "omnimamba-eager", "omnimamba-chunked",
                                                     "llama-stock", "llama-static-compile"])
    ap.add_argument("--prefill-chunk", type=int, default=8192, help="omnimamba-chunked's prefill chunk")
    ap.add_argument("--budget-s", type=float, default=420, help="skip what would start after this many seconds")
    ap.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    args = ap.parse_args()
    if args.batch < 1:
        ap.error(f"--batch must be >= 1, got {args.batch}")
    b = args.batch
    began = time.perf_counter()
    info = gc.device_info()
    bandwidth = gc.copy_bandwidth()
    print(f"{info['device']}: measured copy bandwidth {bandwidth / 1e12:.2f} TB/s (read + write)", flush=True)
    rows = []

    def record(system, length, fn, roofline_bytes):
        row = {"system": system, "batch": b, "length": length, "roofline_ms": 1e3 * roofline_bytes / bandwidth}
        if time.perf_counter() - began > args.budget_s:
            row["note"] = "not run: time budget"
        else:
            try:
                row.update(fn())
            except Exception as e:  # noqa: BLE001 - an out-of-memory or a compile failure is a result too
                row["note"] = gc.failure(e)
                torch.cuda.empty_cache()
        rows.append(row)
        gc.print_table([row], COLUMNS)

    if any(s.startswith("omnimamba") for s in args.systems):
        model = build_omnimamba()
        cache = model.allocate_cache(b)  # what decoding holds (its state dtype included)
        # One step reads every layer's weights and the whole text head, and reads + writes the cache.
        step_bytes = gc.param_bytes(model.backbone.layers) + model.lm_head.weight.nbytes + 2 * cache.nbytes
        del cache
        run_omnimamba(model, 2048, 16, graph=True, batch=b)  # compile the kernels, capture the graph
        for length in args.lengths:
            for system, graph, chunk in (("omnimamba", True, 0), ("omnimamba-eager", False, 0),
                                         ("omnimamba-chunked", True, args.prefill_chunk)):
                if system in args.systems:
                    model.prefill_chunk = chunk
                    record(system, length, lambda: run_omnimamba(model, length, args.window, graph, b), step_bytes)
            model.prefill_chunk = 0
        del model
        torch.cuda.empty_cache()

    if any(s.startswith("llama") for s in args.systems):
        llama = gc.llama_baseline()
        weights = gc.param_bytes(llama) - llama.model.embed_tokens.weight.nbytes
        if "llama-stock" in args.systems:
            run_llama(llama, 512, 8, static=False)
            for length in args.lengths:
                record("llama-stock", length, lambda: run_llama(llama, length, args.window, False, b),
                       weights + gc.kv_cache_bytes(length, b))
        if "llama-static-compile" in args.systems:
            for length in args.lengths:
                def static_run():
                    run_llama(llama, length, args.window, True, b)  # compiles for this length
                    return run_llama(llama, length, args.window, True, b)
                record("llama-static-compile", length, static_run, weights + gc.kv_cache_bytes(length, b))

    print()
    gc.print_table(rows, COLUMNS)
    path = gc.write_json("mmu_long_generation" if b == 1 else f"mmu_long_generation_batch{b}", {
        "benchmark": f"long MMU generation, decode phase at each total length (batch {b}, bf16, greedy)",
        "weights": gc.RANDOM_WEIGHTS, "window": args.window, "prefill_chunk": args.prefill_chunk,
        "copy_bandwidth_TBps": bandwidth / 1e12,
        **info, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
