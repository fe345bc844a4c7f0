"""Error of JSD computed from the stored top-k teacher signal (one model resident) against the exact JSD.

Takes the embedded SmolLM2-135M-Instruct as the teacher and a pruned model (``--pruned DIR``, default: a 50%
magnitude-pruned copy made here), ``--n`` pool records, and for every response position compares the
bucketed JSD over the teacher's top-k tokens plus one tail bucket (``paser.teacher``) with the exact JSD
over the whole vocabulary. Prints one JSON line: per-position mean / p99 / max absolute error, the mean
of the proven bound (p_T + q_T)/2 H(pi), the per-sample error, and the Spearman rank correlation of the
per-sample scores (what selection uses).
"""

import argparse
import copy
import json
import time
from pathlib import Path

import numpy as np
import torch

POOL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "instruct" / "pool.jsonl"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=str(POOL))
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--pruned", default=None)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()

    from scipy.stats import spearmanr

    from paser.data import PromptFormatter, encode_records, load_records
    from paser.models import DEFAULT_MODEL, load_model, resolve_dtype_name
    from paser.passes import _decoder_and_head, _head, collate, jsd_and_nll, length_buckets
    from paser.prune import magnitude_prune_
    from paser.teacher import bucketed_jsd, teacher_topk

    dtype = resolve_dtype_name(args.dtype)
    teacher, tokenizer = load_model(DEFAULT_MODEL, dtype=dtype)
    if args.pruned:
        student, _ = load_model(args.pruned, dtype=dtype, tokenizer=False)
    else:
        student = magnitude_prune_(copy.deepcopy(teacher), 0.5)
    formatter = PromptFormatter(tokenizer, max_length=args.max_length)
    _, encoded = encode_records(formatter, load_records(args.data, limit=args.n, bad_records="skip"), "skip")
    t0 = time.perf_counter()
    store = teacher_topk(teacher, encoded, tokenizer.pad_token_id, k=args.k)
    topk_seconds = time.perf_counter() - t0

    rows_total = int(store.offsets[-1])
    exact_pos, approx_pos, bound_pos = (np.empty(rows_total, dtype=np.float64) for _ in range(3))
    t_dec, t_head, t_cap = _decoder_and_head(teacher)
    s_dec, s_head, s_cap = _decoder_and_head(student)
    with torch.no_grad():
        for batch in length_buckets([len(e.input_ids) for e in encoded], 16, 4096):
            ids, attention, predicts, _ = collate([encoded[i] for i in batch], tokenizer.pad_token_id)
            h_t = t_dec(input_ids=ids, attention_mask=attention).last_hidden_state[predicts]
            h_s = s_dec(input_ids=ids, attention_mask=attention).last_hidden_state[predicts]
            rows = np.concatenate([np.arange(store.offsets[i], store.offsets[i + 1]) for i in batch])
            for start in range(0, len(rows), 128):
                sl = slice(start, start + 128)
                z_t, z_s = _head(t_head, h_t[sl], t_cap), _head(s_head, h_s[sl], s_cap)
                r = rows[sl]
                exact_pos[r] = jsd_and_nll(z_t, z_s)[0].numpy()
                approx, bound = bucketed_jsd(torch.from_numpy(store.logprobs[r]), torch.from_numpy(store.ids[r]),
                                             torch.from_numpy(store.log_tail[r]), z_s)
                approx_pos[r], bound_pos[r] = approx.numpy(), bound.numpy()
    error = exact_pos - approx_pos

    def per_sample(values):
        return np.array([values[store.offsets[i]:store.offsets[i + 1]].mean() for i in range(len(encoded))])

    exact_sample, approx_sample = per_sample(exact_pos), per_sample(approx_pos)
    print(json.dumps({
        "bench": "topk_jsd_error", "k": args.k, "records": len(encoded), "positions": rows_total, "dtype": dtype,
        "abs_error_mean": float(np.abs(error).mean()), "abs_error_p99": float(np.quantile(np.abs(error), 0.99)),
        "abs_error_max": float(np.abs(error).max()), "bound_mean": float(bound_pos.mean()),
        "within_bound": float(np.mean((error >= -1e-6) & (error <= bound_pos + 1e-6))),
        "largest_violation": float(max((error - bound_pos).max(), (-error).max(), 0.0)),
        "sample_abs_error_mean": float(np.abs(exact_sample - approx_sample).mean()),
        "sample_jsd_mean": float(exact_sample.mean()),
        "sample_spearman": float(spearmanr(exact_sample, approx_sample).statistic),
        "teacher_pass_seconds": round(topk_seconds, 1),
        "store_mb": round((store.logprobs.nbytes + store.ids.nbytes + store.log_tail.nbytes) / 2**20, 1)}))


if __name__ == "__main__":
    main()
