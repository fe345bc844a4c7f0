"""``comparison.json`` / ``.md`` of a run: every arm against each baseline (see :mod:`paser.compare`)."""

from __future__ import annotations

import json
from pathlib import Path

from ..cache import write_json, write_text
from ..compare import compare_arms, comparison_files, comparison_stem, comparison_table


def read_cost(directory: Path) -> dict:
    try:
        return json.loads((directory / "selection.json").read_text()).get("cost", {})
    except (FileNotFoundError, ValueError):
        return {}


def mean_cost(costs: list[dict]) -> dict:
    keys = {k for c in costs for k in c}
    return {k: sum(c.get(k) or 0 for c in costs) / max(len(costs), 1) for k in keys}


def write_comparison(directory: Path, arm_labels: dict[str, dict[int, str]], baselines: list[str],
                     references: dict[str, str], costs: dict[str, dict]) -> dict | None:
    """``comparison.json`` and ``comparison.md`` beside the evaluation results (see :mod:`paser.compare`),
    against the first baseline; ``comparison-vs-<arm>.json`` / ``.md`` against each further one. Returns the
    headline comparison. Every earlier comparison file is removed first, so none outlives its run."""

    results = json.loads((directory / "results.json").read_text())
    for stale in comparison_files(directory, ".json") + comparison_files(directory, ".md"):
        stale.unlink()
    headline = None
    for i, baseline in enumerate(baselines):
        comparison = compare_arms(results, arm_labels, baseline, references)
        if not comparison["metrics"]:
            return None
        comparison["costs"] = costs
        stem = comparison_stem(baseline, headline=i == 0)
        write_json(directory / f"{stem}.json", comparison)
        write_text(directory / f"{stem}.md", comparison_table(comparison, costs))
        headline = headline or comparison
    return headline


