"""Process-wide settings: how many CPU threads torch may use, and a warning when the CPUs are busy.

Two torch jobs on the same cores oversubscribe them (each runs one OpenMP thread per core) and slow each
other far more than 2x: measured in this project, scoring fell from 180 to 50 tokens/s on 2 cores.
"""

from __future__ import annotations

import logging
import os

import psutil
import torch

from .errors import ConfigError

log = logging.getLogger(__name__)

BUSY_FRACTION = 0.75  # other processes using this share of our CPUs means another heavy job


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), not the machine's total."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def configure_threads(threads: int | None = None, warn_if_busy: bool = True) -> int:
    """Set torch's intra-op threads to ``threads`` (default: :func:`available_cpus`, shared out among the
    processes a launcher started on this machine); returns the number.

    Warns when other processes already keep these CPUs busy (not under a launcher: there the other
    processes are this job's own ranks).
    """

    cpus = available_cpus()
    if threads is not None and threads < 1:
        raise ConfigError(f"threads must be at least 1, not {threads}")
    local_processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    threads = threads or max(1, cpus // local_processes)
    torch.set_num_threads(threads)
    if warn_if_busy and local_processes == 1:
        busy = busy_cpus()
        if busy >= max(1.0, BUSY_FRACTION * cpus):
            log.warning("other processes are using %.1f of %d CPU(s): another heavy job seems to be running; "
                        "two torch jobs on the same cores slow each other far more than 2x (run one at a time, "
                        "or split the cores with --threads)", busy, cpus)
    return threads


def busy_cpus(interval: float = 0.25) -> float:
    """CPUs' worth of work that *other* processes do right now (sampled over ``interval`` seconds).

    A direct sample, not the load average: the 1-minute load average still counts a job that has just
    finished, and would warn about it.
    """

    me = psutil.Process()
    mine = me.cpu_times()
    total = psutil.cpu_percent(interval=interval) / 100 * psutil.cpu_count()
    spent = sum(me.cpu_times()[:2]) - sum(mine[:2])
    return max(0.0, total - spent / interval)
