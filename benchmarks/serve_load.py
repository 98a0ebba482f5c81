"""Load test of `omnimamba serve`: chat requests/s and latency percentiles at several numbers of concurrent
clients, for the continuous batcher against the same server answering one request at a time (--max-batch 1).

Loopback only and bounded: each server is started here on a free 127.0.0.1 port, receives a fixed number of
requests per concurrency level, and is stopped. Every request asks for the same number of tokens (greedy; a
random-weight model rarely says [EOT], so the work per request is the same in both servers); a non-200 answer
or a lost request is counted, not hidden. Prints a table, writes JSON.

    python benchmarks/serve_load.py [--model DIR] [--clients 1 8 32 64] [--max-tokens 16] [--out FILE]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_model(folder: Path) -> Path:
    import torch

    from omnimamba.model import OmniMamba, preset
    from omnimamba.tokenizer import TextTokenizer

    torch.manual_seed(0)
    OmniMamba(preset("shapes-tiny"), backend="reference").save_pretrained(folder, tokenizer=TextTokenizer.shapes())
    return folder


def body(k: int, max_tokens: int) -> dict:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(k).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    return {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                                       {"type": "text", "text": "how many circles are there?"}]}],
            "max_tokens": max_tokens, "temperature": 0}


async def level(port: int, clients: int, n_requests: int, max_tokens: int) -> dict:
    import httpx

    bodies = [body(k, max_tokens) for k in range(n_requests)]
    todo = asyncio.Queue()
    for b in bodies:
        todo.put_nowait(b)
    latencies, statuses, tokens = [], [], 0

    async def client(http):
        nonlocal tokens
        while not todo.empty():
            b = todo.get_nowait()
            t0 = time.perf_counter()
            r = await http.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=b)
            latencies.append(time.perf_counter() - t0)
            statuses.append(r.status_code)
            if r.status_code == 200:
                tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    lat = sorted(latencies)
    return {"clients": clients, "requests": n_requests, "ok": statuses.count(200),
            "errors": len(statuses) - statuses.count(200), "lost": n_requests - len(statuses),
            "wall_s": wall, "requests_per_s": len(statuses) / wall, "tokens_per_s": tokens / wall,
            "p50_s": statistics.median(lat), "p99_s": lat[min(len(lat) - 1, int(0.99 * len(lat)))]}


def serve(model: Path, port: int, max_batch: int, device: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "omnimamba.cli", "serve", "--model", str(model), "--port", str(port),
                             "--max-batch", str(max_batch), "--device", device],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import httpx

    for _ in range(600):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not answer /health within 120 s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: shapes-tiny with random weights, made here)")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--requests", type=int, default=0, help="requests per level (default: 2 x clients, at least 16)")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--max-batch", type=int, default=64, help="the continuous batcher's rows")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = ap.parse_args()

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else random_model(Path(tmp) / "model")
        rows = []
        for system, max_batch in (("one at a time", 1), ("continuous batching", args.max_batch)):
            port = free_port()
            proc = serve(model, port, max_batch, args.device)
            try:
                for c in args.clients:
                    n = args.requests or max(16, 2 * c)
                    r = {"system": system, "max_batch": max_batch, **asyncio.run(level(port, c, n, args.max_tokens))}
                    rows.append(r)
                    print(f"{system:<20} clients {c:>3}: {r['requests_per_s']:7.2f} req/s  {r['tokens_per_s']:8.1f} tok/s  "
                          f"p50 {r['p50_s']:.3f} s  p99 {r['p99_s']:.3f} s  ok {r['ok']}/{n}  errors {r['errors']}  "
                          f"lost {r['lost']}", flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    base = {r["clients"]: r for r in rows if r["max_batch"] == 1}
    print("\n| clients | one at a time req/s | continuous req/s | speed-up | p50 s (one / cont.) | p99 s (one / cont.) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["max_batch"] != 1:
            b = base[r["clients"]]
            r["speedup"] = r["requests_per_s"] / b["requests_per_s"]
            print(f"| {r['clients']} | {b['requests_per_s']:.2f} | {r['requests_per_s']:.2f} | {r['speedup']:.2f}x | "
                  f"{b['p50_s']:.3f} / {r['p50_s']:.3f} | {b['p99_s']:.3f} / {r['p99_s']:.3f} |")
    info = {"benchmark": "omnimamba serve, chat completions over loopback", "model": args.model or "shapes-tiny, random weights",
            "max_tokens": args.max_tokens, "device": args.device,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} torch threads, python {platform.python_version()}, torch {torch.__version__}",
            "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(info, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
