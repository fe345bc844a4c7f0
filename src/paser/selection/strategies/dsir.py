"""DSIR: data selection by importance resampling toward a target text set (Xie et al., NeurIPS 2023).

Each text becomes hashed unigram and bigram counts (lower-cased word tokens, ``buckets`` hash buckets,
CRC-32 so the hashing is stable across runs). Two bag-of-n-gram models with add-one smoothing are fit,
one on the target texts and one on the pool; a record's log importance weight is
``sum_j count_j * (log p_target(j) - log p_pool(j))``, and the budget is drawn without replacement in
proportion to the weights by Gumbel top-k (``argtopk(log w + Gumbel noise)``, seeded). No model is loaded.

The target is any instruction data source (instruction, input and output joined) or a ``.txt`` file (one
text per non-empty line); target records that also sit in the pool are left out of the target.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
from pydantic import Field
from scipy import sparse

from ...data import iter_records
from ...errors import ConfigError
from ...options import option
from .base import STRATEGIES, SelectionContext, Strategy

WORD = re.compile(r"\w+")


def ngram_features(texts: Iterable[str], buckets: int = 10_000) -> sparse.csr_matrix:
    """Hashed unigram + bigram counts, one row per text."""
    texts = list(texts)
    rows, cols = [], []
    for row, text in enumerate(texts):
        words = WORD.findall(text.lower())
        grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
        rows.extend([row] * len(grams))
        cols.extend(zlib.crc32(g.encode()) % buckets for g in grams)
    data = np.ones(len(cols), dtype=np.float64)
    return sparse.csr_matrix((data, (rows, cols)), shape=(len(texts), buckets))


def log_importance_weights(pool: sparse.csr_matrix, target: sparse.csr_matrix) -> np.ndarray:
    """``sum_j count_j * (log p_target(j) - log p_pool(j))`` with add-one smoothed bucket distributions."""
    buckets = pool.shape[1]
    target_counts = np.asarray(target.sum(axis=0)).ravel()
    pool_counts = np.asarray(pool.sum(axis=0)).ravel()
    log_target = np.log((target_counts + 1.0) / (target_counts.sum() + buckets))
    log_pool = np.log((pool_counts + 1.0) / (pool_counts.sum() + buckets))
    return np.asarray(pool @ (log_target - log_pool)).ravel()


def gumbel_top_k(log_weights: np.ndarray, k: int, seed: int) -> list[int]:
    """``k`` draws without replacement, each in proportion to ``exp(log_weights)`` (Gumbel top-k trick)."""
    noise = np.random.default_rng(seed).gumbel(size=len(log_weights))
    keys = log_weights + noise
    return [int(i) for i in np.argsort(-keys, kind="stable")[:k]]


def record_text(record) -> str:
    return "\n".join(part for part in (record.instruction, record.input, record.output) if part)


def target_texts(source: str, exclude: set[tuple[str, str]], sources: Sequence[str] | None = None,
                 limit: int | None = None) -> list[str]:
    path = Path(source)
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise ConfigError(f"DSIR target file not found: {source}")
        texts = [line.strip() for line in path.read_text(encoding="utf-8", errors="replace").splitlines()]
        texts = [t for t in texts if t]
    else:
        texts = []
        for record in iter_records(source, bad_records="skip"):
            if record.key in exclude or (sources and record.raw.get("source") not in sources):
                continue
            texts.append(record_text(record))
    texts = texts[:limit] if limit else texts
    if not texts:
        raise ConfigError(f"DSIR target {source} holds no text" + (f" from sources {list(sources)}" if sources else ""))
    return texts


@dataclass
class DSIROptions:
    target: str | None = option(None, "dsir: target texts (instruction data, or a .txt file with one text per line).")
    target_sources: list[str] | None = option(None, "dsir: only target records whose 'source' field is listed (repeatable).")
    target_limit: Annotated[int, Field(ge=1)] | None = option(None, "dsir: at most this many target texts.")
    dsir_buckets: Annotated[int, Field(ge=1)] = option(10_000, "dsir: hash buckets for the unigram + bigram features.")


@STRATEGIES.register("dsir")
class DSIR(Strategy):
    options = DSIROptions
    description = "importance resampling toward --target on hashed unigram+bigram features; no model"

    def validate(self, config) -> None:
        if config.method == "dsir" and not config.target:
            raise ConfigError("method dsir needs a target text set: --target FILE (instruction data or .txt)")

    def select(self, ctx: SelectionContext) -> tuple[list[int], dict]:
        config = ctx.config  # its target was checked by validate (run_selection validates first)
        texts = target_texts(config.target, {r.key for r in ctx.records}, config.target_sources,
                             config.target_limit)
        pool = ngram_features([record_text(r) for r in ctx.records], config.dsir_buckets)
        weights = log_importance_weights(pool, ngram_features(texts, config.dsir_buckets))
        ctx.table["dsir_log_weight"] = weights
        ctx.table["score"] = weights
        return gumbel_top_k(weights, ctx.budget, config.seed), {
            "score": "log importance weight (hashed n-grams, target over pool)",
            "target": config.target, "target_texts": len(texts), "target_sources": config.target_sources,
            "buckets": config.dsir_buckets}
