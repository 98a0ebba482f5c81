"""Load test of `omnimamba serve`: chat requests/s and latency percentiles at several numbers of concurrent
clients, for the continuous batcher against the same server answering one request at a time (--max-batch 1).

Loopback only and bounded: each server is started here on a free 127.0.0.1 port, receives a fixed number of
requests per concurrency level, and is stopped. Every request of a level asks for the same number of tokens
(greedy; a random-weight model rarely says [EOT], so the work per request is the same in both servers); each
server first answers an untimed round of requests, as many at once as it will batch (kernel compilation and
other first-call costs). A non-200 answer or a lost request is counted, not hidden. Prints a table, writes JSON.

    python benchmarks/serve_load.py [--model DIR] [--clients 1 8 32 64] [--max-tokens 16] [--out FILE]
    python benchmarks/serve_load.py --preset omnimamba-1.3b --dtype bfloat16 --device cuda \
        --out benchmarks/results/serve_load_gpu.json         # the paper's shape, random weights, on a GPU

Without --model the model has random weights (speed does not depend on them); a preset other than Shapes' gets
a word-level stand-in tokenizer of its text vocabulary's size ("w0", "w1", ...).
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


def random_model(folder: Path, name: str, dtype: str, device: str) -> Path:
    import torch

    from omnimamba.model import OmniMamba, preset
    from omnimamba.tokenizer import TextTokenizer

    torch.manual_seed(0)
    config = preset(name)
    if name.startswith("shapes"):
        tokenizer = TextTokenizer.shapes()
    else:  # [PAD], [UNK] and words up to the text vocabulary's base size
        tokenizer = TextTokenizer.word_level(f"w{i}" for i in range(config.text_base_vocab_size - 2))
    with torch.device(device):
        model = OmniMamba(config, backend="reference")
    model.to(getattr(torch, dtype)).save_pretrained(folder, tokenizer=tokenizer)
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


def serve(model: Path, port: int, max_batch: int, device: str, dtype: str, start_timeout: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "omnimamba.cli", "serve", "--model", str(model), "--port", str(port),
                             "--max-batch", str(max_batch), "--device", device, "--dtype", dtype],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    import httpx

    deadline = time.monotonic() + start_timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {proc.stderr.read().decode()[-2000:]}")
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"the server did not answer /health within {start_timeout:.0f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="model folder (default: --preset with random weights, made here)")
    ap.add_argument("--preset", default="shapes-tiny", help="the random model's preset (default: shapes-tiny)")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the served weights' dtype")
    ap.add_argument("--start-timeout", type=float, default=600, help="seconds a server may take to start")
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32, 64])
    ap.add_argument("--requests", type=int, default=0, help="requests per level (default: 2 x clients, at least 48)")
    ap.add_argument("--max-tokens", type=int, nargs="+", default=[16], help="answer lengths, each run at every level")
    ap.add_argument("--max-batch", type=int, default=64, help="the continuous batcher's rows")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="benchmarks/results/serve_load.json")
    args = ap.parse_args()

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else random_model(Path(tmp) / "model", args.preset, args.dtype,
                                                                  args.device)
        rows = []
        for system, max_batch in (("one at a time", 1), ("continuous batching", args.max_batch)):
            port = free_port()
            proc = serve(model, port, max_batch, args.device, args.dtype, args.start_timeout)
            try:
                # warm-up, not counted: first-call kernel compilation at the batch sizes the levels reach
                warm = min(max_batch, max(args.clients))
                asyncio.run(level(port, warm, max(2, warm), args.max_tokens[0]))
                for tokens in args.max_tokens:
                    for c in args.clients:
                        n = args.requests or max(48, 2 * c)
                        r = {"system": system, "max_batch": max_batch, "max_tokens": tokens,
                             **asyncio.run(level(port, c, n, tokens))}
                        rows.append(r)
                        print(f"{system:<20} tokens {tokens:>3} clients {c:>3}: {r['requests_per_s']:7.2f} req/s  "
                              f"{r['tokens_per_s']:8.1f} tok/s  p50 {r['p50_s']:.3f} s  p99 {r['p99_s']:.3f} s  "
                              f"ok {r['ok']}/{n}  errors {r['errors']}  lost {r['lost']}", flush=True)
            finally:
                proc.terminate()
                proc.wait(timeout=30)
    base = {(r["max_tokens"], r["clients"]): r for r in rows if r["max_batch"] == 1}
    print("\n| tokens | clients | one at a time req/s | continuous req/s | speed-up | p50 s (one / cont.) | "
          "p99 s (one / cont.) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        if r["max_batch"] != 1:
            b = base[r["max_tokens"], r["clients"]]
            r["speedup"] = r["requests_per_s"] / b["requests_per_s"]
            print(f"| {r['max_tokens']} | {r['clients']} | {b['requests_per_s']:.2f} | {r['requests_per_s']:.2f} | "
                  f"{r['speedup']:.2f}x | {b['p50_s']:.3f} / {r['p50_s']:.3f} | {b['p99_s']:.3f} / {r['p99_s']:.3f} |")
    where = (torch.cuda.get_device_name() if args.device.startswith("cuda")
             else f"{torch.get_num_threads()} torch threads")
    info = {"benchmark": "omnimamba serve, chat completions over loopback",
            "model": args.model or f"{args.preset}, random weights", "dtype": args.dtype,
            "device": args.device,
            "machine": f"{platform.machine()}, {where}, python {platform.python_version()}, torch {torch.__version__}",
            "command": "python benchmarks/serve_load.py " + " ".join(sys.argv[1:]), "rows": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(info, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
