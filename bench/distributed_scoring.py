"""1 process vs N processes (torchrun, gloo on CPU) for ``paser select`` on the embedded model.

Prunes a 50% magnitude copy of the embedded SmolLM2-135M-Instruct (once, into ``--work``), then runs
``paser select`` on the first ``--n`` pool records with 1 process and with ``--processes`` processes, each
with its own empty cache, in fp32. Prints one JSON line: wall time of each, the largest absolute difference
of the per-record JSD and losses, and whether the same records were selected. On a 2-core CPU no speed-up
is expected (the processes share the cores); what it shows is that the results agree.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

POOL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "instruct" / "pool.jsonl"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(POOL))
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--work", default="/tmp/paser-bench-distributed")
    args = parser.parse_args()

    import pandas as pd

    from paser.models import DEFAULT_MODEL, load_model
    from paser.prune import magnitude_prune_

    work = Path(args.work)
    pruned = work / "pruned"
    if not (pruned / "config.json").exists():
        model, tokenizer = load_model(DEFAULT_MODEL, dtype="fp32")
        magnitude_prune_(model, 0.5).save_pretrained(pruned)
        tokenizer.save_pretrained(pruned)
    data = work / "data.jsonl"
    with open(args.data, encoding="utf-8") as src:
        data.write_text("".join(line for _, line in zip(range(args.n), src)))

    def select(processes: int) -> tuple[float, Path]:
        out = work / f"sel{processes}"
        env = {**os.environ, "PASER_CACHE": str(work / f"cache{processes}-{time.time_ns()}"), "HF_HUB_OFFLINE": "1"}
        launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--nproc-per-node", str(processes)]
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *launcher, "-m", "paser", "select", "--original", DEFAULT_MODEL, "--pruned",
                        str(pruned), "--data", str(data), "--budget", "0.25", "--method", "paser", "--out", str(out),
                        "--dtype", "fp32", "--no-ccg"], check=True, env=env, capture_output=True)
        return time.perf_counter() - t0, out

    (t1, one), (tn, many) = select(1), select(args.processes)
    a, b = pd.read_parquet(one / "scores.parquet"), pd.read_parquet(many / "scores.parquet")

    def picked(d: Path) -> list[int]:
        return [json.loads(line)["paser"]["index"] for line in (d / "selected.jsonl").open()]

    print(json.dumps({
        "records": len(a), "processes": args.processes, "seconds_1": round(t1, 1),
        f"seconds_{args.processes}": round(tn, 1),
        "max_abs_diff": {c: float((a[c] - b[c]).abs().max()) for c in ("jsd", "loss_original", "loss_pruned")},
        "same_selection": picked(one) == picked(many),
    }))


if __name__ == "__main__":
    main()
