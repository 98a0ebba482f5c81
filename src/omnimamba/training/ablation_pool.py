"""Ablation runs in parallel: each (variant, seed) in its own process, spread over the visible GPUs.

`run_in_processes` starts `python -m omnimamba.training.ablation SPEC.json` for each run spec (the run's config and
scoring settings, written into its folder), at most `jobs` at once, each pinned to the least busy GPU with an equal
share of the CPU threads, and collects each run's score.json. What an ablation is (its variants, how a run is
trained and scored) lives in `ablation.py`.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from ..errors import UserError
from ..fileio import read_json


def _visible_gpus() -> list[str]:
    import torch

    if not torch.cuda.is_available():
        return []
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    ids = [d.strip() for d in visible.split(",") if d.strip()] if visible else []
    return ids[:torch.cuda.device_count()] or [str(i) for i in range(torch.cuda.device_count())]


def _progress(spec: dict) -> str:
    """Where a running run is, from the last line of its metrics log: 'stage2-unified step 120/300' (the
    metrics are written every run.log_every steps), 'scoring' once training is done, 'starting' before."""
    path = Path(spec["config"]["run"]["out"]) / "metrics.jsonl"
    try:
        lines = path.read_text().strip().splitlines()[-2:]
    except OSError:
        return "starting"
    last = None
    for line in reversed(lines):  # the last line may be half written
        try:
            last = json.loads(line)
            break
        except ValueError:
            continue
    if last is None:
        return "starting"
    stages = {st["name"]: st["steps"] for st in spec["config"].get("stages", [])}
    if last.get("stage") not in stages:  # the tokenizer's records, or none of a stage yet
        return "starting"
    names = list(stages)
    if last["stage"] == names[-1] and last.get("step", 0) + 1 >= stages[names[-1]]:
        return "scoring"
    return f"{last['stage']} step {last.get('step', 0) + 1}/{stages[last['stage']]}"


def run_in_processes(todo: list[dict], jobs: int, log, describe, status_every: float = 60.0) -> dict:
    """Train and score each spec in its own process (`python -m omnimamba.training.ablation SPEC`), `jobs` at
    once, each pinned to the least busy visible GPU (none on a CPU-only machine) and given an equal share of
    the CPU threads. A run that runs out of GPU memory while others share its GPU is put back in the queue, and
    that GPU then takes no more runs at once than it held beside it. Any other failure is reported with its log;
    the others go on, and the ablation then stops with the list (finished runs keep their score.json, so the
    same command retries only the failed ones). Every `status_every` seconds it logs where each running run is."""
    import subprocess

    gpus = _visible_gpus()
    threads = str(max(1, (os.cpu_count() or 1) // jobs))
    pending, running, records, failed = list(todo), [], {}, []
    busy = {g: 0 for g in gpus}
    cap = {g: jobs for g in gpus}  # runs at once per GPU, lowered when one runs out of memory beside others
    started = last_status = time.perf_counter()
    while pending or running:
        if running and time.perf_counter() - last_status >= status_every:  # a sign of life between ends of runs
            last_status = time.perf_counter()
            log(f"[{last_status - started:.0f} s] " + "; ".join(f"{spec['variant']} seed {spec['seed']}: "
                                                                 f"{_progress(spec)}" for _, spec, _, _ in running))
        while pending and len(running) < jobs and (not gpus or any(busy[g] < cap[g] for g in gpus)):
            spec = pending.pop(0)
            run_dir = Path(spec["config"]["run"]["out"])
            run_dir.mkdir(parents=True, exist_ok=True)
            spec_path, log_path = run_dir / "ablation_run.json", run_dir / "ablation_run.log"
            spec_path.write_text(json.dumps(spec, indent=1))
            env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", threads)}
            gpu = min((g for g in gpus if busy[g] < cap[g]), key=busy.get) if gpus else None
            if gpu is not None:
                env["CUDA_VISIBLE_DEVICES"] = gpu
                busy[gpu] += 1
            with open(log_path, "w") as f:
                proc = subprocess.Popen([sys.executable, "-m", "omnimamba.training.ablation", str(spec_path)],
                                        stdout=f, stderr=subprocess.STDOUT, env=env)
            running.append((proc, spec, gpu, log_path))
            where = f"GPU {gpu}" if gpu is not None else "CPU"
            log(f"started {spec['variant']} seed {spec['seed']} on {where} (log: {log_path})")
        time.sleep(1.0)
        for item in [r for r in running if r[0].poll() is not None]:
            proc, spec, gpu, log_path = item
            running.remove(item)
            if gpu is not None:
                busy[gpu] -= 1
            name, elapsed = f"{spec['variant']} seed {spec['seed']}", time.perf_counter() - started
            score_path = Path(spec["config"]["run"]["out"]) / "score.json"
            if proc.returncode != 0 and gpu is not None and busy[gpu] > 0 and _out_of_gpu_memory(log_path):
                cap[gpu] = min(cap[gpu], busy[gpu])
                pending.insert(0, spec)
                log(f"[{elapsed:.0f} s] {name}: ran out of GPU memory beside {busy[gpu]} other run(s) on GPU {gpu}; "
                    f"it starts again when one of them ends (at most {cap[gpu]} at once on that GPU from now on)")
                continue
            head = f"[{len(todo) - len(pending) - len(running)}/{len(todo)}, {elapsed:.0f} s] {name}"
            if proc.returncode == 0 and score_path.is_file():
                rec = read_json(score_path, "ablation score")
                records[(spec["variant"], spec["seed"])] = rec
                log(f"{head}: {describe(rec)}")
            else:
                tail = log_path.read_text(errors="replace").strip().splitlines()[-5:]
                log(f"{head}: FAILED (exit {proc.returncode}); the end of {log_path}:\n    " + "\n    ".join(tail))
                failed.append(f"{spec['variant']} seed {spec['seed']} ({log_path})")
    if failed:
        raise UserError(f"ablate: {len(failed)} run(s) failed: {'; '.join(failed)}. The finished runs are kept; "
                        "the same command retries only the failed ones")
    return records


def _out_of_gpu_memory(log_path: Path) -> bool:
    """Whether a run's log ends in a CUDA allocation failure (PyTorch's, or cuBLAS failing to make a handle)."""
    tail = log_path.read_text(errors="replace")[-20000:]
    return "CUDA out of memory" in tail or "CUBLAS_STATUS_ALLOC_FAILED" in tail
