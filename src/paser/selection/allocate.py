"""Budget allocation across clusters and ranking inside them (pure functions on arrays).

An allocation rule maps per-cluster statistics to non-negative weights; :func:`apportion` turns weights
into integer budgets that sum to exactly ``min(B, total capacity)`` with ``n_k <= |cluster_k|``:
largest-remainder rounding, and budget that a full cluster cannot take goes to the others by weight.

Rules (add one with ``@ALLOCATION_RULES.register("name")``):
- ``cds``: n_k proportional to CDS_k, the cluster's mean degradation score (the PASER paper's rule);
- ``mass``: n_k proportional to |cluster_k| x CDS_k (the cluster's total degradation);
- ``size``: n_k proportional to |cluster_k| (also the fallback when every weight is zero);
- ``blend``: n_k proportional to |cluster_k| x (CDS_k + the pool's mean CDS): half the budget by ``size``,
  half by ``mass``, so every cluster keeps at least half its share of the pool while the other half
  follows the damage (a candidate of the study: bounds how far the selection drifts from the pool).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from ..registry import Registry

AllocationRule = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (sizes, cds) -> weights
ALLOCATION_RULES: Registry[AllocationRule] = Registry("allocation rule", "paser.allocation")


@ALLOCATION_RULES.register("cds")
def cds_rule(sizes: np.ndarray, cds: np.ndarray) -> np.ndarray:
    """The paper: each cluster's mean JSD, whatever its size."""
    return cds.astype(np.float64)


@ALLOCATION_RULES.register("mass")
def mass_rule(sizes: np.ndarray, cds: np.ndarray) -> np.ndarray:
    """Size x mean JSD: a cluster's total degradation."""
    return sizes.astype(np.float64) * cds


@ALLOCATION_RULES.register("size")
def size_rule(sizes: np.ndarray, cds: np.ndarray) -> np.ndarray:
    """Each capability cluster keeps its share of the pool."""
    return sizes.astype(np.float64)


@ALLOCATION_RULES.register("blend")
def blend_rule(sizes: np.ndarray, cds: np.ndarray) -> np.ndarray:
    """Half size, half mass."""
    sizes = sizes.astype(np.float64)
    mean_cds = float((sizes * cds).sum() / sizes.sum()) if sizes.sum() else 0.0
    return sizes * (cds + mean_cds)


def apportion(weights: np.ndarray, budget: int, capacity: np.ndarray) -> np.ndarray:
    """Integer shares of ``budget`` proportional to ``weights``, capped by ``capacity``.

    The shares sum to exactly ``min(budget, capacity.sum())``. Zero-weight clusters receive budget only
    when the positive-weight ones are full (then proportionally to their free room).
    """
    weights = np.asarray(weights, dtype=np.float64)
    capacity = np.asarray(capacity, dtype=np.int64)
    if weights.shape != capacity.shape or np.any(weights < 0) or not np.all(np.isfinite(weights)):
        raise ValueError("weights must be finite, non-negative and shaped like capacity")
    alloc = np.zeros(len(weights), dtype=np.int64)
    target = int(min(budget, capacity.sum()))
    while (remaining := target - int(alloc.sum())) > 0:
        room = capacity - alloc
        w = np.where(room > 0, weights, 0.0)
        if w.sum() <= 0:  # only zero-weight clusters have room left
            w = room.astype(np.float64)
        share = remaining * w / w.sum()
        base = np.minimum(np.floor(share).astype(np.int64), room)
        leftover = remaining - int(base.sum())
        fraction = np.where((base < room) & (w > 0), share - np.floor(share), -np.inf)
        order = np.argsort(-fraction, kind="stable")[:leftover]
        extra = np.zeros_like(base)
        extra[order[np.isfinite(fraction[order])]] = 1
        alloc += base + extra
    return alloc


@dataclass
class Allocation:
    budgets: np.ndarray  # (K,) records per cluster
    weights: np.ndarray  # (K,) the rule's weights
    rule: str
    fallback: str | None = None  # why the rule was replaced, if it was


# Below this, a cluster's mean JSD is fp32 rounding noise (identical models score ~1e-7 nats).
ZERO_CDS = 1e-6


def allocate(sizes: np.ndarray, cds: np.ndarray, budget: int, rule: str = "cds") -> Allocation:
    """Split ``budget`` over clusters with the named rule (see module docstring)."""
    rule_weights = ALLOCATION_RULES.get(rule)
    sizes = np.asarray(sizes, dtype=np.int64)
    cds = np.asarray(cds, dtype=np.float64)
    weights = rule_weights(sizes, cds)
    fallback = None
    if not np.any(weights[sizes > 0] > 0) or np.all(cds[sizes > 0] <= ZERO_CDS):
        fallback = f"every cluster's degradation is 0 (identical models?): '{rule}' replaced by cluster size"
        weights = size_rule(sizes, cds)
    return Allocation(apportion(weights, budget, sizes), weights, rule, fallback)


def ies(score: np.ndarray, cost_tokens: np.ndarray) -> np.ndarray:
    """Information efficiency: score / log(cost), the cost floored at e so the log is at least 1."""
    return np.asarray(score, np.float64) / np.log(np.maximum(np.asarray(cost_tokens, np.float64), math.e))


def within_cluster_key(efficiency: np.ndarray, within: str, seed: int) -> np.ndarray:
    """The order inside a cluster from its rank score (IES or IFD): ``top`` ranks by the score; ``sample`` draws
    without replacement in proportion to it (Gumbel top-k on its log), so the budget is not spent only on a
    cluster's extreme scores."""
    if within == "top":
        return efficiency
    with np.errstate(divide="ignore"):
        return np.log(np.maximum(efficiency, 0.0)) + np.random.default_rng(seed).gumbel(size=len(efficiency))


def rank_within(values: np.ndarray) -> np.ndarray:
    """Indices sorted by decreasing value, ties by index (deterministic)."""
    return np.lexsort((np.arange(len(values)), -np.asarray(values)))
