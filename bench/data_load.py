"""Streaming load of a large JSONL file: prints one JSON line with records, seconds and memory.

Writes ``--n`` Alpaca records to a temporary JSONL file, then loads it with ``paser.load_records``
in a fresh process state and reports the peak RSS growth next to the in-memory size of the records
themselves (``Record`` objects and their strings), so the overhead of reading is visible.
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def deep_size(records) -> float:
    total = 0
    for r in records:
        total += sys.getsizeof(r) + sys.getsizeof(r.raw) + sum(sys.getsizeof(v) for v in r.raw.values())
    return total / 1024**2


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=1_000_000)
    args = parser.parse_args()
    path = os.path.join(tempfile.mkdtemp(), "big.jsonl")
    with open(path, "w") as f:
        for i in range(args.n):
            f.write(json.dumps({"instruction": f"Add {i} and {i + 1}.", "input": "", "output": str(2 * i + 1),
                                "source": "synthetic"}) + "\n")
    from paser.data import load_records

    before = rss_mb()
    t0 = time.perf_counter()
    records = load_records(path)
    seconds = time.perf_counter() - t0
    after_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"records": len(records), "file_mb": round(os.path.getsize(path) / 1024**2, 1),
                      "seconds": round(seconds, 1), "rss_growth_mb": round(rss_mb() - before, 1),
                      "peak_rss_mb": round(after_peak, 1), "records_themselves_mb": round(deep_size(records), 1)}))
    os.unlink(path)


if __name__ == "__main__":
    main()
