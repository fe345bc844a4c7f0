"""PASER data selection: cluster, score, allocate, rank, filter; plus random and full baselines.

Lifecycle (like DSIR's ``data_selection``): every expensive step persists into the cache directory,
keyed by its inputs. Embeddings depend on the records and the embedder; clusters on the embeddings and
the clustering settings; model scores on both models, the records, the template and the dtype. So a new
budget, K, allocation rule, method or CCG setting reuses everything it can, and
``selection.json`` says ``"scores_from_cache": true``.

Python API::

    from paser.select import SelectConfig, run_selection
    result = run_selection(SelectConfig(original="smollm2-135m-instruct", pruned="pruned/",
                                        data="pool.jsonl", budget=0.2, out="sel/"))
    result.indices, result.summary["clusters"]
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd

from .allocate import ALLOCATION_RULES, allocate, apportion, ies, rank_within
from .cache import (atomic_path, cache_root, entry_lock, package_versions, stable_hash, write_json, write_jsonl,
                    write_parquet)
from .ccg import ConceptGraph, extract_concepts
from .cluster import ClusterConfig, ClusterResult, cluster_embeddings
from .data import (BAD_RECORD_POLICIES, ColumnMap, PromptFormatter, Record, SkippedRecords, encode_records,
                   load_records)
from .embed import DEFAULT_EMBEDDER, embed_records, texts_fingerprint
from .errors import ConfigError, DataError
from .models import check_compatible, load_model, load_tokenizer, model_fingerprint, resolve_dtype_name
from .score import SCORERS, ScoreConfig, get_scorer, score_cache_key, score_records

log = logging.getLogger(__name__)

METHODS = ("paser", "random", "full")


@dataclass
class SelectConfig:
    """Everything ``paser select`` needs; defaults are the documented CLI defaults."""

    original: str
    pruned: str
    data: str
    budget: float  # a record count, or a fraction of the data when below 1
    out: str | Path | None = None
    method: str = "paser"  # paser | random | full
    clusters: int | None = None  # None: eigengap rule
    cluster_method: str = "nmf"  # nmf | kmeans
    embedder: str = DEFAULT_EMBEDDER
    max_length: int = 256
    batch_size: int = 16
    dtype: str = "auto"  # auto: bf16 on GPUs and bf16-capable CPUs, else fp32
    ccg: bool = True
    concepts_per_sample: int = 5
    allocation: str = "cds"  # cds | mass | size (see paser.allocate)
    score: str = "jsd"  # jsd | loss_gap | pruned_loss (see paser.score)
    seed: int = 0
    template: str = "auto"
    columns: str | None = None
    duplicates: str = "keep"
    bad_records: str = "skip"  # skip: leave unusable records out and report them | error: stop at the first
    limit: int | None = None  # use only the first N records
    cache_dir: str | Path | None = None  # default: $PASER_CACHE or ~/.cache/paser

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, not '{self.method}'")
        if not self.budget > 0:
            raise ConfigError(f"budget must be positive (a count, or a fraction below 1), not {self.budget}")
        if self.budget >= 1 and self.budget != int(self.budget):
            raise ConfigError(f"budget {self.budget} is neither a fraction below 1 nor a whole count")
        if self.allocation not in ALLOCATION_RULES:
            raise ConfigError(f"allocation must be one of {', '.join(ALLOCATION_RULES)}, not '{self.allocation}'")
        if self.score not in SCORERS:
            raise ConfigError(f"score must be one of {', '.join(SCORERS)}, not '{self.score}'")
        if self.cluster_method not in {"nmf", "kmeans"}:
            raise ConfigError(f"cluster_method must be nmf or kmeans, not '{self.cluster_method}'")
        if self.clusters is not None and self.clusters < 1:
            raise ConfigError(f"clusters must be at least 1, not {self.clusters}")
        if self.dtype not in {"auto", "bf16", "fp32", "fp16"}:
            raise ConfigError(f"dtype must be auto, bf16 or fp32, not '{self.dtype}'")
        if self.bad_records not in BAD_RECORD_POLICIES:
            raise ConfigError(f"bad_records must be skip or error, not '{self.bad_records}'")
        if self.max_length < 8:
            raise ConfigError(f"max_length must be at least 8 tokens, not {self.max_length}")

    def budget_count(self, n_records: int) -> int:
        count = round(self.budget * n_records) if self.budget < 1 else int(self.budget)
        return max(1, min(count, n_records))


@dataclass
class SelectionResult:
    indices: list[int]  # the selected records' positions in the input file (Record.index), in selection order
    records: list[Record]
    scores: pd.DataFrame  # per-sample table (scores, cluster, ies, selected)
    summary: dict[str, Any]  # what selection.json holds
    clusters: ClusterResult | None = None
    positions: list[int] = field(default_factory=list)  # the same records' rows in ``scores``


@dataclass
class _Context:
    config: SelectConfig
    records: list[Record]
    budget: int
    table: pd.DataFrame  # per-sample scores
    degradation: np.ndarray  # the chosen scorer's per-sample values
    cache: Path
    timings: dict[str, float] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------ strategies
def _select_random(ctx: _Context) -> tuple[list[int], dict]:
    rng = np.random.default_rng(ctx.config.seed)
    return [int(i) for i in rng.choice(len(ctx.records), size=ctx.budget, replace=False)], {}


def _select_full(ctx: _Context) -> tuple[list[int], dict]:
    return list(range(len(ctx.records))), {}


def _cluster(ctx: _Context) -> ClusterResult:
    config = ctx.config
    t0 = time.perf_counter()
    embeddings, hit = embed_records(ctx.records, config.embedder, ctx.cache / "embeddings")
    ctx.timings["embed"] = time.perf_counter() - t0
    ctx.info["embeddings_from_cache"] = hit
    cluster_config = ClusterConfig(n_clusters=config.clusters, method=config.cluster_method, seed=config.seed)
    key = stable_hash("cluster-v1", texts_fingerprint([r.user_text for r in ctx.records]), config.embedder,
                      cluster_config.as_dict())
    path = ctx.cache / "clusters" / f"{key}.npz"
    t0 = time.perf_counter()
    with entry_lock(path, "the clusters"):
        if path.exists():
            saved = np.load(path)
            result = ClusterResult(saved["labels"], int(saved["k"]), saved["eigenvalues"], saved["coordinates"])
            ctx.info["clusters_from_cache"] = True
        else:
            result = cluster_embeddings(embeddings, cluster_config)
            with atomic_path(path, suffix=".npz") as tmp:
                np.savez(tmp, labels=result.labels, k=result.k, eigenvalues=result.eigenvalues,
                         coordinates=result.coordinates)
            ctx.info["clusters_from_cache"] = False
    ctx.timings["cluster"] = time.perf_counter() - t0
    return result


def _select_paser(ctx: _Context) -> tuple[list[int], dict]:
    config = ctx.config
    clusters = _cluster(ctx)
    ctx.info["cluster_result"] = clusters
    t0 = time.perf_counter()
    labels = clusters.labels
    k = clusters.k
    sizes = np.bincount(labels, minlength=k)
    cds = np.array([ctx.degradation[labels == c].mean() if sizes[c] else 0.0 for c in range(k)])
    allocation = allocate(sizes, cds, ctx.budget, config.allocation)
    if allocation.fallback:
        log.warning(allocation.fallback)
    cost = ctx.table["prompt_tokens"].to_numpy() + ctx.table["response_tokens"].to_numpy()
    efficiency = ies(ctx.degradation, cost)
    members = [np.flatnonzero(labels == c) for c in range(k)]
    ranked = [m[rank_within(efficiency[m])] for m in members]  # per cluster, best IES first

    graph = ConceptGraph()
    concepts: dict[int, frozenset[str]] = {}
    chosen: list[list[int]] = [[] for _ in range(k)]
    rejected: list[list[tuple[int, tuple[str, str]]]] = [[] for _ in range(k)]
    cursor = np.zeros(k, dtype=np.int64)

    def fill(c: int, quota: int) -> None:
        while len(chosen[c]) < quota and cursor[c] < sizes[c]:
            i = int(ranked[c][cursor[c]])
            cursor[c] += 1
            if config.ccg:
                if i not in concepts:
                    r = ctx.records[i]
                    concepts[i] = extract_concepts(f"{r.user_text}\n{r.output}", config.concepts_per_sample)
                pair = graph.conflict(concepts[i])
                if pair is not None:
                    rejected[c].append((i, pair))
                    continue
                graph.add(concepts[i])
            chosen[c].append(i)

    cluster_order = list(rank_within(cds))  # most damaged capability first
    for c in cluster_order:
        fill(c, int(allocation.budgets[c]))
    # Budget a cluster could not spend (CCG rejections) moves to clusters with unexamined candidates.
    while (short := ctx.budget - sum(map(len, chosen))) > 0:
        unexamined = sizes - cursor
        if unexamined.sum() == 0:
            break
        weights = allocation.weights if np.any(allocation.weights[unexamined > 0] > 0) else sizes.astype(float)
        extra = apportion(weights, short, unexamined)
        for c in cluster_order:
            if extra[c]:
                fill(c, len(chosen[c]) + int(extra[c]))
    overridden = 0
    if (short := ctx.budget - sum(map(len, chosen))) > 0:
        # Every candidate was examined: admit the best-IES rejected ones so exactly B come out.
        pool = sorted((i for rej in rejected for i, _ in rej), key=lambda i: (-efficiency[i], i))[:short]
        for i in pool:
            chosen[int(labels[i])].append(i)
        overridden = len(pool)
        log.warning("CCG rejected too many candidates: %d conflicting records admitted to reach the budget", overridden)
    ctx.timings["select"] = time.perf_counter() - t0

    ctx.table["cluster"] = labels
    ctx.table["ies"] = efficiency
    ctx.table["map_x"], ctx.table["map_y"] = _map_2d(clusters.coordinates)
    within_rank = np.empty(len(labels), dtype=np.int64)
    for c in range(k):
        within_rank[ranked[c]] = np.arange(1, sizes[c] + 1)
    ctx.table["rank"] = within_rank
    per_cluster = []
    for c in range(k):
        per_cluster.append({
            "cluster": c, "size": int(sizes[c]), "cds": float(cds[c]), "weight": float(allocation.weights[c]),
            "budget": int(allocation.budgets[c]), "selected": len(chosen[c]), "rejected": len(rejected[c]),
            "rejection_examples": [
                {"index": ctx.records[i].index, "instruction": ctx.records[i].instruction[:160],
                 "conflict": f"'{a}' and '{b}' are both in the graph but never co-occurred"}
                for i, (a, b) in rejected[c][:3]],
        })
    order = [i for c in cluster_order for i in chosen[c]]
    details = {
        "k": k, "allocation": config.allocation, "allocation_fallback": allocation.fallback,
        "clusters": per_cluster, "eigenvalues": [float(v) for v in clusters.eigenvalues[: min(k + 8, 66)]],
        "ccg": {"enabled": config.ccg, "rejected": sum(map(len, rejected)), "admitted_despite_conflict": overridden,
                "concepts_extracted": len(concepts), "graph_nodes": len(graph.nodes), "graph_edges": len(graph.edges)},
        "embeddings_from_cache": ctx.info.get("embeddings_from_cache"),
        "clusters_from_cache": ctx.info.get("clusters_from_cache"),
    }
    return order, details


def _map_2d(coordinates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A 2-D picture of the diffusion coordinates (their first two principal components), for reports."""
    from sklearn.decomposition import PCA

    if coordinates.shape[1] < 2 or len(coordinates) < 3:
        padded = np.zeros((len(coordinates), 2), dtype=np.float32)
        padded[:, :coordinates.shape[1]] = coordinates[:, :2]
        return padded[:, 0], padded[:, 1]
    xy = PCA(n_components=2, random_state=0).fit_transform(coordinates).astype(np.float32)
    return xy[:, 0], xy[:, 1]


STRATEGIES: dict[str, Callable[[_Context], tuple[list[int], dict]]] = {
    "paser": _select_paser, "random": _select_random, "full": _select_full}


# -------------------------------------------------------------------------------------------- scoring
def _data_fingerprint(records: Sequence[Record]) -> str:
    return texts_fingerprint([f"{r.instruction}\x01{r.input}\x01{r.output}" for r in records])


def _scores(config: SelectConfig, records: list[Record], skipped: SkippedRecords, cache: Path,
            timings: dict) -> tuple[pd.DataFrame, bool, list[Record]]:
    """The per-sample score table, whether it came from the cache, and the records it covers (those
    with a response token to score)."""
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(config.original)
    pruned_tokenizer = load_tokenizer(config.pruned)
    check_compatible(tokenizer, pruned_tokenizer)
    formatter = PromptFormatter(tokenizer, template=config.template, max_length=config.max_length)
    dtype = resolve_dtype_name(config.dtype)
    records, encoded = encode_records(formatter, records, config.bad_records, skipped)
    timings["tokenize"] = time.perf_counter() - t0
    key = score_cache_key(model_fingerprint(config.original), model_fingerprint(config.pruned),
                          _data_fingerprint(records), formatter.fingerprint, dtype)
    path = cache / "scores" / f"{key}.parquet"
    timings["prepare"] = time.perf_counter() - t0
    with entry_lock(path, "the model scores"):
        if path.exists():
            log.info("scores: %d records from the cache (%s)", len(records), path.name)
            return pd.read_parquet(path), True, records
        table = _compute_scores(config, tokenizer, pruned_tokenizer, encoded, dtype, path, timings)
        log.info("scores: computed for %d records (%s)", len(records), path.name)
        return table, False, records


def _compute_scores(config: SelectConfig, tokenizer: Any, pruned_tokenizer: Any, encoded: list, dtype: str,
                    path: Path, timings: dict) -> pd.DataFrame:
    t0 = time.perf_counter()
    original, _ = load_model(config.original, dtype=dtype, tokenizer=False)
    pruned, _ = load_model(config.pruned, dtype=dtype, tokenizer=False)
    check_compatible(tokenizer, pruned_tokenizer, original, pruned)  # now the output sizes too
    timings["load_models"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    table = score_records(original, pruned, encoded, tokenizer.pad_token_id,
                          ScoreConfig(batch_size=config.batch_size),
                          cache_file=path)
    timings["score"] = time.perf_counter() - t0
    return table


# ------------------------------------------------------------------------------------------ entry point
def run_selection(config: SelectConfig) -> SelectionResult:
    """Select ``config.budget`` records with ``config.method``; write outputs if ``config.out`` is set."""
    config.validate()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    cache = Path(config.cache_dir) if config.cache_dir else cache_root()

    t0 = time.perf_counter()
    columns = ColumnMap.parse(config.columns) if config.columns else None
    records = load_records(config.data, columns, duplicates=config.duplicates, limit=config.limit,
                           bad_records=config.bad_records)
    skipped = records.skipped
    timings["load_data"] = time.perf_counter() - t0

    table, from_cache, records = _scores(config, records, skipped, cache, timings)
    if not records:
        raise DataError(config.data, None, None, f"no usable records ({skipped.describe()})")
    budget = config.budget_count(len(records))
    if config.budget >= 1 and config.budget > len(records):
        log.warning("budget %d exceeds the %d records: selecting all", int(config.budget), len(records))
    table["index"] = [r.index for r in records]  # positions in the input file, so outputs join back
    table["line"] = [r.number for r in records]
    ctx = _Context(config, records, budget, table.copy(), get_scorer(config.score)(table), cache, timings)
    positions, details = STRATEGIES[config.method](ctx)
    selected = np.zeros(len(records), dtype=bool)
    selected[positions] = True
    ctx.table["selected"] = selected

    summary = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "method": config.method, "n_records": len(records), "budget": budget, "n_selected": len(positions),
        "skipped_records": skipped.summary(),
        "scores_from_cache": from_cache, "score": config.score,
        "degradation": _describe(ctx.degradation), "degradation_selected": _describe(ctx.degradation[positions]),
        **details,
    }
    result = SelectionResult([records[i].index for i in positions], [records[i] for i in positions], ctx.table,
                             summary, ctx.info.get("cluster_result"), list(positions))
    if config.out:
        t0 = time.perf_counter()
        write_outputs(result, Path(config.out))
        timings["write"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    summary["timings"] = {k: round(v, 3) for k, v in timings.items()}
    summary["versions"] = package_versions("paser", "torch", "transformers", "sentence-transformers",
                                           "scikit-learn", "scipy", "faiss-cpu", "yake")
    if config.out:
        write_json(Path(config.out) / "selection.json", summary)
    return result


def _describe(values: np.ndarray) -> dict[str, float]:
    if len(values) == 0:
        return {}
    q = np.quantile(values, [0.1, 0.5, 0.9])
    return {"mean": float(values.mean()), "p10": float(q[0]), "median": float(q[1]), "p90": float(q[2])}


def write_outputs(result: SelectionResult, out: Path) -> None:
    """``selected.jsonl`` (records as given plus a ``paser`` object) and ``scores.parquet``."""
    table = result.scores
    has_clusters = "cluster" in table

    def rows():
        for i, record in zip(result.positions, result.records):
            row = table.iloc[i]
            yield {**record.raw, "paser": {
                "index": record.index, "line": record.number,
                "cluster": int(row["cluster"]) if has_clusters else None,
                "jsd": float(row["jsd"]),
                "ies": float(row["ies"]) if has_clusters else None,
                "rank": int(row["rank"]) if has_clusters else None,
            }}

    write_jsonl(out / "selected.jsonl", rows())
    write_parquet(out / "scores.parquet", table)
