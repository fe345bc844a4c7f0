"""What every selection strategy sees, and the registry they join.

A strategy (in the spirit of Torch-Pruning's ``Importance`` objects) is a small object with a ``name`` and
``select(ctx) -> (positions, details)``: positions index ``ctx.records`` in selection order, details go
into ``selection.json``. It asks the context for the signals it needs, and only those are computed: the
context loads a model, embeds or scores the first time something asks, and every signal is cached on
disk keyed by its inputs (so ``random`` loads no model, and ten arms over one pool score it once).
"""

from __future__ import annotations

import gc
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pandas as pd

from ... import distributed
from ...cache import atomic_path, entry_lock, stable_hash, write_json
from ...data import Encoded, Record
from ...models import check_compatible, load_model, load_tokenizer, model_fingerprint
from ...registry import Registry
from ...teacher import jsd_against_store, stored_topk
from ..ccg import extract_concepts
from ..cluster import ClusterConfig, ClusterResult, cluster_embeddings
from ..embed import embed_records, texts_fingerprint
from ..score import (
    PAIR_VALUES,
    ScoreConfig,
    batched_values,
    read_values,
    response_losses,
    score_cache_key,
    score_records,
    score_table,
)

log = logging.getLogger(__name__)


class Strategy:
    """A selection method: registered by name (``@STRATEGIES.register``), implements :meth:`select`."""

    name = "base"
    description = ""
    version = 1  # bumped when the same settings select differently: cached pipeline selections are redone
    options: ClassVar[type | None] = None  # a dataclass of its own settings (SelectConfig fields, paser.options.option)

    def cache_version(self, config: Any) -> str:
        """What enters the pipeline's select-stage hash besides the settings (``version`` by default)."""
        return str(self.version)

    def validate(self, config: Any) -> None:
        """Raise :class:`~paser.errors.ConfigError` where the config's use of this method's own options is wrong.
        Called for every registered method, whichever one runs: the one that owns an option says whether it may be
        set for another (``config.method``)."""

    def select(self, ctx: SelectionContext) -> tuple[list[int], dict[str, Any]]:
        raise NotImplementedError


STRATEGIES: Registry[Strategy] = Registry("selection method", "paser.selection")


def get_strategy(name: str) -> Strategy:
    return STRATEGIES.get(name)


def data_fingerprint(records: Sequence[Record]) -> str:
    return texts_fingerprint([f"{r.instruction}\x01{r.input}\x01{r.output}" for r in records])


@dataclass
class SelectionContext:
    """The pool, the budget, and lazily computed, disk-cached signals about the pool."""

    config: Any  # paser.selection.select.SelectConfig
    records: list[Record]
    encoded: list[Encoded]
    tokenizer: Any
    template_fingerprint: dict[str, Any]
    dtype: str
    budget: int
    cache: Path
    table: pd.DataFrame  # per-record output table; strategies add their columns
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)  # cache hits and the like, for selection.json
    cost: dict[str, int] = field(default_factory=lambda: {"model_forward_tokens": 0, "embedded_records": 0})
    _models: dict[str, Any] = field(default_factory=dict)
    _pool_scores: pd.DataFrame | None = None  # the whole pool's cached scores, read for subsets (sampled scoring)

    # ------------------------------------------------------------------------------------ helpers
    def _timed(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        try:
            return fn()
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    def model(self, which: str) -> Any:
        """The ``original`` or ``pruned`` model, loaded once."""
        if which not in self._models:
            spec = self.config.original if which == "original" else self.config.pruned
            model, _ = self._timed("load_models", lambda: load_model(spec, dtype=self.dtype, tokenizer=False,
                                                                     device=distributed.device(),
                                                                     device_map=self.config.device_map))
            if which == "pruned":
                # output sizes are compared when the original is loaded anyway (it is not loaded for this)
                check_compatible(self.tokenizer, load_tokenizer(spec), self._models.get("original"), model)
            self._models[which] = model
        return self._models[which]

    def model_key(self, which: str) -> str:
        return model_fingerprint(self.config.original if which == "original" else self.config.pruned)

    def _forward_tokens(self, encoded: Sequence[Encoded], passes: int = 1) -> int:
        return passes * sum(len(e.input_ids) for e in encoded)

    # ------------------------------------------------------------------------------------ signals
    def pair_scores(self) -> pd.DataFrame:
        """Per-record JSD and both models' response losses (one pass of each model; the PASER score)."""
        if "pair_scores" in self.info:
            return self.info["pair_scores"]

        table, self.info["scores_from_cache"] = self._pair_scores(np.arange(len(self.records)))
        self.info["pair_scores"] = table
        for column in PAIR_VALUES:
            self.table[column] = table[column].to_numpy()
        return table

    def pair_scores_of(self, positions: Sequence[int],
                       response_tokens: int | None = None) -> tuple[pd.DataFrame, bool]:
        """The same per-record values for some records only (sampled scoring), cached by those records; taken
        from the whole pool's cache entry when that exists. With ``response_tokens`` only the prompt and the
        first that many response tokens are read (a cheaper, approximate score with its own cache entry).
        Returns the table and whether it came from a cache."""
        positions = np.asarray(positions, dtype=np.int64)
        if response_tokens is not None:
            return self._pair_scores(positions, response_tokens)
        whole = self.cache / "scores" / f"{self._score_key(self.records)}.parquet"
        if self._pool_scores is None and whole.exists():
            self._pool_scores = self._pair_scores(np.arange(len(self.records)), costed=False)[0]
            self.info["scores_from_cache"] = True
        if self._pool_scores is not None:  # costed as these records would be to score, not as the pool
            self.cost["model_forward_tokens"] += self._forward_tokens([self.encoded[i] for i in positions], 2)
            return self._pool_scores.iloc[positions].reset_index(drop=True), True
        return self._pair_scores(positions)

    def _score_key(self, records: Sequence[Record]) -> str:
        key = score_cache_key(self.model_key("original"), self.model_key("pruned"), data_fingerprint(records),
                              self.template_fingerprint, self.dtype)
        if self.config.resident == "one":  # approximate scores: their own cache entry
            key = stable_hash(key, "resident-one", self.config.topk)
        return key

    def _pair_scores(self, positions: np.ndarray, response_tokens: int | None = None,
                     costed: bool = True) -> tuple[pd.DataFrame, bool]:
        """(table of :data:`paser.selection.score.SCORE_COLUMNS` for ``positions``, whether it came from the cache);
        ``response_tokens``: score only each response's first that many tokens; ``costed``: count the model
        tokens in ``cost``."""

        records = [self.records[i] for i in positions]
        encoded = [self.encoded[i] for i in positions]
        key = self._score_key(records)
        if response_tokens is not None:
            encoded = [e.first_response_tokens(response_tokens) for e in encoded]
            key = stable_hash(key, "first-response-tokens", response_tokens)
        path = self.cache / "scores" / f"{key}.parquet"
        if costed:
            self.cost["model_forward_tokens"] += self._forward_tokens(encoded, 2)
        with distributed.group_lock(path, "the model scores"):
            if path.exists():
                log.info("scores: %d records from the cache (%s)", len(records), path.name)
                return score_table(encoded, read_values(path, PAIR_VALUES)), True
            if self.config.resident == "one":
                table = self._timed("score", lambda: self._scores_one_resident(path, encoded))
            else:
                original, pruned = self.model("original"), self.model("pruned")
                table = self._timed("score", lambda: score_records(
                    original, pruned, encoded, self.tokenizer.pad_token_id,
                    ScoreConfig(batch_size=self.config.batch_size), cache_file=path))
            log.info("scores: computed for %d records%s (%s)", len(records),
                     ", one model resident" if self.config.resident == "one" else "", path.name)
            return table, False

    def _scores_one_resident(self, path: Path, encoded: Sequence[Encoded]) -> pd.DataFrame:
        """Pass 1: the original model alone, its top-k log-probabilities stored (:mod:`paser.teacher`); it is
        freed before pass 2, where the pruned model alone is scored against the store."""

        def original() -> Any:
            return load_model(self.config.original, dtype=self.dtype, tokenizer=False, device=distributed.device(),
                              device_map=self.config.device_map)[0]

        pad_id = self.tokenizer.pad_token_id
        store = stored_topk(self.model_key("original"), original, encoded, pad_id, self.config.topk, self.dtype,
                            self.cache)
        self._models.pop("original", None)
        gc.collect()
        pruned = self.model("pruned")
        position = {id(e): i for i, e in enumerate(encoded)}

        def batch(items: Sequence[Encoded]) -> tuple[np.ndarray, ...]:
            return jsd_against_store(pruned, store, items, [position[id(e)] for e in items], pad_id)

        values = batched_values(encoded, batch, PAIR_VALUES, ScoreConfig(batch_size=self.config.batch_size),
                                path, f"score (JSD, top-{self.config.topk} store)")
        return score_table(encoded, values)

    def response_losses(self, which: str, encoded: Sequence[Encoded] | None = None, tag: str = "conditioned",
                        ) -> np.ndarray:
        """Mean response NLL per record under one model; ``encoded`` defaults to the pool's own encodings
        (``tag`` names a variant, e.g. the responses without their instructions)."""

        encoded = self.encoded if encoded is None else encoded
        key = stable_hash("response-loss-v1", self.model_key(which), tag,
                          [e.input_ids for e in encoded], [len(e.prompt_ids) for e in encoded], self.dtype)
        path = self.cache / "losses" / f"{key}.parquet"
        self.cost["model_forward_tokens"] += self._forward_tokens(encoded)
        with distributed.group_lock(path, f"the {which} model's response losses"):
            if path.exists():
                return pd.read_parquet(path)["loss"].to_numpy(np.float64)
            model = self.model(which)
            return self._timed("score", lambda: response_losses(
                model, encoded, self.tokenizer.pad_token_id, ScoreConfig(batch_size=self.config.batch_size),
                cache_file=path, desc=f"response loss ({which}, {tag})"))

    def concepts(self) -> list[frozenset[str]]:
        """Every record's keyphrases (:func:`paser.selection.ccg.extract_concepts`), cached on disk."""
        if "concepts" not in self.info:
            top = self.config.concepts_per_sample
            texts = [f"{r.user_text}\n{r.output}" for r in self.records]
            path = self.cache / "concepts" / f"{stable_hash('concepts-v1', texts_fingerprint(texts), top)}.json"
            with entry_lock(path, "the concepts"):
                if path.exists():
                    found = [frozenset(c) for c in json.loads(path.read_text())]
                else:
                    found = self._timed("concepts", lambda: [extract_concepts(t, top) for t in texts])
                    write_json(path, [sorted(c) for c in found])
            self.info["concepts"] = found
        return self.info["concepts"]

    def embeddings(self) -> np.ndarray:
        if "embeddings" not in self.info:
            vectors, hit = self._timed("embed", lambda: embed_records(self.records, self.config.embedder,
                                                                       self.cache / "embeddings"))
            self.info["embeddings"] = vectors
            self.info["embeddings_from_cache"] = hit
            self.cost["embedded_records"] += len(self.records)
        return self.info["embeddings"]

    def clusters(self, method: str | None = None) -> Any:
        """The diffusion-map clustering (:func:`paser.selection.cluster.cluster_embeddings`), cached on disk."""

        config = self.config
        cluster_config = ClusterConfig(n_clusters=config.clusters, method=method or "nmf", seed=config.seed)
        cache_key = ("clusters", cluster_config.method)
        if cache_key in self.info:
            return self.info[cache_key]
        embeddings = self.embeddings()
        key = stable_hash("cluster-v1", texts_fingerprint([r.user_text for r in self.records]), config.embedder,
                          cluster_config.as_dict())
        path = self.cache / "clusters" / f"{key}.npz"
        t0 = time.perf_counter()
        with entry_lock(path, "the clusters"):
            if path.exists():
                saved = np.load(path)
                result = ClusterResult(saved["labels"], int(saved["k"]), saved["eigenvalues"], saved["coordinates"])
                self.info["clusters_from_cache"] = True
            else:
                result = cluster_embeddings(embeddings, cluster_config)
                with atomic_path(path, suffix=".npz") as tmp:
                    np.savez(tmp, labels=result.labels, k=result.k, eigenvalues=result.eigenvalues,
                             coordinates=result.coordinates)
                self.info["clusters_from_cache"] = False
        self.timings["cluster"] = self.timings.get("cluster", 0.0) + time.perf_counter() - t0
        self.info[cache_key] = result
        return result


def top_k(values: np.ndarray, k: int, eligible: np.ndarray | None = None) -> list[int]:
    """Positions of the ``k`` highest values (ties by position), eligible ones first; if fewer than ``k``
    are eligible, the best of the rest fill the budget."""
    order = np.lexsort((np.arange(len(values)), -np.nan_to_num(values, nan=-np.inf)))
    if eligible is None:
        return [int(i) for i in order[:k]]
    first = [int(i) for i in order if eligible[i]]
    rest = [int(i) for i in order if not eligible[i]]
    return (first + rest)[:k]
