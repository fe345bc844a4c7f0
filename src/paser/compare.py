"""Comparisons between selection arms: means over seeds and paired bootstrap intervals against a baseline.

Input: ``results.json`` of ``paser evaluate`` (its per-item values: per-question scores, per-window and
per-record NLL sums with token counts) and which evaluated model belongs to which arm and seed.

A metric is computed from per-item parts: perplexities as ``exp(sum NLL / sum tokens)`` over windows or
held-out records, accuracies as the mean score over questions, the mean accuracy as the mean over tasks,
the share of the perplexity gap recovered as ``(ppl_pruned - ppl_arm) / (ppl_pruned - ppl_dense)`` and the
share of the pruned model's KL to the original removed likewise. Each registered measurement declares its
metrics (:class:`paser.evaluate.Metric`: components, aggregation, higher-is-better).

The interval of ``arm - baseline`` is a paired bootstrap over seeds and evaluation items: each replicate
draws the seeds with replacement (one draw shared by both arms when they ran the same seeds, so seed s of
one is paired with seed s of the other; independent draws otherwise) and, for every measurement, the
items (windows, records, questions) with replacement, the *same* items for both arms (and for the dense
and pruned references). The 95% interval is the 2.5th to 97.5th percentile of the replicated difference.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from .evaluate import MEASUREMENTS
from .evaluate.base import Metric

BOOTSTRAP_REPLICATES = 2000


def _component(entry: dict, part: tuple[str, str, str, str | None]) -> tuple[np.ndarray, np.ndarray]:
    """(numerator, denominator) item arrays of one component of one model."""
    key, name, numerator, denominator = part
    items = entry[key][name]["items"]
    values = np.asarray(items[numerator], dtype=np.float64)
    return values, (np.ones_like(values) if denominator is None else np.asarray(items[denominator], dtype=np.float64))


def metrics_of(results: dict) -> list[Metric]:
    """The comparable figures of every registered measurement that ``results`` holds per-item values for."""

    return [metric for _, measurement in MEASUREMENTS.items() for metric in measurement.metrics(results)]


def _value(metric: Metric, num: list[np.ndarray], den: list[np.ndarray], ref: dict | None = None) -> np.ndarray:
    """Metric value(s) from per-component sums (arrays broadcast over bootstrap replicates)."""
    value = metric.figure([n / d for n, d in zip(num, den)])
    if not metric.share_of_gap:
        return value
    return (ref["pruned"] - value) / (ref["pruned"] - ref["dense"])


def _difference(metric: Any, values: list[float], base_values: list[float], arm_boot: np.ndarray,
                base_boot: np.ndarray, paired: bool, rng: np.random.Generator) -> dict[str, Any]:
    """The arm's mean minus the baseline's, with the 95% interval of the bootstrap that resamples items (the
    replicates' rows, shared by every model) and seeds (paired when both arms ran the same seeds)."""
    replicates = arm_boot.shape[0]
    arm_draw = rng.integers(0, arm_boot.shape[1], size=(replicates, arm_boot.shape[1]))
    base_draw = arm_draw if paired else rng.integers(0, base_boot.shape[1], size=(replicates, base_boot.shape[1]))
    rows = np.arange(replicates)[:, None]
    diff = arm_boot[rows, arm_draw].mean(1) - base_boot[rows, base_draw].mean(1)
    low, high = (float(v) for v in np.percentile(diff, [2.5, 97.5]))
    delta = float(np.mean(values) - np.mean(base_values))
    verdict = ("better" if (low > 0 if metric.higher_is_better else high < 0)
               else "worse" if (high < 0 if metric.higher_is_better else low > 0) else "within noise")
    return {"diff": delta, "ci_low": low, "ci_high": high, "paired_seeds": paired, "verdict": verdict,
            "improvement": delta if metric.higher_is_better else -delta}


def compare_arms(results: dict, arms: dict[str, dict[int, str]], baseline: str, references: dict[str, str] | None = None,
                 replicates: int = BOOTSTRAP_REPLICATES, seed: int = 0) -> dict[str, Any]:
    """Per arm and metric: mean and std over seeds, and the paired-bootstrap difference against ``baseline``.

    ``arms``: arm -> {seed: model label in results}; ``references``: {"dense": label, "pruned": label} for
    the gap-recovered metric.
    """
    if baseline not in arms:
        raise ValueError(f"baseline arm '{baseline}' is not among the arms ({', '.join(arms)})")
    models = results["models"]
    metrics = [m for m in metrics_of(results) if not m.share_of_gap or references]
    rng = np.random.default_rng(seed)
    out: dict[str, Any] = {"baseline": baseline, "replicates": replicates, "metrics": [m.name for m in metrics],
                           "higher_is_better": {m.name: m.higher_is_better for m in metrics}, "arms": {}}
    for arm in arms:
        out["arms"][arm] = {"seeds": sorted(arms[arm]), "metrics": {}}
    for metric in metrics:
        parts = {label: [_component(models[label], p) for p in metric.parts]
                 for seeds in arms.values() for label in seeds.values()}
        ref_parts = {k: [_component(models[v], p) for p in metric.parts] for k, v in (references or {}).items()}
        sizes = [len(c[0]) for c in next(iter(parts.values()))]

        def full(components, ref=None, metric=metric):
            return float(_value(metric, [n.sum() for n, _ in components], [d.sum() for _, d in components], ref))

        plain = replace(metric, share_of_gap=False)  # the references' own figures
        ref_full = {k: float(_value(plain, [n.sum() for n, _ in c], [d.sum() for _, d in c]))
                    for k, c in ref_parts.items()}
        # one multinomial weight matrix per component: the same resampled items for every model
        weights = [rng.multinomial(n, np.full(n, 1.0 / n), size=replicates).astype(np.float64) for n in sizes]

        def replicated(components, weights=weights):
            return ([w @ n for w, (n, _) in zip(weights, components)], [w @ d for w, (_, d) in zip(weights, components)])

        ref_boot = None
        if metric.share_of_gap:
            ref_boot = {k: _value(plain, *replicated(c)) for k, c in ref_parts.items()}
        boot = {label: _value(metric, *replicated(c), ref_boot) for label, c in parts.items()}
        base_seeds = sorted(arms[baseline])
        for arm, seeds in arms.items():
            labels = [seeds[s] for s in sorted(seeds)]
            values = [full(parts[label], ref_full) for label in labels]
            entry = {"mean": float(np.mean(values)), "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
                     "per_seed": dict(zip(sorted(seeds), values))}
            if arm != baseline:
                base_values = [full(parts[arms[baseline][s]], ref_full) for s in base_seeds]
                base_boot = np.stack([boot[arms[baseline][s]] for s in base_seeds], 1)
                entry.update(_difference(metric, values, base_values, np.stack([boot[label] for label in labels], 1),
                                         base_boot, sorted(seeds) == base_seeds, rng))
            out["arms"][arm]["metrics"][metric.name] = entry
    return out


HEADLINE_STEM = "comparison"  # the comparison against the first (headline) baseline


def comparison_stem(baseline: str, headline: bool) -> str:
    """File stem of the comparison against ``baseline``: :data:`HEADLINE_STEM` for the headline baseline."""
    return HEADLINE_STEM if headline else f"{HEADLINE_STEM}-vs-{baseline}"


def comparison_files(directory: Path, suffix: str) -> list[Path]:
    """The comparisons written in ``directory`` (``.json`` or ``.md``): the headline first, then one per
    further baseline."""
    headline = directory / f"{HEADLINE_STEM}{suffix}"
    return [p for p in [headline, *sorted(directory.glob(f"{HEADLINE_STEM}-vs-*{suffix}"))] if p.exists()]


def comparison_cells(comparison: dict, costs: dict[str, Any] | None = None
                     ) -> tuple[list[str], list[list[list[str]]], str]:
    """The comparison as a table: its header, one row per arm whose cells are lists of lines (mean ± std over
    seeds; the difference against the baseline [95% CI]), and the note that explains it."""
    metrics = comparison["metrics"]
    header = ["arm", "seeds", *metrics] + (["selection cost"] if costs else [])
    rows = []
    for arm, data in comparison["arms"].items():
        cells = [[arm], [",".join(map(str, data["seeds"]))]]
        for name in metrics:
            m = data["metrics"][name]
            lines = [f"{m['mean']:.4g}" + (f" ± {m['std']:.2g}" if m.get("std") is not None else "")]
            if "diff" in m:
                mark = {"better": " ✓", "worse": " ✗"}.get(m["verdict"], "")
                lines.append(f"Δ {m['diff']:+.3g} [{m['ci_low']:+.3g}, {m['ci_high']:+.3g}]{mark}")
            cells.append(lines)
        if costs:
            cells.append([_cost_text(costs.get(arm))])
        rows.append(cells)
    arrows = ", ".join(f"{m} {'↑' if comparison['higher_is_better'][m] else '↓'}" for m in metrics)
    note = (f"Mean ± std over seeds; Δ = arm − {comparison['baseline']} with its 95% paired-bootstrap interval "
            f"({comparison['replicates']} replicates over seeds and items); ✓ better, ✗ worse beyond noise. "
            f"Better is {arrows}.")
    return header, rows, note


def comparison_table(comparison: dict, costs: dict[str, Any] | None = None) -> str:
    """Markdown: per arm and metric, mean +/- std over seeds, and the difference vs the baseline [95% CI]."""
    header, rows, note = comparison_cells(comparison, costs)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join("<br>".join(cell) for cell in row) + " |" for row in rows]
    return "\n".join([*lines, "", note]) + "\n"


def _cost_text(cost: dict | None) -> str:
    if not cost:
        return ""
    tokens = cost.get("model_forward_tokens") or 0
    return f"{tokens / 1e6:.2f}M model tokens, {cost.get('seconds') or 0:.0f} s"
