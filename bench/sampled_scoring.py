"""Sampled vs exhaustive scoring on one pool: records scored, wall time, and how much the selections agree.

``--original`` and ``--pruned`` are the model pair, ``--data`` the pool (the study's 2,000-record slice:
``runs/study/data/slice.jsonl``). For each budget, runs ``paser select`` exhaustively (its scores usually come
from the cache, as in a study; its wall time is then that of the run that computed them, ``--exhaustive-seconds``)
and with ``--scoring sampled`` in a cache whose model scores start empty (embeddings and clusters are shared:
they cost the same in both modes). Prints one JSON line per budget: exact records scored, scoring seconds,
the predictor's held-out Spearman correlation, and the overlap of the two selections (share of the
exhaustive selection that the sampled one also picked).
"""

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--original", default="smollm2-135m-instruct")
    parser.add_argument("--pruned", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--budgets", default="0.05,0.2")
    parser.add_argument("--exhaustive-seconds", type=float, default=None)
    parser.add_argument("--max-length", type=int, default=256)
    args = parser.parse_args()

    from paser.cache import cache_root
    from paser.selection.select import SelectConfig, run_selection

    shared = cache_root()
    for budget in (float(b) for b in args.budgets.split(",")):
        # the recipe the study measured sampled scoring on (it predicts JSD, so IES ranks)
        common = dict(original=args.original, pruned=args.pruned, data=args.data, budget=budget, method="paser",
                      max_length=args.max_length, allocation="mass", within="sample", rank="ies")
        exhaustive = run_selection(SelectConfig(**common))
        with tempfile.TemporaryDirectory() as tmp:
            for part in ("embeddings", "clusters", "concepts"):
                if (shared / part).exists():
                    os.symlink(shared / part, Path(tmp) / part)
            t0 = time.perf_counter()
            sampled = run_selection(SelectConfig(**common, scoring="sampled", cache_dir=tmp))
            seconds = time.perf_counter() - t0
            shutil.rmtree(Path(tmp) / "scores", ignore_errors=True)
        info = sampled.summary["sampling"]
        both = set(exhaustive.indices) & set(sampled.indices)
        print(json.dumps({
            "budget": budget, "records": info["records"], "selected": len(sampled.indices),
            "exhaustive_scored": len(exhaustive.scores),
            "exhaustive_score_seconds": args.exhaustive_seconds,
            "sampled_scored": info["scored_exactly"], "sampled_pilot": info["pilot"], "sampled_confirmed": info["confirmed"],
            "sampled_score_seconds": round(info["pilot_seconds"] + info["confirm_seconds"], 1),
            "sampled_total_seconds": round(seconds, 1),
            "predictor_heldout_spearman": info["predictor_heldout_spearman"],
            "overlap_with_exhaustive": round(len(both) / len(exhaustive.indices), 3),
        }))


if __name__ == "__main__":
    main()
