"""Shared by the serving tests on the CPU and the GPU."""

import threading


def submit_concurrently(batcher, requests) -> list[list[int]]:
    """Submit every request from its own thread at once; each request's generated token ids, in order."""
    threads = [threading.Thread(target=batcher.submit, args=(r,)) for r in requests]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return [list(r) for r in requests]
