"""Draw the tokens-to-fidelity curve from ``paser run`` directories that differ only in the token budget.

    python docs/curve.py runs/tokens-w5 runs/tokens runs/tokens-w50 --label "end-to-end KD" --label "block-wise, then KD" \
        --arms random-kd-lr1e-3,blockwise-lr1e-3-kd-lr1e-3 --out docs/curve.png

For each run and arm: the training tokens its selection kept (``select/ARM/sSEED/selection.json``), the share of
the pruned model's KL removed on WikiText-2 (the run's ``evaluate/comparison*.json``) and the recovery's wall
time (``recover/ARM/sSEED/train_log.json``: both steps of a stacked method, even where one was reused). Every
seed is a dot; the line joins the means over the seeds a budget has. Prints the points as a markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METRIC = "KL removed wikitext2"


def comparison_with(run: Path, arms: list[str]) -> dict:
    for path in sorted((run / "evaluate").glob("comparison*.json")):
        comparison = json.loads(path.read_text())
        if all(arm in comparison["arms"] for arm in arms):
            return comparison
    raise SystemExit(f"{run}: no evaluate/comparison*.json holds every arm of {arms}")


def points(run: Path, arm: str, comparison: dict) -> list[dict]:
    metric = next(m for m in comparison["metrics"] if m.startswith(METRIC))
    found = []
    for seed, value in comparison["arms"][arm]["metrics"][metric]["per_seed"].items():
        selection = json.loads((run / "select" / arm / f"s{seed}" / "selection.json").read_text())
        train_log = json.loads((run / "recover" / arm / f"s{seed}" / "train_log.json").read_text())
        found.append({"arm": arm, "seed": int(seed), "tokens": selection["tokens"]["selected"],
                      "share": selection["tokens"]["budget"] / selection["tokens"]["pool"], "kl_removed": value,
                      "minutes": train_log["seconds"] / 60})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--arms", required=True, help="comma-separated arm names, one line each")
    parser.add_argument("--label", action="append", help="legend label, one per arm in order (default: the arm names)")
    parser.add_argument("--title", default="Wanda 50%: KL removed on WikiText-2 against training tokens")
    parser.add_argument("--out", type=Path, default=Path("docs/curve.png"))
    args = parser.parse_args()
    arms = args.arms.split(",")
    labels = args.label or arms
    rows = [p for run in args.runs for arm in arms for p in points(run, arm, comparison_with(run, arms))]

    fig, ax = plt.subplots(figsize=(7, 4.2))
    print("| arm | share of the slice's tokens | seeds | tokens | KL removed, WikiText-2 | recovery (min) |")
    print("|---|---|---|---|---|---|")
    ticks = []
    for colour, (arm, label) in enumerate(zip(arms, labels)):
        mine = [r for r in rows if r["arm"] == arm]
        ax.scatter([r["tokens"] for r in mine], [r["kl_removed"] for r in mine], s=14, color=f"C{colour}", alpha=0.5)
        means = []
        for share in sorted({round(r["share"], 3) for r in mine}):
            at = [r for r in mine if round(r["share"], 3) == share]
            mean = {key: statistics.mean(r[key] for r in at) for key in ("tokens", "kl_removed", "minutes")}
            means.append(mean)
            ticks.append(mean)
            print(f"| {arm} | {share:.0%} | {', '.join(str(r['seed']) for r in at)} | {mean['tokens']:,.0f} | "
                  f"{mean['kl_removed']:.3f} | {mean['minutes']:.1f} |")
            ax.annotate(f"{mean['minutes']:.0f} min", (mean["tokens"], mean["kl_removed"]), fontsize=7,
                        textcoords="offset points", xytext=(4, -10))
        ax.plot([m["tokens"] for m in means], [m["kl_removed"] for m in means], marker="o", color=f"C{colour}",
                label=label)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda x, _: f"{x:,.0f}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xticks(sorted({round(m["tokens"], -3) for m in ticks}))
    ax.set_xlabel("training tokens (log scale)")
    ax.set_ylabel("share of the pruned model's KL removed")
    ax.set_title(args.title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=130)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
