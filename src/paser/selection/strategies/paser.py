"""PASER and the ablations the paper names (see docs/method.md).

- ``paser``: capability clusters (diffusion map + NMF on MiniLM embeddings), per-cluster budgets from the
  clusters' degradation, IES ranking inside a cluster (score / log cost), and the concept-consistency graph.
- Defaults (docs/fidelity.md): ``allocation="size"`` (every capability cluster keeps its share of the pool:
  the damage-driven rules drifted from the pool's mix and lost held-out response perplexity), ``rank="ifd"``
  with ``within="top"`` (inside a cluster, the records with the highest Instruction-Following Difficulty
  under the pruned model, see ``model_scores``; IFD >= 1 last), and ``ccg_rule="specific"``: only
  *specific* concepts (document frequency at most ``ccg_max_df`` of the pool) conflict, and no cluster
  rejects more candidates than its quota, so the filter cannot erase a capability (the paper's rule emptied
  a 54-record tool-call cluster of the study slice). ``rank="score"`` (the highest JSD per response token,
  what a token budget buys and what KD then trains away) won the equal-token screen at 20% of the tokens and
  lost WikiText-2 to random at 5%, so it is not the default.
  The method itself is not the default (``random`` is): with distillation it wins at 20% of the
  tokens on Wanda 50% and loses WikiText-2 to a random slice at 5% and on 2:4.
  ``--recipe paper`` restores ``cds``, ``rank="ies"`` (JSD / log cost), ``top`` and the paper's rule.
- Other rules: ``allocation="mass"`` (size x mean JSD, a cluster's total degradation), ``"blend"``, and
  ``"size"`` with ``rank="ies"`` (the paper's "without CDS" ablation); ``within="sample"`` draws in
  proportion to the rank score (seeded) instead of taking the top.
- ``drop_original_loss_above=q`` examines last the records whose reference the original model predicts
  worst (loss above the pool's q-quantile: noisy or unlearnable).
- Without the semantic-structural clustering: ``cluster_method="random"`` (the same K, random
  assignment) and ``"kmeans-raw"`` (k-means on the raw embeddings, the same K); ``"kmeans"`` runs k-means
  on the diffusion coordinates instead of NMF.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field

from ...errors import ConfigError
from ...options import option
from ...registry import Registry
from ..allocate import allocate, apportion, ies, rank_within, within_cluster_key
from ..ccg import ConceptGraph, extract_concepts
from ..cluster import ClusterResult
from ..score import get_scorer
from .base import STRATEGIES, SelectionContext, Strategy
from .model_scores import ifd_scores
from .sampled import BEHAVIOUR_VERSION, exact_first, sampled_scores

# scikit-learn is imported when PASER clusters: only this method needs it.

log = logging.getLogger(__name__)

CLUSTER_METHODS: Registry[Callable[[SelectionContext], ClusterResult]] = Registry("cluster method", "paser.clustering")


@CLUSTER_METHODS.register("nmf")
def nmf_clusters(ctx: SelectionContext) -> ClusterResult:
    """PASER's: diffusion map of the embeddings, NMF spectral clustering."""
    return ctx.clusters("nmf")


@CLUSTER_METHODS.register("kmeans")
def kmeans_clusters(ctx: SelectionContext) -> ClusterResult:
    """k-means on the diffusion coordinates."""
    return ctx.clusters("kmeans")


@CLUSTER_METHODS.register("random")
def random_clusters(ctx: SelectionContext) -> ClusterResult:
    """The ablation without clustering: the diffusion map's K, each record assigned at random."""
    k = ctx.clusters("nmf").k
    return _numbered_by_size(ctx, np.random.default_rng(ctx.config.seed).integers(0, k, size=len(ctx.records)))


@CLUSTER_METHODS.register("kmeans-raw")
def kmeans_raw_clusters(ctx: SelectionContext) -> ClusterResult:
    """k-means on the raw embeddings (no diffusion map), with the diffusion map's K."""
    from sklearn.cluster import KMeans

    k = ctx.clusters("nmf").k
    return _numbered_by_size(ctx, KMeans(n_clusters=k, n_init=4, random_state=ctx.config.seed).fit_predict(ctx.embeddings()))


def _numbered_by_size(ctx: SelectionContext, labels: np.ndarray) -> ClusterResult:
    reference = ctx.clusters("nmf")
    k = reference.k
    sizes = np.bincount(labels, minlength=k)
    relabel = np.empty(k, dtype=np.int64)
    relabel[np.argsort(-sizes, kind="stable")] = np.arange(k)  # numbered by decreasing size, like the others
    return ClusterResult(relabel[labels], k, reference.eigenvalues, reference.coordinates)


def capability_clusters(ctx: SelectionContext, method: str) -> ClusterResult:
    """The clustering PASER allocates over (a registered cluster method)."""
    return CLUSTER_METHODS.get(method)(ctx)


def specific_concepts(ctx: SelectionContext) -> frozenset[str]:
    """Concepts rare enough to carry meaning: in at most ``ccg_max_df`` of the pool's records (document
    frequency over every record's keyphrases). Boilerplate such as 'answer', 'write' or 'python' is left
    out of the graph, so it can never make two records conflict."""

    config = ctx.config
    frequency = Counter(c for found in ctx.concepts() for c in found)
    limit = max(1.0, config.ccg_max_df * len(ctx.records))
    return frozenset(c for c, n in frequency.items() if n <= limit)


def select_paser(ctx: SelectionContext) -> tuple[list[int], dict]:
    """PASER: clusters, per-cluster budgets by degradation, IES ranking, concept-consistency filter."""
    config = ctx.config
    if config.scoring != "sampled":
        ctx.pair_scores()  # the long, resumable model pass first: a run killed in it has done nothing else yet
    clusters = capability_clusters(ctx, config.cluster_method)
    ctx.info["cluster_result"] = clusters
    labels, k = clusters.labels, clusters.k
    sizes = np.bincount(labels, minlength=k)
    degradation, cds, sampled = _degradation(ctx, labels, k, sizes)
    t0 = time.perf_counter()
    allocation = allocate(sizes, cds, ctx.budget, config.allocation)
    if allocation.fallback:
        log.warning(allocation.fallback)
    cost = ctx.table["prompt_tokens"].to_numpy() + ctx.table["response_tokens"].to_numpy()
    ctx.table["score"] = degradation
    efficiency = ies(degradation, cost)
    order_key, examined_last = _order_key(ctx, degradation, efficiency, sampled)
    ranked = [m[rank_within(order_key[m])] for m in (np.flatnonzero(labels == c) for c in range(k))]  # best first
    cluster_order = list(rank_within(cds))  # most damaged capability first
    picks = _ClusterFill(ctx, ranked, sizes)
    for c in cluster_order:
        picks.fill(c, int(allocation.budgets[c]))
    picks.spend_what_is_left(allocation, cluster_order)
    overridden = picks.admit_rejected(order_key, labels)
    ctx.timings["select"] = time.perf_counter() - t0

    ctx.table["cluster"] = labels
    ctx.table["ies"] = efficiency
    ctx.table["map_x"], ctx.table["map_y"] = _map_2d(clusters.coordinates)
    within_rank = np.empty(len(labels), dtype=np.int64)
    for c in range(k):
        within_rank[ranked[c]] = np.arange(1, sizes[c] + 1)
    ctx.table["rank"] = within_rank
    order = [i for c in cluster_order for i in picks.chosen[c]]
    details = {
        "score": config.score, "k": k, "cluster_method": config.cluster_method, "allocation": config.allocation,
        "within": config.within, "rank": config.rank, "examined_last": int(examined_last.sum()),
        "allocation_fallback": allocation.fallback,
        "clusters": [picks.cluster_summary(c, cds[c], allocation) for c in range(k)],
        "eigenvalues": [float(v) for v in clusters.eigenvalues[: min(k + 8, 66)]],
        "ccg": picks.ccg_summary(allocation, overridden),
        "sampling": sampled.info if sampled is not None else {"scoring": "exhaustive"},
        "embeddings_from_cache": ctx.info.get("embeddings_from_cache"),
        "clusters_from_cache": ctx.info.get("clusters_from_cache"),
    }
    return order, details


def _degradation(ctx: SelectionContext, labels: np.ndarray, k: int, sizes: np.ndarray) -> tuple[Any, np.ndarray, Any]:
    """Each record's degradation score and each cluster's mean (CDS): exhaustive, or sampled (exact scores for a
    pilot and the likely picks, predictions elsewhere; its columns join the record table)."""
    config = ctx.config
    scorer = get_scorer(config.score)
    if config.scoring != "sampled":
        degradation = scorer(ctx.pair_scores())
        cds = np.array([degradation[labels == c].mean() if sizes[c] else 0.0 for c in range(k)])
        return degradation, cds, None
    sampled = sampled_scores(ctx, labels, k, scorer)
    for column in sampled.table.columns:
        ctx.table[column] = sampled.table[column].to_numpy()
    ctx.table["scored_exactly"] = sampled.exact & ~sampled.prefix
    if config.confirm_tokens is not None:
        ctx.table["scored_prefix"] = sampled.prefix
    return sampled.score, sampled.cds, sampled


def _order_key(ctx: SelectionContext, degradation: Any, efficiency: np.ndarray, sampled: Any
               ) -> tuple[np.ndarray, np.ndarray]:
    """The within-cluster ranking key (``--rank``: ifd, score or IES) and the records examined last in their
    cluster (IFD >= 1, references the original itself cannot predict): their key is -inf."""
    config = ctx.config
    examined_last = np.zeros(len(efficiency), dtype=bool)
    if config.rank == "ifd":  # the budgets are the allocation rule's; inside a cluster, the hardest-to-follow first

        ifd = ifd_scores(ctx, config.ifd_model)[0]
        ctx.table["ifd"] = ifd
        order_key = within_cluster_key(ifd, config.within, config.seed)
        examined_last |= ifd >= 1.0  # the instruction does not help predict the response: examined last, as IFD does
    elif config.rank == "score":  # the damage per token: what a token budget buys most of
        order_key = within_cluster_key(np.asarray(degradation, np.float64), config.within, config.seed)
    else:
        order_key = within_cluster_key(efficiency, config.within, config.seed)
    if sampled is not None:
        order_key = exact_first(order_key, sampled.exact)
    if config.drop_original_loss_above is not None:  # references the original model itself cannot predict
        loss_original = (ctx.table["loss_original"] if sampled is not None
                         else ctx.pair_scores()["loss_original"]).to_numpy(np.float64)
        with np.errstate(invalid="ignore"):  # (sampled: known only where scored exactly)
            examined_last |= loss_original > np.nanquantile(loss_original, config.drop_original_loss_above)
    return np.where(examined_last, -np.inf, order_key), examined_last


class _ClusterFill:
    """Each cluster's picks, taken in ranked order through the concept-consistency filter (CCG): a candidate
    whose concepts would join two never co-occurring ones in the graph is rejected."""

    def __init__(self, ctx: SelectionContext, ranked: list[np.ndarray], sizes: np.ndarray):
        config = ctx.config
        k = len(ranked)
        self.ctx, self.config, self.ranked, self.sizes = ctx, config, ranked, sizes
        self.graph = ConceptGraph()
        self.concepts: dict[int, frozenset[str]] = {}
        self.specific = specific_concepts(ctx) if config.ccg and config.ccg_rule == "specific" else None
        self.chosen: list[list[int]] = [[] for _ in range(k)]
        self.rejected: list[list[tuple[int, tuple[str, str]]]] = [[] for _ in range(k)]
        self.cursor = np.zeros(k, dtype=np.int64)

    def fill(self, c: int, quota: int) -> None:
        """Take cluster ``c``'s next candidates until it holds ``quota`` or has none left."""
        while len(self.chosen[c]) < quota and self.cursor[c] < self.sizes[c]:
            i = int(self.ranked[c][self.cursor[c]])
            self.cursor[c] += 1
            if self.config.ccg:
                pair = self.graph.conflict(self._concepts(i))
                # the specific rule never lets a cluster reject more candidates than its quota
                capped = self.specific is not None and len(self.rejected[c]) >= quota
                if pair is not None and not capped:
                    self.rejected[c].append((i, pair))
                    continue
                self.graph.add(self.concepts[i])
            self.chosen[c].append(i)

    def _concepts(self, i: int) -> frozenset[str]:
        if i not in self.concepts:
            r = self.ctx.records[i]
            found = extract_concepts(f"{r.user_text}\n{r.output}", self.config.concepts_per_sample)
            self.concepts[i] = found if self.specific is None else frozenset(c for c in found if c in self.specific)
        return self.concepts[i]

    def spend_what_is_left(self, allocation: Any, cluster_order: list[int]) -> None:
        """Budget a cluster could not spend (CCG rejections) moves to clusters with unexamined candidates."""
        while (short := self.ctx.budget - sum(map(len, self.chosen))) > 0:
            unexamined = self.sizes - self.cursor
            if unexamined.sum() == 0:
                break
            weights = allocation.weights if np.any(allocation.weights[unexamined > 0] > 0) else self.sizes.astype(float)
            extra = apportion(weights, short, unexamined)
            for c in cluster_order:
                if extra[c]:
                    self.fill(c, len(self.chosen[c]) + int(extra[c]))

    def admit_rejected(self, order_key: np.ndarray, labels: np.ndarray) -> int:
        """Every candidate was examined and the budget is not met: admit rejected ones in their ranked order
        (the --rank order: IFD, IES or score) so exactly B come out; returns how many."""
        short = self.ctx.budget - sum(map(len, self.chosen))
        if short <= 0:
            return 0
        pool = sorted((i for rej in self.rejected for i, _ in rej), key=lambda i: (-order_key[i], i))[:short]
        for i in pool:
            self.chosen[int(labels[i])].append(i)
        log.warning("CCG rejected too many candidates: %d conflicting records admitted to reach the budget", len(pool))
        return len(pool)

    def cluster_summary(self, c: int, cds: float, allocation: Any) -> dict:
        records = self.ctx.records
        return {"cluster": c, "size": int(self.sizes[c]), "cds": float(cds), "weight": float(allocation.weights[c]),
                "budget": int(allocation.budgets[c]), "selected": len(self.chosen[c]), "rejected": len(self.rejected[c]),
                "rejection_examples": [
                    {"index": records[i].index, "instruction": records[i].instruction[:160],
                     "conflict": f"'{a}' and '{b}' are both in the graph but never co-occurred"}
                    for i, (a, b) in self.rejected[c][:3]]}

    def ccg_summary(self, allocation: Any, overridden: int) -> dict:
        k = len(self.chosen)
        return {"enabled": self.config.ccg, "rule": self.config.ccg_rule,
                "specific_concepts": None if self.specific is None else len(self.specific),
                "rejected": sum(map(len, self.rejected)), "admitted_despite_conflict": overridden,
                # capabilities the filter erased: clusters with a budget that ended with nothing selected
                "clusters_emptied": sum(1 for c in range(k) if allocation.budgets[c] > 0 and not self.chosen[c]),
                "concepts_extracted": len(self.concepts), "graph_nodes": len(self.graph.nodes),
                "graph_edges": len(self.graph.edges)}


def _map_2d(coordinates: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A 2-D picture of the diffusion coordinates (their first two principal components), for reports."""
    from sklearn.decomposition import PCA

    if coordinates.shape[1] < 2 or len(coordinates) < 3:
        padded = np.zeros((len(coordinates), 2), dtype=np.float32)
        padded[:, :coordinates.shape[1]] = coordinates[:, :2]
        return padded[:, 0], padded[:, 1]
    xy = PCA(n_components=2, random_state=0).fit_transform(coordinates).astype(np.float32)
    return xy[:, 0], xy[:, 1]


@dataclass
class PaserOptions:
    clusters: Annotated[int, Field(ge=1)] | None = option(None, "Number of clusters K (default: eigengap rule within [2, 64]).")
    cluster_method: str = option("nmf", "paser: how records are clustered (random and kmeans-raw: ablations).")
    allocation: str = option("size", "paser: the budget rule across clusters.")
    rank: Literal["ifd", "ies", "score"] = option(
        "ifd", "paser, the order inside a cluster: ifd (Instruction-Following Difficulty under --ifd-model; records "
        "with IFD >= 1 last) | ies (JSD / log cost, the paper) | score (the --score itself, a mean per response "
        "token: a token budget already charges each record its length).")
    within: Literal["top", "sample"] = option(
        "top", "Inside a cluster: top (best --rank score first, as the paper) | sample (drawn in proportion to it, "
        "seeded).")
    ccg: bool = option(True, "Concept-consistency filter (negative-transfer mitigation).")
    ccg_rule: Literal["specific", "paper"] = option(
        "specific", "CCG conflict rule: specific (only concepts in at most --ccg-max-df of the records conflict, and no "
        "cluster rejects beyond its quota: no capability is erased) | paper (any two known concepts never seen together).")
    ccg_max_df: Annotated[float, Field(gt=0, le=1)] = option(
        0.02, "CCG rule specific: concepts in at most this share of the pool's records.")
    concepts_per_sample: Annotated[int, Field(ge=1)] = option(5, "CCG: key phrases extracted per record.")
    drop_original_loss_above: Annotated[float, Field(gt=0, lt=1)] | None = option(
        None, "Examine last the records whose reference the original model predicts worst (original loss above this "
        "quantile of the pool's).")
    scoring: Literal["exhaustive", "sampled"] = option(
        "exhaustive", "exhaustive: both models score every record | sampled: a pilot per cluster, a predictor for the "
        "rest, exact scores only for the likely picks.")
    pilot: Annotated[float, Field(gt=0, le=1)] = option(
        0.02, "sampled: share of each cluster scored in the pilot (at least --pilot-min records).")
    pilot_min: Annotated[int, Field(ge=2)] = option(16, "sampled: pilot records per cluster at least.")
    oversample: Annotated[float, Field(ge=1)] = option(
        2.0, "sampled: records confirmed exactly per cluster, as a multiple of its budget.")
    max_scored: Annotated[int, Field(ge=1)] | None = option(None, "sampled: score at most N records exactly in all.")
    confirm_tokens: Annotated[int, Field(ge=1)] | None = option(
        None, "sampled: confirm candidates on the prompt and their first N response tokens only (cheaper, approximate; "
        "the pilot still reads whole records).")


@STRATEGIES.register("paser")
class Paser(Strategy):
    description = "PASER: capability clusters, degradation-weighted budgets, IES ranking, concept consistency"
    options = PaserOptions

    def select(self, ctx: SelectionContext) -> tuple[list[int], dict]:
        return select_paser(ctx)

    def validate(self, config: Any) -> None:
        if config.rank == "ifd" and config.scoring == "sampled":
            raise ConfigError("scoring sampled predicts JSD, which ranks by IES: add --rank ies (rank: ies), or "
                              "score exhaustively for the default IFD ranking")
        if config.scoring == "sampled" and config.method != "paser":
            raise ConfigError(f"scoring sampled applies to method paser, not '{config.method}'")
        if config.confirm_tokens is not None and config.scoring != "sampled":
            raise ConfigError("confirm_tokens applies to scoring sampled")

    def cache_version(self, config: Any) -> str:
        return f"{self.version}+sampled{BEHAVIOUR_VERSION}" if config.scoring == "sampled" else str(self.version)
