"""Does JSD over a record's first N response tokens rank records like the JSD over the whole response?

Issue 15's cost goal (selection at most 25% of two recovery epochs) needs a cheaper exact confirmation than
scoring every candidate's whole response with both models. This measures the cheapest candidate: truncate
each response to its first N tokens before the two-model pass. On a seeded sample of ``--data`` it scores
every record once in full and once per N, and prints one JSON line per N: the share of the full pass's
model tokens it costs, the Spearman correlation of its JSD and of its IES (JSD / log cost, the full record's
cost as in selection) with the full ones, and how many of the full IES's top ``--top`` share of records it
also ranks in its top share (what a confirmation step needs it to get right).

    python bench/confirm_tokens.py --pruned runs/study-w20/prune --data runs/study-w20/data/slice.jsonl
"""

import argparse
import json
import time

import numpy as np


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--original", default="smollm2-135m-instruct")
    parser.add_argument("--pruned", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--sample", type=int, default=300)
    parser.add_argument("--tokens", default="16,32,64")
    parser.add_argument("--top", type=float, default=0.2, help="share of records whose agreement is reported")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from scipy.stats import spearmanr

    from paser.data import PromptFormatter, encode_records, load_records
    from paser.models import load_model, load_tokenizer
    from paser.selection.allocate import ies
    from paser.selection.score import ScoreConfig, score_records

    records = load_records(args.data)
    tokenizer = load_tokenizer(args.original)
    records, encoded = encode_records(PromptFormatter(tokenizer, max_length=args.max_length), records)
    rng = np.random.default_rng(args.seed)
    chosen = np.sort(rng.choice(len(encoded), size=min(args.sample, len(encoded)), replace=False))
    encoded = [encoded[i] for i in chosen]
    original, _ = load_model(args.original, dtype=args.dtype, tokenizer=False)
    pruned, _ = load_model(args.pruned, dtype=args.dtype, tokenizer=False)
    cost = np.array([len(e.input_ids) for e in encoded])

    def score(items):
        t0 = time.perf_counter()
        table = score_records(original, pruned, items, tokenizer.pad_token_id, ScoreConfig(), progress=False)
        return table["jsd"].to_numpy(), time.perf_counter() - t0

    full, full_seconds = score(encoded)
    full_ies = ies(full, cost)
    top = max(1, int(round(args.top * len(encoded))))
    full_top = set(np.argsort(-full_ies, kind="stable")[:top])
    for n in (int(t) for t in args.tokens.split(",")):
        short = [e.first_response_tokens(n) for e in encoded]
        jsd, seconds = score(short)
        short_ies = ies(jsd, cost)
        print(json.dumps({
            "response_tokens": n, "records": len(encoded),
            "token_share": round(sum(len(e.input_ids) for e in short) / cost.sum(), 3),
            "seconds": round(seconds, 1), "full_seconds": round(full_seconds, 1),
            "spearman_jsd": round(float(spearmanr(jsd, full).statistic), 3),
            "spearman_ies": round(float(spearmanr(short_ies, full_ies).statistic), 3),
            f"top{args.top:g}_agreement": round(len(full_top & set(np.argsort(-short_ies, kind="stable")[:top])) / top, 3),
        }))


if __name__ == "__main__":
    main()
