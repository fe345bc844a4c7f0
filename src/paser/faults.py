"""A test hook that kills the process at a named point, so kill-and-resume tests need no timing luck.

With ``PASER_KILL_AT=NAME:N`` in the environment, the N-th call of :func:`reached` with ``NAME`` sends
SIGKILL to this process (no cleanup, no ``finally``: what a crash or an out-of-memory kill does).
Stages call it right after they persist progress (``score.saved``, ``embed.saved``, ``recover.saved``,
``evaluate.saved``, ``run.stage_done``). Unset, a call costs one environment lookup.
"""

from __future__ import annotations

import os
import signal

_counts: dict[str, int] = {}


def reached(name: str) -> None:
    spec = os.environ.get("PASER_KILL_AT")
    if not spec:
        return
    target, _, nth = spec.rpartition(":")
    if target != name:
        return
    _counts[name] = _counts.get(name, 0) + 1
    if _counts[name] >= int(nth):
        os.kill(os.getpid(), signal.SIGKILL)
