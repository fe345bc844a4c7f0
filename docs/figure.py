"""Draw the README's results figure from runs' ``comparison.json`` files (``paser run``'s evaluate stage).

    python docs/figure.py runs/tokens/evaluate/comparison.json --title "Wanda 50%, 20% of the tokens" \
        --out docs/results.png

One row per comparison file (a testbed), two panels: the share of the pruned model's KL removed on WikiText-2
(higher is better) and WikiText-2 perplexity (lower is better). Each arm is its mean over seeds with every seed
as a dot; the text beside it is its difference from the comparison's baseline with the 95% paired interval.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PANELS = (("KL removed wikitext2", "share of the pruned model's KL removed (WikiText-2)"),
          ("ppl wikitext2", "WikiText-2 perplexity (lower is better)"))


def metric_named(comparison: dict, prefix: str) -> str:
    names = [m for m in comparison["metrics"] if m.startswith(prefix)]
    if not names:
        raise SystemExit(f"no metric starting {prefix!r} in the comparison ({', '.join(comparison['metrics'])})")
    return names[0]


def draw_panel(ax, comparison: dict, metric: str, label: str, arms: list[str]) -> None:
    for row, arm in enumerate(arms):
        entry = comparison["arms"][arm]["metrics"][metric]
        seeds = list(entry["per_seed"].values())
        ax.scatter(seeds, [row] * len(seeds), s=14, color="0.55", zorder=2)
        ax.scatter([entry["mean"]], [row], s=60, color="C0" if arm != comparison["baseline"] else "0.2", zorder=3)
        if "diff" in entry:
            digits = 3 if abs(entry["mean"]) < 1 else 2
            ax.annotate(f"Δ {entry['diff']:+.{digits}f} [{entry['ci_low']:+.{digits}f}, {entry['ci_high']:+.{digits}f}]",
                        (entry["mean"], row), xytext=(8, 6), textcoords="offset points", fontsize=8)
    ax.margins(x=0.25)
    ax.set_yticks(range(len(arms)), arms)
    ax.set_ylim(-0.6, len(arms) - 0.4)
    ax.set_xlabel(label)
    ax.grid(axis="x", alpha=0.3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("comparisons", nargs="+", type=Path, help="comparison.json files, one per testbed")
    parser.add_argument("--title", action="append", default=[], help="one per comparison file, in order")
    parser.add_argument("--out", type=Path, default=Path("docs/results.png"))
    args = parser.parse_args()
    comparisons = [json.loads(p.read_text()) for p in args.comparisons]
    titles = args.title + [str(p.parent.parent.name) for p in args.comparisons[len(args.title):]]
    arms_per_row = [sorted(c["arms"], key=lambda a: (a != c["baseline"], a)) for c in comparisons]
    height = sum(0.45 * len(arms) + 1.3 for arms in arms_per_row)
    fig, axes = plt.subplots(len(comparisons), 2, figsize=(12, height), squeeze=False)
    for row, (comparison, arms, title) in enumerate(zip(comparisons, arms_per_row, titles)):
        for col, (prefix, label) in enumerate(PANELS):
            draw_panel(axes[row][col], comparison, metric_named(comparison, prefix), label, arms)
            if col:
                axes[row][col].set_yticklabels([])
        axes[row][0].set_title(f"{title} (Δ against {comparison['baseline']}, 95% paired interval)",
                               loc="left", fontsize=10)
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(json.dumps({"figure": str(args.out), "rows": len(comparisons)}))


if __name__ == "__main__":
    main()
