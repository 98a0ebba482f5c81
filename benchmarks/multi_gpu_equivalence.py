"""Two GPUs train as one: the same global batch on 1 process and on 2 (DDP, FSDP2) gives the same losses, and a
checkpoint written by 2 processes resumes on 1 (and back), through `omnimamba train` as a user runs it.

    python benchmarks/multi_gpu_equivalence.py [--preset shapes-small] [--steps 50] [--batch 64]
    python benchmarks/multi_gpu_equivalence.py --smoke      # a CPU rehearsal (gloo, shapes-tiny, 6 steps)

Every run trains stage 2 (both tasks) for --steps steps at --batch MMU + --batch T2I sequences per step (global),
from the same initial weights, tokenizer and data order, logging every step's loss; the 2-process runs go through
`torchrun --nproc-per-node 2` (NCCL on GPUs). What "the same" means under bf16 autocast is measured, not assumed:
`one-micro` is the 1-process run again with gradient accumulation over two halves (the same mathematics, another
order of floating-point sums), and every comparison is printed next to it. The resumed runs copy one checkpoint
from halfway (and the code cache) into a fresh folder and continue it with `--resume` on the other process count.
Writes a table and multi_gpu_equivalence.json (to benchmarks/results, or --out-json).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def base_config(a) -> dict:
    stage = {"name": "stage2-unified", "steps": a.steps, "lr": 1e-3, "warmup": 5, "batch": [a.batch, a.batch]}
    return {
        "model": {"preset": a.preset},
        "data": {"source": "shapes", "shapes": {"seed": 0, "image_size": 64, "train_images": a.train_images}},
        "vq_train": {"steps": 0},
        "stages": [stage],
        "run": {"seed": 0, "log_every": 1, "ckpt_every": a.steps // 2, "eval_images": 0, "eval_prompts": 0,
                "tensorboard": False, "progress": False, "backend": a.backend,
                **({"device": "cpu"} if a.smoke else {})},
    }


def train(a, name: str, procs: int = 1, resume: bool = False, config: str = "config.yaml", **sets) -> dict:
    """One `omnimamba train` run of <out>/<config> into <out>/<name>, its output in <out>/<name>.log; returns its
    exit status and wall time (and prints the log's tail on failure)."""
    out = a.out / name
    # torchrun, as this interpreter's module (no PATH lookup)
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs),
            "--master-port", str(29500 + sum(map(ord, name)) % 400)]
           if procs > 1 else [sys.executable]) + ["-m", "omnimamba.cli", "train", "--config", str(a.out / config),
                                                  "--set", f"run.out={out}"]
    for k, v in sets.items():
        cmd += ["--set", f"{k.replace('__', '.')}={v}"]
    if resume:
        cmd.append("--resume")
    t0 = time.time()
    with open(a.out / f"{name}.log", "w") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}:{os.environ.get('PYTHONPATH', '')}"}).returncode
    took = time.time() - t0
    print(f"{name}: rc {rc}, {took:.0f} s ({' '.join(cmd[-6:])})", flush=True)
    if rc:
        print((a.out / f"{name}.log").read_text()[-3000:], flush=True)
    return {"rc": rc, "seconds": round(took, 1), "processes": procs, "command": " ".join(cmd)}


def losses(a, name: str) -> dict[int, float]:
    path = a.out / name / "metrics.jsonl"
    rows = [json.loads(l) for l in path.read_text().splitlines()] if path.is_file() else []
    return {r["step"]: r["loss"] for r in rows if r.get("stage") == "stage2-unified" and "loss" in r}


def final_weights(a, name: str):
    from safetensors.torch import load_file

    path = a.out / name / "stage2-unified" / "model.safetensors"
    return load_file(str(path)) if path.is_file() else None


def compare(a, name: str, ref: str, from_step: int = 0) -> dict:
    """Per-step loss differences (relative) and the final weights' relative distance, of `name` against `ref`."""
    x, y = losses(a, name), losses(a, ref)
    steps = [s for s in sorted(y) if s >= from_step and s in x]
    row = {"run": name, "reference": ref, "steps_compared": len(steps), "steps_expected": a.steps - from_step}
    if steps:
        rel = [abs(x[s] - y[s]) / abs(y[s]) for s in steps]
        row.update(max_rel_loss_diff=max(rel), mean_rel_loss_diff=sum(rel) / len(rel),
                   final_loss=x[steps[-1]], reference_final_loss=y[steps[-1]])
    wx, wy = final_weights(a, name), final_weights(a, ref)
    if wx is not None and wy is not None:
        num = sum(float((wx[k].double() - wy[k].double()).pow(2).sum()) for k in wy if wy[k].is_floating_point())
        den = sum(float(wy[k].double().pow(2).sum()) for k in wy if wy[k].is_floating_point())
        row["weights_rel_distance"] = math.sqrt(num / den)
    return row


def resume_from(a, src: str, dst: str) -> None:
    """<dst>: <src>'s checkpoint from halfway alone (and the code cache), as a run stopped there leaves it."""
    root = a.out / src / "checkpoints"
    half = [c for c in sorted(root.iterdir()) if (c / "state.json").is_file()
            and json.loads((c / "state.json").read_text())["step"] == a.steps // 2 - 1]
    if not half:
        raise SystemExit(f"{root}: no checkpoint after step {a.steps // 2 - 1} (found {sorted(p.name for p in root.iterdir())})")
    (a.out / dst / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copytree(half[0], a.out / dst / "checkpoints" / half[0].name)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="shapes-small")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--batch", type=int, default=64, help="MMU and T2I sequences per step each, global")
    p.add_argument("--train-images", type=int, default=4096)
    p.add_argument("--backend", default="reference", help="run.backend (reference: nothing to compile)")
    p.add_argument("--out", type=Path, default=Path("runs/multi-gpu-equivalence"))
    p.add_argument("--out-json", type=Path, default=ROOT / "benchmarks/results/multi_gpu_equivalence.json")
    p.add_argument("--fp32", action="store_true", help="also 1 vs 2 processes in float32")
    p.add_argument("--smoke", action="store_true", help="CPU rehearsal: shapes-tiny, 6 steps, batch 4")
    a = p.parse_args()
    if a.smoke:
        a.preset, a.steps, a.batch, a.train_images = "shapes-tiny", 6, 4, 64
    if a.steps < 4 or a.steps % 2:
        raise SystemExit("--steps must be even and >= 4 (the resumed runs start halfway)")
    shutil.rmtree(a.out, ignore_errors=True)
    a.out.mkdir(parents=True)
    cfg = base_config(a)
    # the tokenizer and the code cache, made once and read by every run (so no run trains or encodes anything else)
    prep = json.loads(json.dumps(cfg))
    prep["vq_train"] = {"steps": 20, "lr": 3e-3, "batch": 8}
    prep["stages"][0].update(steps=1, batch=[2, 2])
    (a.out / "prep.yaml").write_text(yaml.safe_dump(prep))
    if train(a, "prep", config="prep.yaml")["rc"]:
        raise SystemExit(f"preparing the tokenizer and code cache failed: {a.out / 'prep.log'}")
    cfg["model"]["vq"] = str((a.out / "prep" / "vq").resolve())
    cfg["data"]["codes_cache"] = str((a.out / "prep" / "codes.safetensors").resolve())
    (a.out / "config.yaml").write_text(yaml.safe_dump(cfg))

    runs = {"one": train(a, "one"), "ddp": train(a, "ddp", 2, run__strategy="ddp"),
            "fsdp": train(a, "fsdp", 2, run__strategy="fsdp"),
            "one-micro": train(a, "one-micro", run__micro_batch=max(1, a.batch // 2))}
    resume_from(a, "fsdp", "fsdp-then-one")
    runs["fsdp-then-one"] = train(a, "fsdp-then-one", resume=True)
    resume_from(a, "one", "one-then-fsdp")
    runs["one-then-fsdp"] = train(a, "one-then-fsdp", 2, resume=True, run__strategy="fsdp")
    rows = [compare(a, "one-micro", "one"), compare(a, "ddp", "one"), compare(a, "fsdp", "one"),
            compare(a, "fsdp-then-one", "fsdp", a.steps // 2), compare(a, "one-then-fsdp", "one", a.steps // 2)]
    if a.fp32:
        runs["one-fp32"] = train(a, "one-fp32", run__precision="fp32")
        runs["ddp-fp32"] = train(a, "ddp-fp32", 2, run__strategy="ddp", run__precision="fp32")
        runs["fsdp-fp32"] = train(a, "fsdp-fp32", 2, run__strategy="fsdp", run__precision="fp32")
        rows += [compare(a, "ddp-fp32", "one-fp32"), compare(a, "fsdp-fp32", "one-fp32")]

    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not a.smoke else "CPU (gloo)"
    print(f"\n{a.preset}, stage 2, {a.steps} steps at {a.batch}:{a.batch} (global), {device}, torch {torch.__version__}")
    print("| run | against | steps | max rel. loss diff | mean rel. loss diff | final loss (ref.) | weights rel. distance |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if "max_rel_loss_diff" not in r:
            print(f"| {r['run']} | {r['reference']} | {r['steps_compared']}/{r['steps_expected']} | - | - | - | - |")
            continue
        w = f"{r['weights_rel_distance']:.2e}" if "weights_rel_distance" in r else "-"
        print(f"| {r['run']} | {r['reference']} | {r['steps_compared']}/{r['steps_expected']} | {r['max_rel_loss_diff']:.2e} "
              f"| {r['mean_rel_loss_diff']:.2e} | {r['final_loss']:.4f} ({r['reference_final_loss']:.4f}) | {w} |")
    report = {"command": "python benchmarks/multi_gpu_equivalence.py " + " ".join(sys.argv[1:]), "seed": 0,
              "device": device, "torch": torch.__version__, "preset": a.preset, "steps": a.steps,
              "batch": [a.batch, a.batch], "backend": a.backend, "runs": runs, "comparisons": rows,
              "losses": {n: losses(a, n) for n in runs}}
    a.out_json.parent.mkdir(parents=True, exist_ok=True)
    a.out_json.write_text(json.dumps(report, indent=1))
    print(f"wrote {a.out_json}")
    ok = all(r["rc"] == 0 for r in runs.values()) and all(r["steps_compared"] == r["steps_expected"] for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
