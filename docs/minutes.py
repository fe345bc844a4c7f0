"""Draw KL removed against minutes for every arm of ``paser run`` directories (the losing arms too), with the goal's
line: where each lever's fidelity comes from and what it costs.

    python docs/minutes.py runs/levers-5 --goal 0.30 --out docs/minutes.png

For each arm and seed: the share of the pruned model's KL removed on WikiText-2 (the run's
``evaluate/comparison*.json``) and the recovery's minutes split into generating the original's tokens, the block
pass and the end-to-end stage (``recover/ARM/sSEED/train_log.json``). Prints the points as a markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

METRIC = "KL removed wikitext2"


def minutes(train_log: dict) -> dict[str, float]:
    """A recovery's minutes: generation, block pass, end-to-end stage (each 0 where it did not run)."""
    blockwise = train_log.get("blockwise") or (train_log if train_log.get("method") == "blockwise" else None)
    generated = ((blockwise or train_log).get("targets") or {}).get("generated") or {}
    block = blockwise["seconds"] if blockwise else 0.0
    end_to_end = train_log["seconds"] - block if train_log.get("method") != "blockwise" else 0.0
    split = {"generation": generated.get("seconds", 0.0), "blocks": block, "end_to_end": end_to_end}
    return {k: round(v / 60, 2) for k, v in split.items()}


def points(run: Path) -> list[dict]:
    rows = []
    for path in sorted((run / "evaluate").glob("comparison*.json")):
        comparison = json.loads(path.read_text())
        metric = next(m for m in comparison["metrics"] if m.startswith(METRIC))
        for arm, entry in comparison["arms"].items():
            for seed, value in entry["metrics"][metric]["per_seed"].items():
                log = json.loads((run / "recover" / arm / f"s{seed}" / "train_log.json").read_text())
                split = minutes(log)
                rows.append({"run": run.name, "arm": arm, "seed": int(seed), "kl_removed": value, **split,
                             "minutes": round(sum(split.values()), 2), "peak_gb": log.get("peak_memory_gb")})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--goal", type=float, help="the goal's share of the KL removed (a dashed line)")
    parser.add_argument("--title", default="Wanda 50%: KL removed on WikiText-2 against recovery minutes (2 cores)")
    parser.add_argument("--out", type=Path, default=Path("docs/minutes.png"))
    args = parser.parse_args()
    rows = [row for run in args.runs for row in points(run)]
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for row in rows:
        ax.scatter(row["minutes"], row["kl_removed"], s=28)
        ax.annotate(row["arm"], (row["minutes"], row["kl_removed"]), fontsize=7, xytext=(4, 2),
                    textcoords="offset points")
    if args.goal:
        ax.axhline(args.goal, linestyle="--", color="grey", linewidth=1)
        ax.annotate(f"goal {args.goal:g}", (0, args.goal), fontsize=8, xytext=(2, 3), textcoords="offset points")
    ax.set_xlabel("recovery minutes (generation + block pass + end-to-end)")
    ax.set_ylabel("share of the KL pruning added, removed")
    ax.set_title(args.title, fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(args.out, dpi=130)
    print("| run | arm | seed | KL removed | generation | blocks | end-to-end | minutes | peak GB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['run']} | {r['arm']} | {r['seed']} | {r['kl_removed']:.3f} | {r['generation']} | {r['blocks']} | "
              f"{r['end_to_end']} | {r['minutes']} | {r['peak_gb']} |")


if __name__ == "__main__":
    main()
