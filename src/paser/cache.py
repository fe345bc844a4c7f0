"""Cache locations, input hashing and atomic writes shared by every stage.

Every artifact is written to a temporary file in the destination directory and renamed into place,
so a crash never leaves a half-written result and a reader sees either the old file or the new one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

from . import faults


def checkpoint_seconds(default: float = 60.0) -> float:
    """How often long stages save partial progress: ``$PASER_CHECKPOINT_SECONDS`` or ``default``."""
    return float(os.environ.get("PASER_CHECKPOINT_SECONDS", default))


@contextlib.contextmanager
def entry_lock(path: str | Path, what: str = "this cache entry") -> Iterator[None]:
    """Hold an inter-process lock on one cache entry, so concurrent runs sharing ``PASER_CACHE`` compute it
    once: the second waits (and says so), then finds the first one's finished file."""

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(path) + ".lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        logging.getLogger(__name__).info("waiting for another process that is computing %s (%s)", what, path.name)
        lock.acquire()
    try:
        yield
    finally:
        lock.release()


def cache_root() -> Path:
    """Root of paser's cache: ``$PASER_CACHE`` if set, else ``~/.cache/paser``."""
    return Path(os.environ.get("PASER_CACHE", Path.home() / ".cache" / "paser")).expanduser()


def stable_hash(*parts: Any, length: int = 16) -> str:
    """Hex digest of JSON-serialisable parts, independent of dict ordering."""
    h = hashlib.sha256()
    for part in parts:
        h.update(json.dumps(part, sort_keys=True, default=str).encode())
        h.update(b"\x00")
    return h.hexdigest()[:length]


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    """Identity of a file by its content (size and SHA-256), for cache keys of large inputs.

    Content, not path and mtime: a data folder provisioned afresh, a copied model or a rerun that writes
    identical weights keeps its key, so finished stages and caches are reused. The digest is memoised under
    the cache root by (path, size, mtime), so an unchanged file is read once (~1 s per GB)."""
    p = Path(path).resolve()
    st = p.stat()
    memo = cache_root() / "fingerprints" / f"{stable_hash(str(p), st.st_size, st.st_mtime_ns)}.txt"
    try:
        digest = memo.read_text().strip()
    except OSError:
        digest = ""
    if len(digest) != 64:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
        digest = h.hexdigest()
        with contextlib.suppress(OSError):  # the memo only saves time; a read-only cache costs a re-read
            memo.parent.mkdir(parents=True, exist_ok=True)
            tmp = memo.with_name(f".{memo.name}.{os.getpid()}")
            tmp.write_text(digest)
            os.replace(tmp, memo)  # (not atomic_path: the memo is no checkpoint of the fault-injection tests)
    return {"size": st.st_size, "sha256": digest}


@contextlib.contextmanager
def atomic_path(dest: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``dest``; rename it onto ``dest`` only if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix or ".tmp", dir=dest.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        faults.reached("atomic.before_rename")  # a kill here must leave ``dest`` as it was
        os.replace(tmp_path, dest)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(dest: str | Path) -> Iterator[Path]:
    """Yield a temporary directory beside ``dest``; it replaces ``dest`` only if the block succeeds.
    A ``dest`` that is a link to a folder has its target replaced (the link stays)."""
    dest = Path(dest).resolve()
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        yield tmp
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_text(dest: str | Path, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(dest: str | Path, obj: Any) -> None:
    write_text(dest, json.dumps(obj, indent=2, ensure_ascii=False, default=_json_default) + "\n")


def write_jsonl(dest: str | Path, rows: Iterable[dict]) -> None:
    with atomic_path(dest) as tmp, open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")


def write_npy(dest: str | Path, array: np.ndarray) -> None:
    with atomic_path(dest, suffix=".npy") as tmp:
        np.save(tmp, array)


def write_parquet(dest: str | Path, frame: Any) -> None:
    """Write a pandas DataFrame to parquet atomically."""
    with atomic_path(dest, suffix=".parquet") as tmp:
        frame.to_parquet(tmp, index=False)


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def package_versions(*packages: str) -> dict[str, str]:
    """Python and the installed versions of ``packages`` (distribution names), for provenance records."""

    versions = {"python": platform.python_version()}
    for package in packages:
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
