"""Scoring throughput: paser's JSD scoring vs bare forward passes of the same two models.

Takes the embedded SmolLM2-135M-Instruct and a 50% magnitude-pruned copy (made here), ``--n`` records of
the shared instruction pool truncated to ``--max-length`` tokens, and times, over the same length-bucketed
batches in the same run: (a) paser's scoring (``score_batch``: one decoder pass of each model, LM head
only at response positions, chunked JSD) and (b) bare ``model(input_ids, attention_mask)`` calls of both
models. Prints one JSON line with tokens/s and ``ratio`` = (a) / (b).
"""

import argparse
import copy
import json
import time
from pathlib import Path

import torch

POOL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "instruct" / "pool.jsonl"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(POOL))
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-batch-tokens", type=int, default=4096)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--repeats", type=int, default=1, help="alternate (a) and (b) this many times")
    args = parser.parse_args()

    from paser.data import PromptFormatter, load_records
    from paser.models import DEFAULT_MODEL, load_model, resolve_dtype_name
    from paser.passes import collate, length_buckets
    from paser.prune import magnitude_prune_
    from paser.selection.score import score_batch

    dtype = resolve_dtype_name(args.dtype)
    original, tokenizer = load_model(DEFAULT_MODEL, dtype=dtype)
    pruned = magnitude_prune_(copy.deepcopy(original), 0.5)
    records = load_records(args.data, limit=args.n)
    encoded = PromptFormatter(tokenizer, max_length=args.max_length).encode_all(records)
    lengths = [len(e.input_ids) for e in encoded]
    batches = [[encoded[i] for i in b] for b in length_buckets(lengths, args.batch_size, args.max_batch_tokens)]
    pad = tokenizer.pad_token_id

    @torch.no_grad()
    def bare():
        for batch in batches:
            ids, attention, _, _ = collate(batch, pad)
            original(input_ids=ids, attention_mask=attention)
            pruned(input_ids=ids, attention_mask=attention)

    def paser():
        for batch in batches:
            score_batch(original, pruned, batch, pad)

    score_batch(original, pruned, batches[-1], pad)  # warm-up (allocator, kernels)
    times = {"paser": 0.0, "bare": 0.0}
    for _ in range(args.repeats):
        for name, fn in (("paser", paser), ("bare", bare)):
            t0 = time.perf_counter()
            fn()
            times[name] += time.perf_counter() - t0
    tokens = sum(lengths) * args.repeats
    response_tokens = sum(len(e.response_ids) for e in encoded)
    print(json.dumps({
        "records": len(encoded), "tokens": sum(lengths), "response_tokens": response_tokens, "dtype": dtype,
        "batches": len(batches), "threads": torch.get_num_threads(),
        "paser_seconds": round(times["paser"], 2), "bare_seconds": round(times["bare"], 2),
        "paser_tokens_per_s": round(tokens / times["paser"], 1),
        "bare_tokens_per_s": round(tokens / times["bare"], 1),
        "ratio": round(times["paser"] / times["bare"], 3),
    }))


if __name__ == "__main__":
    main()
