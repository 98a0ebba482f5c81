"""Where a `shapes-small` stage-2 training step's time goes (configs/shapes-gpu.yaml), as `omnimamba train` runs it:
the first steps (compiling), each step's forward + backward and optimizer step timed apart, steady-state steps as
the trainer runs them, the step at 2x and 4x the batch, and a torch.profiler table of three steps (CPU time
against GPU time: a step whose CPU time exceeds its GPU time is bound by launching kernels).

    python benchmarks/training_step_small.py [--steps 12] [--images 4096] [--set KEY=VALUE ...] [--scales 1 1 2 4]
        [--no-profile] [--name training_step_small]

A short tokenizer (30 steps) and 4,096 training images keep the set-up short; they do not change the step's
shapes. Writes benchmarks/results/NAME.json and logs/training_profile_shapes_small.txt (or under
$OUT when set). The measurements in benchmarks/results/logs/training_step_shapes_small_h200.log were taken with the
script this one was made from (which also compared building batches on a second thread, since dropped).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from omnimamba.training.config import load_train_config
from omnimamba.training.loop import Trainer
from omnimamba.training.stages import apply_freeze_plan

RESULTS = Path(os.environ.get("OUT") or Path(__file__).resolve().parent / "results")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn):
    sync()
    t = time.perf_counter()
    out = fn()
    sync()
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12, help="steps timed one by one (the first ones compile)")
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a config override")
    ap.add_argument("--scales", type=int, nargs="+", default=[1, 1, 2, 4],
                    help="batch multiples timed in steady state, 8 steps each")
    ap.add_argument("--no-profile", action="store_true", help="skip the profiled steps")
    ap.add_argument("--name", default="training_step_small", help="the JSON's name under results/")
    a = ap.parse_args()
    sets = ["run.out=/tmp/training_step_small", "vq_train.steps=30", f"data.shapes.train_images={a.images}",
            "run.progress=false", *a.set]
    cfg = load_train_config("configs/shapes-gpu.yaml", sets)
    tr = Trainer(cfg, log=print)
    tr.out.mkdir(parents=True, exist_ok=True)
    tr.prepare_vq()
    tr.prepare_data()
    stage = cfg.stages[-1]
    apply_freeze_plan(tr.model, stage.name, False)
    tr.model.train()
    tr.model.vq.eval()
    tr.model.understanding.eval()
    opt = tr._optimizer(tr.model)
    params = [p for p in tr.model.parameters() if p.requires_grad]

    def optimizer_step():
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    res = {"sets": sets, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", "steps": []}
    for step in range(a.steps):
        (_, tokens), fb = timed(lambda: tr._forward_backward(tr.model, step, stage))
        _, o = timed(optimizer_step)
        res["steps"].append({"step": step, "forward_backward_s": fb, "optimizer_s": o, "positions": tokens})
        print(f"step {step}: forward + backward {fb * 1e3:.1f} ms, optimizer {o * 1e3:.1f} ms, {tokens} positions",
              flush=True)
    first, tokens_x1 = a.steps, None
    for scale in a.scales:
        big = dataclasses.replace(stage, batch=(stage.batch[0] * scale, stage.batch[1] * scale))
        for step in range(first, first + 2):  # a new batch size compiles first
            tr._forward_backward(tr.model, step, big)
            optimizer_step()
        sync()
        t = time.perf_counter()
        for step in range(first + 2, first + 10):
            _, tokens = tr._forward_backward(tr.model, step, big)
            optimizer_step()
        sync()
        dt = (time.perf_counter() - t) / 8
        first += 10
        res.setdefault(f"step_s_batch_x{scale}", []).append(dt)
        tokens_x1 = tokens if scale == 1 else tokens_x1
        peak = torch.cuda.max_memory_allocated() / 2 ** 30 if torch.cuda.is_available() else 0.0
        print(f"batch x{scale}: {dt * 1e3:.1f} ms per step, {tokens / dt:.0f} positions/s, peak {peak:.1f} GiB",
              flush=True)
    if tokens_x1:
        res["positions_per_s_x1"] = [tokens_x1 / t for t in res["step_s_batch_x1"]]
    if a.no_profile:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{a.name}.json").write_text(json.dumps(res, indent=1))
        return
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities) as prof:
        for step in range(first, first + 3):
            tr._forward_backward(tr.model, step, stage)
            optimizer_step()
        sync()
    sort = "self_cuda_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70)
    print(table)
    (RESULTS / "logs").mkdir(parents=True, exist_ok=True)
    (RESULTS / "logs" / "training_profile_shapes_small.txt").write_text(
        f"# python benchmarks/training_step_small.py {' '.join(a.set)}: 3 steps on {res['device']}\n{table}")
    (RESULTS / f"{a.name}.json").write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
