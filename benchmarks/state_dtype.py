"""Does decoding with a bfloat16 SSM state (model.decode_state_dtype) change what the model produces?

Two measurements, each against the float32 state in the same run:

1. A trained Shapes model (--model): MMU accuracy and the share of answers that are identical; T2I score with
   guidance over several sampling seeds (mean ± std: the noise a difference is read against) and the share of
   images that are identical.
2. The 1.3B shape (--drift-preset, random weights): a T2I prefix prefilled, then one whole image's codes fed
   back the same way to both states (the float32 run's greedy codes), comparing the image logits at every step:
   largest absolute difference over the logits' standard deviation, KL divergence, argmax agreement.

    python benchmarks/state_dtype.py --model runs/quickstart/stage2-unified [--drift-preset omnimamba-1.3b]

Prints tables and writes benchmarks/results/state_dtype.json (command, machine, seeds).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from omnimamba.training.ablation import machine  # the machine in words, as ablation records it

RESULTS = Path(__file__).resolve().parent / "results"
STATES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def shapes_model(path: str, n_images: int, n_prompts: int, seeds: list[int], guidance: float, temperature: float,
                 device: str, epsilon: float = 0.0) -> dict:
    from omnimamba.data.shapes import ShapesConfig, ShapesWorld
    from omnimamba.evaluation.shapes_eval import evaluate_mmu, evaluate_t2i
    from omnimamba.model import OmniMamba

    model = OmniMamba.from_pretrained(path).to(device).eval()
    tok = model.tokenizer
    world = ShapesWorld(ShapesConfig(image_size=model.config.understanding.image_size), seed=0)
    out, answers, images = {}, {}, {}
    for name, dtype in STATES.items():
        model.decode_state_dtype = dtype
        t0 = time.perf_counter()
        mmu, shown = evaluate_mmu(model, tok, world, "test", n_images)
        answers[name] = [row[3] for row in shown]
        scores, images[name] = [], []
        for seed in seeds:
            t2i, generated = evaluate_t2i(model, tok, world, "test", n_prompts, guidance_scale=guidance,
                                          temperature=temperature, seed=seed, epsilon=epsilon)
            scores.append(t2i["overall"])
            images[name] += [im for im, _ in generated]
        out[name] = {"mmu": mmu["accuracy"]["overall"], "t2i_per_seed": scores, "t2i_mean": statistics.mean(scores),
                     "t2i_std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
                     "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{name:>9} state: MMU {out[name]['mmu']:.1%}  T2I {out[name]['t2i_mean']:.1%} ± "
              f"{out[name]['t2i_std']:.1%} over seeds {seeds}", flush=True)
    model.decode_state_dtype = None
    out["answers_identical"] = float(np.mean([a == b for a, b in zip(answers["float32"], answers["bfloat16"])]))
    out["images_identical"] = float(np.mean([np.array_equal(a, b)
                                             for a, b in zip(images["float32"], images["bfloat16"])]))
    out["n_answers"], out["n_images"] = len(answers["float32"]), len(images["float32"])
    print(f"identical: {out['answers_identical']:.1%} of {out['n_answers']} answers, "
          f"{out['images_identical']:.1%} of {out['n_images']} images")
    return out


@torch.no_grad()
def logit_drift(preset_name: str, steps: int, device: str, seed: int) -> dict:
    """Image logits of one T2I generation under both states, fed the same codes (the float32 run's argmax)."""
    from omnimamba.model import OmniMamba, preset

    torch.manual_seed(seed)
    model = OmniMamba(preset(preset_name), backend="reference").to(device).eval()
    c = model.config
    route = "t2i" if c.task_lora else None
    g = torch.Generator().manual_seed(seed)
    n_caption = min(16, c.max_caption_tokens)
    caption = torch.randint(0, c.text_base_vocab_size, (1, n_caption), generator=g).to(device)
    s = c.special
    prefix = torch.cat([torch.tensor([[s.t2i, s.sot]], device=device), caption,
                        torch.tensor([[s.eot, s.soi]], device=device)], 1)
    mask = torch.ones_like(prefix)
    caption_mask = torch.zeros_like(prefix, dtype=torch.bool)
    caption_mask[:, 2:2 + n_caption] = True
    steps = min(steps, c.image_tokens)
    logits = {}
    codes = None
    for name, dtype in STATES.items():
        cache = model.allocate_cache(1, device, ssm_dtype=dtype)
        x = model.t2i_prefix_embeddings(prefix, mask, caption_mask, None)
        hidden = model.prefill(x, cache, mask, route)
        rows, chosen = [], []
        for i in range(steps):
            row = model.image_logits(hidden).float()
            rows.append(row[0].cpu())
            code = row.argmax(-1) if codes is None else codes[i:i + 1]
            chosen.append(code)
            pos = torch.full((1,), model.t2i_image_start + i, device=device)
            emb = model.embed_image_codes(code) + model.t2i_pos_embed[0][pos]
            hidden = model.backbone.step(emb, cache, task=route)
        logits[name] = torch.stack(rows)
        if codes is None:
            codes = torch.cat(chosen)
        print(f"{name:>9} state: {steps} image steps done", flush=True)
    a, b = logits["float32"], logits["bfloat16"]
    diff = (a - b).abs().max(-1).values / a.std(-1)
    kl = (a.log_softmax(-1).exp() * (a.log_softmax(-1) - b.log_softmax(-1))).sum(-1)
    agree = (a.argmax(-1) == b.argmax(-1)).float()
    marks = sorted({k for k in (1, 8, 32, 64, 128, 256, steps) if k <= steps})
    per = [{"step": k, "max_abs_diff_over_std": float(diff[k - 1]), "kl": float(kl[k - 1])} for k in marks]
    return {"preset": preset_name, "steps": steps, "seed": seed, "per_step": per,
            "max_abs_diff_over_std_max": float(diff.max()), "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "argmax_agreement": float(agree.mean())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a trained Shapes model folder (part 1)")
    ap.add_argument("--n-images", type=int, default=50, help="test images whose questions are answered")
    ap.add_argument("--n-prompts", type=int, default=48, help="test prompts per sampling seed")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds")
    ap.add_argument("--guidance", type=float, default=3.0)
    ap.add_argument("--temperature", type=float, default=1.0, help="image-code sampling temperature")
    ap.add_argument("--epsilon", type=float, default=0.0, help="floor on a sampled code's conditional probability "
                    "(run.eval_epsilon; configs/shapes-gpu.yaml uses 0.001)")
    ap.add_argument("--drift-preset", help="part 2 on this model preset, random weights (e.g. omnimamba-1.3b)")
    ap.add_argument("--drift-steps", type=int, default=256, help="image codes decoded (at most one image)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=str(RESULTS / "state_dtype.json"))
    args = ap.parse_args()
    result = {"command": "python " + " ".join(sys.argv), "machine": machine(), "seeds": args.seeds}
    if args.model:
        result["shapes_model"] = {"model": args.model, "n_images": args.n_images, "n_prompts": args.n_prompts,
                                  "guidance": args.guidance, "temperature": args.temperature, "epsilon": args.epsilon,
                                  **shapes_model(args.model, args.n_images, args.n_prompts, args.seeds,
                                                 args.guidance, args.temperature, args.device, args.epsilon)}
    if args.drift_preset:
        d = logit_drift(args.drift_preset, args.drift_steps, args.device, seed=args.seeds[0])
        result["logit_drift"] = d
        print(f"\n{d['preset']}, random weights: logits under a bfloat16 state against float32, one image")
        print(f"{'step':>6} {'max |diff| / std':>18} {'KL':>10}")
        for row in d["per_step"]:
            print(f"{row['step']:>6} {row['max_abs_diff_over_std']:>18.4f} {row['kl']:>10.2e}")
        print(f"argmax agreement {d['argmax_agreement']:.1%}; KL mean {d['kl_mean']:.2e}, max {d['kl_max']:.2e}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
