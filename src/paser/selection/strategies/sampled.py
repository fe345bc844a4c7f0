"""Sampled scoring (``scoring="sampled"``): PASER without scoring every record with both models.

Exhaustive scoring costs two forward passes of every record; at the paper's largest setting that is several
times the recovery it serves. Sampled scoring spends the exact scores where selection needs them:

1. **Pilot**: a seeded random sample of every capability cluster (``max(pilot_min, pilot x size)``, at most
   the cluster) is scored exactly. Each cluster's degradation (CDS) is estimated from it, with a standard
   error, and the allocation uses these estimates.
2. **Predict**: a ridge regression from what every record already has (its MiniLM embedding and the log of
   its prompt and response token counts) to the pilot scores predicts every other record's score. Its rank
   correlation on held-out pilot records (5-fold cross-validation) goes into ``selection.json``.
3. **Confirm**: in every cluster the ``oversample x n_k`` records the selection is most likely to draw are
   scored exactly (``max_scored`` caps the total): the best predicted IES for ``within="top"``; for
   ``within="sample"`` the best of the very draw selection makes (the same seeded Gumbel keys, on predicted
   instead of exact log IES), so that with a perfect predictor every record the exhaustive draw would pick
   is confirmed (confirming the top predicted IES instead narrows a proportional draw to a top-k). Selection
   then ranks by the exact IES, exactly scored records first; CCG and the rest of PASER run as usual.
   With ``confirm_tokens`` N the confirmation reads only the prompt and the first N response tokens of
   each candidate: cheaper where responses are long, and an
   approximation (``bench/confirm_tokens.py`` measures its rank agreement with the whole response's JSD);
   the pilot always reads whole records, since the allocation and the predictor rest on it.

Records never scored exactly keep their predicted score (``scored_exactly`` is False in ``scores.parquet``;
records confirmed on their first tokens are marked ``scored_prefix``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..allocate import allocate, ies, within_cluster_key
from ..score import PAIR_VALUES
from .base import SelectionContext

# scipy, scikit-learn and pandas are imported when sampled scoring runs: only this selection option needs them.

log = logging.getLogger(__name__)

# Bumped when the same settings select differently, so cached pipeline selections are redone:
# 2: the confirmation follows the selection's own draw (within="sample"), not the top predicted IES.
BEHAVIOUR_VERSION = 2


@dataclass
class SampledScores:
    score: np.ndarray  # per record: exact where scored, predicted elsewhere
    exact: np.ndarray  # bool: scored with both models (whole, or the first confirm_tokens response tokens)
    prefix: np.ndarray  # bool: of those, scored on the first confirm_tokens response tokens only
    cds: np.ndarray  # per cluster: mean exact score of its pilot
    cds_stderr: np.ndarray
    table: Any  # the exact pair values (jsd, losses) of the scored records, NaN elsewhere
    info: dict[str, Any] = field(default_factory=dict)


def pilot_positions(labels: np.ndarray, k: int, fraction: float, minimum: int, seed: int) -> np.ndarray:
    """A seeded random sample of every cluster: max(minimum, fraction x size) records, at most its size."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in range(k):
        members = np.flatnonzero(labels == c)
        n = min(len(members), max(minimum, int(np.ceil(fraction * len(members)))))
        chosen.append(rng.choice(members, size=n, replace=False))
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def score_features(embeddings: np.ndarray, prompt_tokens: np.ndarray, response_tokens: np.ndarray) -> np.ndarray:
    """What every record has before any model runs: its embedding and log token counts."""
    counts = np.log1p(np.stack([prompt_tokens, response_tokens], axis=1).astype(np.float64))
    return np.hstack([embeddings.astype(np.float64), counts])


def fit_predictor(features: np.ndarray, target: np.ndarray, seed: int) -> tuple[Any, float | None]:
    """A ridge regression (regularisation chosen by cross-validation) and its 5-fold held-out Spearman
    correlation with the target (None with fewer than 10 records)."""
    from scipy.stats import spearmanr
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import KFold, cross_val_predict
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    def model() -> Any:
        return make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-2, 4, 13)))

    held_out = None
    if len(target) >= 10:
        folds = KFold(n_splits=5, shuffle=True, random_state=seed)
        predicted = cross_val_predict(model(), features, target, cv=folds)
        held_out = float(spearmanr(predicted, target).statistic)
    return model().fit(features, target), held_out


def sampled_scores(ctx: SelectionContext, labels: np.ndarray, k: int,
                   to_score: Callable[[Any], np.ndarray]) -> SampledScores:
    """Pilot, predict, confirm (see the module doc). ``to_score`` turns a pair-score table into the
    degradation score (the configured scorer)."""
    import pandas as pd

    config = ctx.config
    n = len(ctx.records)
    sizes = np.bincount(labels, minlength=k)
    tokens = ctx.table["prompt_tokens"].to_numpy() + ctx.table["response_tokens"].to_numpy()
    pilot = pilot_positions(labels, k, config.pilot, config.pilot_min, config.seed)
    _announce(config, len(pilot), n, ctx.budget)
    t0 = time.perf_counter()
    pilot_table, pilot_cached = ctx.pair_scores_of(pilot)
    pilot_seconds = time.perf_counter() - t0
    score = np.full(n, np.nan)
    exact = np.zeros(n, dtype=bool)
    values = {c: np.full(n, np.nan) for c in PAIR_VALUES}

    prefix = np.zeros(n, dtype=bool)

    def keep(positions: np.ndarray, table: Any) -> None:
        score[positions] = to_score(table)
        exact[positions] = True
        for c in PAIR_VALUES:
            values[c][positions] = table[c].to_numpy()

    keep(pilot, pilot_table)
    cds = np.array([score[pilot[labels[pilot] == c]].mean() if np.any(labels[pilot] == c) else 0.0 for c in range(k)])
    stderr = np.array([score[pilot[labels[pilot] == c]].std(ddof=1) / np.sqrt((labels[pilot] == c).sum())
                       if (labels[pilot] == c).sum() > 1 else np.nan for c in range(k)])

    features = score_features(ctx.embeddings(), ctx.table["prompt_tokens"].to_numpy(),
                              ctx.table["response_tokens"].to_numpy())
    predictor, held_out = fit_predictor(features[pilot], score[pilot], config.seed)
    predicted = predictor.predict(features)
    likely = within_cluster_key(ies(predicted, tokens), config.within, config.seed)  # as selection will draw

    confirm = _to_confirm(ctx, labels, sizes, cds, likely, exact, len(pilot))
    confirm_cost = tokens[confirm] if config.confirm_tokens is None else (
        ctx.table["prompt_tokens"].to_numpy()[confirm]
        + np.minimum(ctx.table["response_tokens"].to_numpy()[confirm], config.confirm_tokens))
    if len(pilot) and not pilot_cached:
        rate = tokens[pilot].sum() / max(pilot_seconds, 1e-9)
        log.info("sampled scoring: confirming %d records (about %.0f s at the pilot's %.0f tokens/s)", len(confirm),
                 confirm_cost.sum() / rate, rate)
    else:
        log.info("sampled scoring: confirming %d records (%d tokens)", len(confirm), confirm_cost.sum())
    t0 = time.perf_counter()
    if len(confirm):
        keep(confirm, ctx.pair_scores_of(confirm, config.confirm_tokens)[0])
        prefix[confirm] = config.confirm_tokens is not None
    confirm_seconds = time.perf_counter() - t0
    score = np.where(exact, score, predicted)
    timing = {"pilot_seconds": round(pilot_seconds, 2), "confirm_seconds": round(confirm_seconds, 2)}
    info = _sampling_info(config, len(pilot), len(confirm), exact, prefix, held_out, stderr, timing)
    return SampledScores(score, exact, prefix, cds, stderr, pd.DataFrame(values), info)


def _announce(config: Any, pilot: int, n: int, budget: int) -> None:
    log.warning("sampled scoring: %d pilot records (of %d), then at most %d more confirmed exactly (oversample %g x "
                "budget %d%s); exhaustive scoring would score all %d", pilot, n, min(n, config.oversample * budget),
                config.oversample, budget, f", capped at {config.max_scored} in all" if config.max_scored else "", n)


def _sampling_info(config: Any, pilot: int, confirmed: int, exact: np.ndarray, prefix: np.ndarray, held_out: Any,
                   stderr: np.ndarray, timing: dict) -> dict:
    """What sampled scoring did, for selection.json."""
    return {
        "scoring": "sampled", "pilot": int(pilot), "confirmed": int(confirmed),
        "scored_exactly": int((exact & ~prefix).sum()), "scored_prefix": int(prefix.sum()),
        "records": len(exact), "scored_fraction": round(float(exact.mean()), 4), "oversample": config.oversample,
        "max_scored": config.max_scored, "confirm_tokens": config.confirm_tokens,
        "predictor": "ridge(embedding, log token counts)", "predictor_heldout_spearman": held_out, **timing,
        "cds_stderr": [None if np.isnan(v) else float(v) for v in stderr],
    }


def _to_confirm(ctx: SelectionContext, labels: np.ndarray, sizes: np.ndarray, cds: np.ndarray, likely: np.ndarray,
                exact: np.ndarray, piloted: int) -> np.ndarray:
    """The records to score exactly after the pilot: in each cluster, the ``oversample x budget`` likeliest picks
    not yet scored, within ``max_scored`` in all (sorted positions)."""
    config = ctx.config
    budgets = allocate(sizes, cds, ctx.budget, config.allocation).budgets
    confirm = []
    for c in range(len(sizes)):
        members = np.flatnonzero((labels == c) & ~exact)
        want = int(np.ceil(config.oversample * budgets[c]))
        if want and len(members):
            confirm.append(members[np.argsort(-likely[members], kind="stable")[:want]])
    confirm = np.concatenate(confirm) if confirm else np.zeros(0, dtype=np.int64)
    if config.max_scored is not None and piloted + len(confirm) > config.max_scored:
        room = max(0, config.max_scored - piloted)
        confirm = confirm[np.argsort(-likely[confirm], kind="stable")[:room]]
        log.warning("sampled scoring: --max-scored %d leaves room for %d confirmations", config.max_scored, room)
    return np.sort(confirm)


def exact_first(key: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """``key`` shifted so that inside any cluster every exactly scored record ranks before any predicted one."""
    finite = key[np.isfinite(key)]
    span = float(finite.max() - finite.min()) + 1.0 if finite.size else 1.0
    return np.where(exact, key, key - span)
