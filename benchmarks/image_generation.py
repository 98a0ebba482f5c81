"""Image generation like the paper's Table 3: one short prompt, 16 images of 256 px (256 image tokens each)
with classifier-free guidance, so 32 rows decode together. One GPU, one run, random weights.

Rows:
  omnimamba             the 1.3B preset, bf16, fused kernels, CUDA-graph decode, the SSM state stored in bf16
                        (model.decode_state_dtype's default on a GPU, as mamba_ssm keeps it for bf16 models:
                        half the state traffic, which dominates a step at 32 rows); codes, then the VQ decoder
  omnimamba-eager       the same without CUDA graphs
  omnimamba-fp32-state  CUDA graphs with the SSM state in float32 (model.decode_state_dtype = None)
  llama-stock           transformers LLaMA ~1.3B (DeepSeek-LLM-1.3B shape) over the 16,384 image codes,
                        stock `generate` with the guidance mix as a logits processor (32 rows)
  llama-static-compile  the same with cache_implementation="static", under which `generate` compiles its
                        decode step with torch.compile
The baselines produce codes only; omnimamba's time is given with and without decoding them to pixels.
Greedy decoding (the same cost as sampling) keeps a conditional row and its unconditional twin on one code.

    python benchmarks/image_generation.py [--images 16] [--guidance 3] [--repeat 3] [--profile FILE]

--profile FILE: torch.profiler over one graphed `omnimamba` generation after the timed ones (the kernels of a
whole image, the graph replays and what runs between them), written to results/logs/FILE.
"""

from __future__ import annotations

import argparse

import torch

import gpu_common as gc
from mmu_long_generation import build_omnimamba

COLUMNS = ["system", "images", "seconds", "images_per_s", "codes_seconds", "ms_per_step", "roofline_ms_per_step",
           "peak_GiB", "note"]


class GuidanceMix:
    """Logits processor for a batch laid out [conditional rows; unconditional rows]: both halves get
    uncond + s * (cond - uncond), so greedy decoding keeps each pair on the same code."""

    def __init__(self, scale: float):
        self.scale = scale

    def __call__(self, input_ids, scores):
        cond, uncond = scores.float().chunk(2)
        mixed = uncond + self.scale * (cond - uncond)
        # -inf from an earlier processor (min_new_tokens masks EOS) would give -inf - -inf = nan: keep it -inf.
        mixed = torch.where(cond.isfinite() & uncond.isfinite(), mixed, torch.minimum(cond, uncond))
        return torch.cat([mixed, mixed])


def profile_generation(fn, name: str, n: int, guidance: float, rows: int = 25) -> None:
    """torch.profiler over one call of `fn` (warm: its graphs are captured): operators by CUDA time, then by
    CPU time (what the host does between graph replays), written to logs/`name` and printed."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    text = (f"# python benchmarks/image_generation.py --profile {name}: one generation of {n} images, guidance "
            f"{guidance} ({2 * n} rows), graphed, bf16 state\n## by CUDA time\n"
            + averages.table(sort_by="self_cuda_time_total", row_limit=rows, max_name_column_width=60)
            + "\n## by CPU time\n"
            + averages.table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=60))
    print(text)
    gc.write_log(name, text)


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--systems", nargs="+", default=["omnimamba", "omnimamba-eager", "omnimamba-fp32-state",
                                                     "llama-stock", "llama-static-compile"])
    ap.add_argument("--profile", metavar="FILE", help="profile one graphed omnimamba generation into logs/FILE")
    args = ap.parse_args()
    info = gc.device_info()
    bandwidth = gc.copy_bandwidth()
    n = args.images
    rows = []

    def record(row: dict, fn) -> None:
        try:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            row.update(fn())
            row["peak_GiB"] = gc.gib(torch.cuda.max_memory_allocated())
        except Exception as e:  # noqa: BLE001 - a failure is a result too
            row["note"] = gc.failure(e)
        rows.append(row)
        gc.print_table([row], COLUMNS)

    if any(s.startswith("omnimamba") for s in args.systems):
        model = build_omnimamba()
        cfg, sp = model.config, model.config.special
        tokens = cfg.image_tokens
        # "A Picture": the 1.3B preset has no tokenizer here, so two fixed caption ids stand for it.
        prefix = torch.tensor([[sp.t2i, sp.sot, 317, 17221, sp.eot, sp.soi]] * n, device="cuda")
        mask = torch.ones_like(prefix)
        caption = torch.zeros_like(prefix, dtype=torch.bool)
        caption[:, 2:4] = True
        weights = gc.param_bytes(model.backbone.layers) + model.image_head.weight.nbytes
        for system, graph, state in (("omnimamba", True, "auto"), ("omnimamba-eager", False, "auto"),
                                     ("omnimamba-fp32-state", True, None)):
            if system not in args.systems:
                continue
            model.decode_state_dtype = state

            def codes_only(graph=graph):
                return model.generate_image_codes(prefix, mask, caption, guidance_scale=args.guidance,
                                                  temperature=1.0, seed=0, use_cuda_graph=graph)

            def images(graph=graph):
                return model.vq.decode(codes_only(graph))

            def measure(graph=graph):
                # two warm-up calls: the step's graph is captured in the first, the recurring prefill's in the second
                codes_s, codes = gc.median_seconds(codes_only, args.repeat, warmup=2)
                total_s, pixels = gc.median_seconds(images, args.repeat)
                assert codes.shape == (n, tokens) and pixels.shape[0] == n
                return {"seconds": total_s, "images_per_s": n / total_s, "codes_seconds": codes_s,
                        "ms_per_step": 1e3 * codes_s / tokens}

            cache = model.allocate_cache(2 * n)
            roofline = 1e3 * (weights + 2 * cache.nbytes) / bandwidth
            del cache
            record({"system": system, "images": n, "roofline_ms_per_step": roofline}, measure)
            if args.profile and system == "omnimamba":
                profile_generation(codes_only, args.profile, n, args.guidance)
        del model
        torch.cuda.empty_cache()

    if any(s.startswith("llama") for s in args.systems):
        from transformers import LogitsProcessorList

        llama = gc.llama_baseline(vocab_size=16384)
        tokens = 256
        ids = torch.randint(2, 16384, (2 * n, 6), device="cuda")
        weights = gc.param_bytes(llama) - llama.model.embed_tokens.weight.nbytes
        roofline = 1e3 * (weights + gc.kv_cache_bytes(6 + tokens // 2, batch=2 * n)) / bandwidth

        def generate(static: bool):
            kwargs = {"cache_implementation": "static"} if static else {}
            return llama.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                  min_new_tokens=tokens, do_sample=False,
                                  logits_processor=LogitsProcessorList([GuidanceMix(args.guidance)]), **kwargs)

        for system, static in (("llama-stock", False), ("llama-static-compile", True)):
            if system not in args.systems:
                continue

            def measure(static=static):
                seconds, out = gc.median_seconds(lambda: generate(static), args.repeat)
                made = out.size(1) - ids.size(1)
                if out.size(0) != 2 * n or made != tokens:
                    raise RuntimeError(f"generate returned {tuple(out.shape)}, not {2 * n} rows of {tokens} codes")
                return {"seconds": seconds, "images_per_s": n / seconds, "codes_seconds": seconds,
                        "ms_per_step": 1e3 * seconds / tokens}

            record({"system": system, "images": n, "roofline_ms_per_step": roofline,
                    "note": "codes only (no pixel decoder)"}, measure)

    print()
    gc.print_table(rows, COLUMNS)
    path = gc.write_json("image_generation" if n == 16 else f"image_generation_{n}", {
        "benchmark": f"{n} images at 256 px (256 tokens) with classifier-free guidance ({2 * n} rows), bf16",
        "weights": gc.RANDOM_WEIGHTS, "guidance_scale": args.guidance, "copy_bandwidth_TBps": bandwidth / 1e12,
        **info, "rows": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
