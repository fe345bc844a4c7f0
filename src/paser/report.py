"""``OUT/report.html``: one self-contained page (images inline) on what was selected, why, and what it bought.

Built only from the files a ``paser run`` leaves (``run.json``, ``select/<method>/``, ``recover/<method>/``,
``evaluate/``), so ``paser report OUT`` rebuilds it at any time; parts whose files are missing are
named as missing instead of failing the whole page.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import re
from pathlib import Path
from typing import Any

from .cache import write_text
from .compare import comparison_cells, comparison_files
from .errors import ConfigError
from .evaluate import table_rows

# matplotlib and pandas are imported when a report is drawn, not when paser is imported.

log = logging.getLogger(__name__)

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2rem auto; max-width: 1100px; color: #222; }
h1 { margin-bottom: 0.2rem; } h2 { margin-top: 2.2rem; border-bottom: 1px solid #ddd; padding-bottom: 0.2rem; }
table { border-collapse: collapse; margin: 0.8rem 0; font-size: 0.85rem; }
th, td { border: 1px solid #ccc; padding: 0.25rem 0.4rem; text-align: right; }
th { background: #f2f2f2; } td.text, th.text { text-align: left; }
img { max-width: 100%; } .missing { color: #a33; } .note { color: #555; font-size: 0.9rem; }
.wide { overflow-x: auto; max-width: 100%; } .headline { font-size: 1.05rem; }
"""
HEADLINE_PREFIX = "KL removed"  # the headline metrics: fidelity to the original (the share of pruning's KL removed)
FOREST_COLUMNS = 3


def _figure_html(fig: Any, alt: str) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _table(header: list[str], rows: list[list[Any]], text_columns: int = 1) -> str:
    return _lines_table(header, [[[str(value)] for value in row] for row in rows], text_columns)


def _lines_table(header: list[str], rows: list[list[list[str]]], text_columns: int = 1) -> str:
    """A table whose cells hold one or more lines each (escaped, then joined by real line breaks); the first
    ``text_columns`` are left-aligned text."""
    def cell(tag: str, i: int, lines: list[str]) -> str:
        cls = ' class="text"' if i < text_columns else ""
        text = "<br>".join(html.escape(line) for line in lines)
        if tag == "th" or i < text_columns:  # names like "KL to original wikitext2_raw_test.txt" may wrap at _ and .
            text = re.sub(r"(_|\.(?=[A-Za-z]))", r"\1<wbr>", text)
        return f"<{tag}{cls}>{text}</{tag}>"

    head = "".join(cell("th", i, [h]) for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(cell("td", i, lines) for i, lines in enumerate(row)) + "</tr>" for row in rows)
    return f"<div class='wide'><table><tr>{head}</tr>{body}</table></div>"


def _read_json(path: Path) -> Any | None:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return None


def _missing(what: str) -> str:
    return f'<p class="missing">{html.escape(what)} not available.</p>'


# ----------------------------------------------------------------------------------------- sections
def _selection_section(run_dir: Path, methods: list[str], paser_key: str = "paser") -> str:
    import pandas as pd

    paser_dir = run_dir / "select" / paser_key
    summary = _read_json(paser_dir / "selection.json")
    scores_path = paser_dir / "scores.parquet"
    if summary and "clusters" in summary and scores_path.exists():
        parts = _cluster_parts(summary, pd.read_parquet(scores_path))
    else:
        parts = ["<h2>Clusters</h2>" + _missing(f"PASER selection (select/{paser_key})")]
    return "".join(parts) + _jsd_part(run_dir, methods)


def _cluster_parts(summary: dict, table: Any) -> list[str]:
    """PASER's clusters in diffusion space, each cluster's degradation, budget and picks, and what CCG rejected."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7.5, 5.5))
    cmap = plt.get_cmap("tab10" if summary["k"] <= 10 else "tab20")
    for c in sorted(table["cluster"].unique()):
        members = table[table["cluster"] == c]
        ax.scatter(members["map_x"], members["map_y"], s=9, color=cmap(c % cmap.N), alpha=0.55, label=f"{c}")
    chosen = table[table["selected"]]
    ax.scatter(chosen["map_x"], chosen["map_y"], s=22, facecolors="none", edgecolors="black", linewidths=0.7,
               label="selected")
    ax.set_title(f"Clusters (K = {summary['k']}) in diffusion space, 2 principal components")
    ax.legend(fontsize=7, ncol=2, loc="best", markerscale=1.5, title="cluster")
    parts = ["<h2>Clusters</h2>" + _figure_html(fig, "cluster map")]

    clusters = summary["clusters"]
    ids = [c["cluster"] for c in clusters]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    left.bar(ids, [c["cds"] for c in clusters], color="#4c72b0")
    left.set_title("Capability degradation score (mean JSD) per cluster")
    left.set_xlabel("cluster")
    width = 0.4
    right.bar(np.array(ids) - width / 2, [c["budget"] for c in clusters], width, label="budget", color="#dd8452")
    right.bar(np.array(ids) + width / 2, [c["selected"] for c in clusters], width, label="selected", color="#55a868")
    right.set_title(f"Budget ('{summary['allocation']}' rule) and selection per cluster")
    right.set_xlabel("cluster")
    right.legend()
    rows = [[c["cluster"], c["size"], f"{c['cds']:.4f}", c["budget"], c["selected"], c["rejected"]] for c in clusters]
    parts.append("<h2>Degradation and budget</h2>" + _figure_html(fig, "CDS and budget per cluster")
                 + _table(["cluster", "size", "CDS", "budget", "selected", "CCG rejected"], rows))

    ccg = summary.get("ccg", {})
    examples = [[c["cluster"], e["instruction"], e["conflict"]] for c in clusters for e in c.get("rejection_examples", [])]
    text = (f"<p>Concept-consistency filter {'on' if ccg.get('enabled') else 'off'}: "
            f"{ccg.get('rejected', 0)} candidates rejected, {ccg.get('admitted_despite_conflict', 0)} admitted "
            f"despite a conflict to reach the budget; the graph holds {ccg.get('graph_nodes', 0)} concepts "
            f"and {ccg.get('graph_edges', 0)} co-occurrence edges.</p>")
    parts.append("<h2>What the concept-consistency filter rejected</h2>" + text
                 + (_table(["cluster", "instruction", "why"], examples, text_columns=3) if examples else ""))
    return parts


def _jsd_part(run_dir: Path, methods: list[str]) -> str:
    """The JSD of all records against that of each method's picks."""
    import matplotlib.pyplot as plt
    import pandas as pd

    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    drawn = False
    for method in methods:
        path = run_dir / "select" / method / "scores.parquet"
        table = pd.read_parquet(path) if path.exists() else None
        if table is None or "jsd" not in table:
            continue
        if not drawn:
            ax.hist(table["jsd"], bins=40, density=True, alpha=0.35, color="gray", label="all records")
            drawn = True
        ax.hist(table.loc[table["selected"], "jsd"], bins=40, density=True, histtype="step", linewidth=1.6,
                label=f"selected by {method}")
    if not drawn:
        plt.close(fig)
        return "<h2>JSD distribution</h2>" + _missing("scores")
    ax.set_xlabel("JSD between the original and pruned next-token distributions (mean over response)")
    ax.set_ylabel("density")
    ax.legend()
    return "<h2>JSD distribution</h2>" + _figure_html(fig, "JSD distribution")


def _training_section(run_dir: Path, methods: list[str]) -> str:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 3.8))
    rows = []
    for method in methods:
        log_data = _read_json(run_dir / "recover" / method / "train_log.json")
        if not log_data or not log_data.get("loss_curve"):
            continue
        curve = log_data["loss_curve"]
        ax.plot([p["step"] for p in curve], [p["loss"] for p in curve], marker="o", markersize=3, label=method)
        rows.append([method, log_data["records"], log_data["steps"], f"{curve[0]['loss']:.3f}",
                     f"{curve[-1]['loss']:.3f}", f"{log_data['seconds']:.0f}", log_data["tokens_per_s"]])
    if not rows:
        plt.close(fig)
        return "<h2>Recovery training</h2>" + _missing("train logs")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("training loss (response tokens)")
    ax.legend()
    return ("<h2>Recovery training</h2>" + _figure_html(fig, "training loss curves")
            + _table(["selection", "records", "steps", "first loss", "last loss", "seconds", "tokens/s"], rows))


def _evaluation_section(run_dir: Path, run: dict[str, Any] | None = None) -> str:
    import matplotlib.pyplot as plt
    import numpy as np

    results = _read_json(run_dir / "evaluate" / "results.json")
    if not results:
        return "<h2>Evaluation</h2>" + _missing("evaluation results")
    header, rows = table_rows(results)
    tasks = (f"zero-shot tasks {', '.join(results['tasks'])} from {html.escape(str(results['task_source']))} "
             f"(limit {results['limit']})" if results.get("tasks") else "no zero-shot tasks")
    requested = ((run or {}).get("config") or {}).get("evaluate") or {}
    if requested.get("tasks") and not results.get("tasks"):  # the run asked for tasks whose folder was absent
        tasks = (f"zero-shot tasks {', '.join(requested['tasks'])} skipped: "
                 f"{html.escape(str(requested.get('task_dir')))} not found")
    skipped_texts = [path for path in requested.get("ppl") or [] if path not in (results.get("ppl_files") or [])]
    if skipped_texts:  # asked for, absent, and skipped (skip_missing_ppl)
        tasks += f"; perplexity text(s) {html.escape(', '.join(map(str, skipped_texts)))} skipped: not found"
    notes = f"<p class='note'>dtype {results['dtype']}; {tasks}; {results['seconds']:.0f} s.</p>"
    parts = ["<h2>Evaluation</h2>", _table(header, rows), notes]
    models = results["models"]
    if results.get("demo_skills"):
        skills = [s for s in next(iter(models.values()))["demo_skills"] if s != "mean"]
        fig, ax = plt.subplots(figsize=(11, 4))
        width = 0.8 / len(models)
        x = np.arange(len(skills))
        for i, (label, entry) in enumerate(models.items()):
            ax.bar(x + i * width - 0.4 + width / 2, [100 * entry["demo_skills"][s]["acc"] for s in skills], width,
                   label=label)
        ax.set_xticks(x, skills, rotation=25, ha="right")
        ax.set_ylabel("exact match (%)")
        ax.set_title("Held-out demo skills")
        ax.legend(fontsize=8)
        parts.append(_figure_html(fig, "per-skill accuracy"))
    return "".join(parts)


def _comparisons(run_dir: Path) -> list[dict]:
    return [c for c in map(_read_json, comparison_files(run_dir / "evaluate", ".json")) if c]


def _comparison_section(comparisons: list[dict]) -> str:
    """Per baseline (the headline one first): a forest plot of every arm's difference against it, with its
    95% interval, per metric, and the comparison table."""
    if not comparisons:
        return ""
    return "<h2>Methods compared</h2>" + "".join(_comparison_html(c) for c in comparisons)


def _forest(comparison: dict, metrics: list[str], columns: int, title: str) -> Any:
    """One panel per metric (``columns`` to a row): each arm's difference against the baseline, 95% interval."""
    import matplotlib.pyplot as plt

    arms = [a for a in comparison["arms"] if a != comparison["baseline"]]
    columns = min(columns, len(metrics))
    rows = -(-len(metrics) // columns)
    height = rows * (0.5 * len(arms) + 1.9) + 0.4
    fig, axes = plt.subplots(rows, columns, figsize=(11, height), squeeze=False, sharey=True)
    for ax in axes.flat[len(metrics):]:
        ax.set_visible(False)
    for i, (ax, name) in enumerate(zip(axes.flat, metrics)):
        for y, arm in enumerate(arms):
            m = comparison["arms"][arm]["metrics"][name]
            color = {"better": "#2a9d3a", "worse": "#c0392b"}.get(m["verdict"], "#555555")
            ax.errorbar(m["diff"], y, xerr=[[m["diff"] - m["ci_low"]], [m["ci_high"] - m["diff"]]], fmt="o",
                        color=color, capsize=3)
        ax.axvline(0, color="black", linewidth=0.8)
        better = "higher is better" if comparison["higher_is_better"][name] else "lower is better"
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(f"arm − {comparison['baseline']} ({better})", fontsize=8)
        ax.set_yticks(range(len(arms)), arms)
        ax.set_ylim(-0.6, len(arms) - 0.4)
        ax.tick_params(labelsize=8, labelleft=i % columns == 0)  # the arms' names once per row
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.35 / height))  # room for the title above the panels
    return fig


def _comparison_html(comparison: dict) -> str:
    baseline = comparison["baseline"]
    fig = _forest(comparison, comparison["metrics"], FOREST_COLUMNS,
                  f"Difference against {baseline} (95% paired bootstrap over seeds and items)")
    header, rows, note = comparison_cells(comparison, comparison.get("costs"))
    if len(header) > len(rows) + 1:
        header, rows = _transposed(header, rows)
    return (f"<h3>Against {html.escape(baseline)}</h3>"
            + _figure_html(fig, f"forest plot of differences against {baseline}")
            + _lines_table(header, rows) + f"<p class='note'>{html.escape(note)}</p>")


def _transposed(header: list[str], rows: list[list[list[str]]]) -> tuple[list[str], list[list[list[str]]]]:
    """Arms as columns and metrics as rows: a comparison has a few arms and many metrics, and so fits the page."""
    columns = [[[name] for name in header], *rows]
    return ([" ".join(column[0]) for column in columns],
            [[column[i] for column in columns] for i in range(1, len(header))])


def _headline_section(comparisons: list[dict]) -> str:
    """The answer first: every arm against the headline baseline on fidelity to the original, in one chart."""
    if not comparisons or len(comparisons[0]["arms"]) < 2:
        return ""
    comparison = comparisons[0]
    metrics = [m for m in comparison["metrics"] if m.startswith(HEADLINE_PREFIX)] or comparison["metrics"][:1]
    baseline = comparison["baseline"]
    lines = []
    for arm, data in comparison["arms"].items():
        if arm == baseline:
            continue
        parts = []
        for name in metrics:
            m, base = data["metrics"][name], comparison["arms"][baseline]["metrics"][name]
            parts.append(f"{name}: {m['mean']:.3g} against {base['mean']:.3g}, "
                         f"Δ {m['diff']:+.3g} [{m['ci_low']:+.3g}, {m['ci_high']:+.3g}]")
        lines.append(f"<li><b>{html.escape(arm)}</b>: {html.escape('; '.join(parts))}</li>")
    fig = _forest(comparison, metrics, len(metrics), f"Fidelity to the original: each arm against {baseline}")
    return ("<h2>Headline</h2>" + _figure_html(fig, f"headline: fidelity to the original against {baseline}")
            + f"<ul class='headline'>{''.join(lines)}</ul>")


def _stages_section(run: dict | None) -> str:
    if not run:
        return "<h2>Stages</h2>" + _missing("run.json")
    rows = []
    for stage in run["stages"]:
        made = (stage.get("earlier_run") or {}) if stage["skipped"] else stage
        status = f"skipped (up to date since {made.get('finished') or '?'})" if stage["skipped"] else "ran"
        rows.append([stage["stage"], status, "" if made.get("seconds") is None else f"{made['seconds']:.1f}",
                     "" if made.get("peak_rss_gb") is None else f"{made['peak_rss_gb']:.2f}",
                     ", ".join(f"{k}: {v}" for k, v in stage["cache"].items())])
    header = ["stage", "status", "seconds (when it ran)", "peak RSS GB", "cache"]
    return ("<h2>Stages</h2>" + _table(header, rows, text_columns=2)
            + f"<p class='note'>Total {run['seconds']:.1f} s.</p>")


def build_report(run_dir: str | Path) -> Path:
    """Write ``run_dir/report.html`` from the run's files; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ConfigError(f"run directory not found: {run_dir}")
    run = _read_json(run_dir / "run.json")
    if run is None and not (run_dir / "select").is_dir():
        raise ConfigError(f"{run_dir} holds no paser run (no run.json, no select/)")
    arms = (run or {}).get("arms") or []
    methods = [a["key"] for a in arms] or sorted(p.name for p in (run_dir / "select").iterdir() if p.is_dir())
    paser_key = next((a["key"] for a in arms if a["method"] == "paser"), "paser")
    config = (run or {}).get("config", {})
    title = f"paser run: {html.escape(str(config.get('model', run_dir.name)))}"
    prune = config.get("prune") or {}
    subtitle = (f"pruned with {prune.get('method')} at {prune.get('sparsity')}" if prune
                else f"pruned model {config.get('pruned')}")
    select = config.get("select", {})
    comparisons = _comparisons(run_dir)
    body = [f"<h1>{title}</h1>",
            f"<p class='note'>{html.escape(subtitle)}; data {html.escape(str(config.get('data', {}).get('source')))}; "
            f"arms {', '.join(methods)} at budget {select.get('budget') or select.get('budget_tokens')}; run directory "
            f"{html.escape(str(run_dir.resolve()))}.</p>",
            _headline_section(comparisons), _evaluation_section(run_dir, run), _comparison_section(comparisons),
            _selection_section(run_dir, methods, paser_key),
            _training_section(run_dir, methods),
            _stages_section(run)]
    page = (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style>"
            f"</head><body>{''.join(body)}</body></html>")
    path = run_dir / "report.html"
    write_text(path, page)
    return path
