"""Fault injection for the crash tests: OMNIMAMBA_FAILPOINT="SITE:N" makes the process die at once (as a
SIGKILL would: no cleanup, no flushing) the N-th time it reaches `point(SITE)`. Unset, a point costs one dict
lookup."""

from __future__ import annotations

import os

_hits: dict[str, int] = {}


def _target() -> tuple[str, int] | None:
    spec = os.environ.get("OMNIMAMBA_FAILPOINT")
    if not spec:
        return None
    site, _, n = spec.partition(":")
    return site, int(n or 1)


def point(site: str) -> None:
    target = _target()
    if target is None or target[0] != site:
        return
    _hits[site] = _hits.get(site, 0) + 1
    if _hits[site] == target[1]:
        os._exit(137)
