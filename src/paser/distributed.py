"""Several processes, one job: ``accelerate launch -m paser ...`` or ``torchrun --nproc-per-node N -m paser ...``.

accelerate's :class:`~accelerate.PartialState` reads the launcher's environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``) and sets up the process group: NCCL between GPUs, gloo between CPU processes.
Without a launcher every function here is a no-op: one process, rank 0, nothing to wait for.

Work is split by token count, not record count (:func:`shard_by_tokens`): a forward pass costs what its tokens
cost, so equal record counts would leave the rank with the long records running alone at the end.
"""

from __future__ import annotations

import contextlib
import heapq
import os
from collections.abc import Callable, Iterator, Sequence
from functools import cache
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .cache import entry_lock

# accelerate is imported only under a launcher.


def launched() -> bool:
    """Whether this process is one of several started by accelerate or torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@cache
def _state() -> Any:
    from accelerate import PartialState

    if not torch.cuda.is_available():
        # CPU processes under a launcher run on device "cpu:<rank>", and checkpoints tag their tensors so;
        # torch.load knows only "cpu", so resuming from a checkpoint would fail without this mapping.
        torch.serialization.register_package(11, lambda obj: None, _restore_indexed_cpu)  # (a free priority)
    return PartialState(cpu=not torch.cuda.is_available())


def _restore_indexed_cpu(obj: Any, location: str) -> Any:
    return obj if location.startswith("cpu:") else None


def rank() -> int:
    return _state().process_index if launched() else 0


def world_size() -> int:
    return _state().num_processes if launched() else 1


def is_main() -> bool:
    """Rank 0: the process that merges results and writes the outputs."""
    return rank() == 0


def barrier() -> None:
    if launched():
        _state().wait_for_everyone()


def shutdown(clean: bool = True) -> None:
    """Close the process group before the interpreter exits (after a last barrier when ``clean``): a gloo group
    left to interpreter teardown can abort a rank ("terminate called without an active exception") after all
    its work is done, failing a finished job. No-op without a launcher or before the group was set up."""
    if not launched() or _state.cache_info().currsize == 0:
        return

    if dist.is_initialized():
        if clean:
            barrier()
        dist.destroy_process_group()


def device() -> str | None:
    """Where this process's models go: its own GPU under a launcher, the GPU if there is one, else None (CPU)."""

    if launched():
        return str(_state().device)
    return "cuda" if torch.cuda.is_available() else None


def all_gather(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not launched():
        return [obj]

    _state()
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def shard_by_tokens(lengths: Sequence[int], shards: int) -> list[list[int]]:
    """Positions ``0..len(lengths)-1`` split into ``shards`` lists of nearly equal total length (longest first,
    each to the lightest shard; deterministic). Each list is in increasing order."""
    heap = [(0, r) for r in range(shards)]
    parts: list[list[int]] = [[] for _ in range(shards)]
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        load, r = heapq.heappop(heap)
        parts[r].append(i)
        heapq.heappush(heap, (load + lengths[i], r))
    return [sorted(p) for p in parts]


@contextlib.contextmanager
def group_lock(path: str | Path, what: str) -> Iterator[None]:
    """:func:`paser.cache.entry_lock` for a group of processes computing one entry together: rank 0 holds the
    lock for all of them (a per-rank lock would have rank 1 wait on rank 0 while rank 0 waits for rank 1)."""

    if not launched():
        with entry_lock(path, what):
            yield
        return
    with entry_lock(path, what) if is_main() else contextlib.nullcontext():
        barrier()  # nobody looks at the entry before rank 0 holds it
        try:
            yield
        finally:
            barrier()  # rank 0 releases only once every rank is done with it


def map_sharded(items: Sequence[Any], fn: Callable[[list[Any]], list[Any]],
                lengths: Sequence[int] | None = None) -> list[Any]:
    """``fn`` over this rank's share of ``items`` (balanced by ``lengths`` when given, else every W-th item),
    gathered back into input order on every rank: ``fn(items)`` itself in a single process."""
    if not launched():
        return list(fn(list(items)))
    world, me = world_size(), rank()
    mine = shard_by_tokens(lengths, world)[me] if lengths is not None else list(range(me, len(items), world))
    results = list(fn([items[i] for i in mine]))
    merged: list[Any] = [None] * len(items)
    for positions, values in all_gather((mine, results)):
        for i, value in zip(positions, values):
            merged[i] = value
    return merged
