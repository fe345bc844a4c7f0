"""GPU smoke check: bf16, SDPA attention, scoring throughput and each stage's memory on one CUDA device.

On a machine with CUDA, loads the embedded SmolLM2-135M-Instruct (or ``--model``) in bf16 on the GPU with a
50% magnitude-pruned copy, checks that bf16 is supported and that attention runs through SDPA, times paser's
scoring against bare forward passes of both models over the same batches (the ``ratio`` of
``bench/scoring_throughput.py``), then measures peak GPU memory of each stage: scoring, a few LoRA recovery
steps, and evaluation (perplexity windows); then block-wise + KD (the default recovery) on the pruned copy toward the
original, and block-wise alone on a synthetic checkpoint of Llama-3.2-1B's shapes (``bench/scale.py``): tokens/s,
peak memory and seconds per block; last, the speed-up a 2:4-pruned copy gets from PyTorch's
semi-structured sparse kernels (``torch.sparse.to_sparse_semi_structured``, compute capability 8.0+) on each
decoder linear shape and on a whole forward pass, against the same model's dense matmuls. Prints one JSON line.

On a machine without CUDA it prints ``{"cuda": false, ...}`` with a message and exits 0.
"""

import argparse
import copy
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

POOL = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "instruct" / "pool.jsonl"


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="model spec (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--data", default=str(POOL) if POOL.exists() else "demo")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--sparse-tokens", type=int, default=8192, help="2:4 bench: tokens per matmul (rows of x)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(json.dumps({"cuda": False, "message": "no CUDA device: nothing to check here (run this on a GPU "
                                                    "machine; bench/scoring_throughput.py measures the CPU path)",
                          "semi_structured": "not run: 2:4 sparse kernels need a CUDA device of compute capability "
                                             "8.0 or later; on a CPU a 2:4 model runs its dense matmuls"}))
        return

    from paser.data import PromptFormatter, load_records
    from paser.evaluate import sequence_nll
    from paser.models import DEFAULT_MODEL, load_model
    from paser.passes import collate, length_buckets
    from paser.prune import magnitude_prune_
    from paser.recovery import RecoverConfig, run_recovery
    from paser.selection.score import score_batch

    device = torch.device("cuda")
    report = {"cuda": True, "device": torch.cuda.get_device_name(0), "bf16_supported": torch.cuda.is_bf16_supported()}
    spec = args.model or DEFAULT_MODEL
    original, tokenizer = load_model(spec, dtype="bf16", device="cuda")
    pruned = magnitude_prune_(copy.deepcopy(original), 0.5)
    report["attention"] = getattr(original.config, "_attn_implementation", None)
    report["sdpa"] = report["attention"] == "sdpa"

    records = load_records(args.data, limit=args.n)
    encoded = PromptFormatter(tokenizer, max_length=args.max_length).encode_all(records)
    lengths = [len(e.input_ids) for e in encoded]
    batches = [[encoded[i] for i in b] for b in length_buckets(lengths, 32, 16384)]
    pad = tokenizer.pad_token_id

    @torch.no_grad()
    def bare():
        for batch in batches:
            ids, attention, _, _ = collate(batch, pad)
            ids, attention = ids.to(device), attention.to(device)
            original(input_ids=ids, attention_mask=attention)
            pruned(input_ids=ids, attention_mask=attention)

    def scoring():
        for batch in batches:
            score_batch(original, pruned, batch, pad)

    def timed(fn):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    scoring()  # warm-up
    torch.cuda.reset_peak_memory_stats()
    t_paser = timed(scoring)
    report["score_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 3)
    t_bare = timed(bare)
    tokens = sum(lengths)
    report.update(records=len(encoded), tokens=tokens, paser_tokens_per_s=round(tokens / t_paser, 1),
                  bare_tokens_per_s=round(tokens / t_bare, 1), ratio=round(t_paser / t_bare, 3))

    torch.cuda.reset_peak_memory_stats()
    windows = [e.input_ids for e in encoded[:64]]
    t_eval = timed(lambda: sequence_nll(original, windows, batch_size=16))
    report["evaluate_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 3)
    report["evaluate_seconds"] = round(t_eval, 2)

    with tempfile.TemporaryDirectory() as tmp:
        model_dir, original_dir = Path(tmp) / "pruned", Path(tmp) / "original"
        for model, folder in ((pruned, model_dir), (original, original_dir)):
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
        original = pruned = None  # the GPU memory goes to the recovery step
        torch.cuda.empty_cache()
        data = Path(tmp) / "train.jsonl"
        data.write_text("".join(json.dumps({"instruction": r.instruction, "input": r.input, "output": r.output}) + "\n"
                                for r in records[:128]))
        torch.cuda.reset_peak_memory_stats()
        log = run_recovery(RecoverConfig(model=str(model_dir), data=str(data), out=Path(tmp) / "rec", epochs=1,
                                         batch_size=16, micro_batch_size=8, cutoff_len=args.max_length, dtype="bf16",
                                         method="end-to-end"))  # the LoRA step's memory, not the block pass's
        report["recover_peak_gb"] = round(torch.cuda.max_memory_allocated() / 1024**3, 3)
        report["recover_seconds_per_step"] = log["seconds_per_step"]
        report["recover_zeros_kept"] = log["zeros_after_merge"] >= log["zeros_kept"]
        report["blockwise_kd"] = blockwise_run(model_dir, original_dir, data, Path(tmp) / "bw", "blockwise+kd",
                                               args.max_length)
        sys.path.insert(0, str(Path(__file__).parent))
        from scale import write_pair

        synthetic_original, synthetic_pruned = write_pair(Path(tmp) / "synthetic", "llama-3.2-1b", 16, seed=0)
        report["blockwise_1b_shapes"] = blockwise_run(synthetic_pruned, synthetic_original, data, Path(tmp) / "bw1b",
                                                      "blockwise", args.max_length)
    report["semi_structured"] = semi_structured_speedup(spec, tokens_per_batch=args.sparse_tokens)
    print(json.dumps(report))


def blockwise_run(model: Path, original: Path, data: Path, out: Path, method: str, cutoff: int) -> dict:
    """One block-wise recovery on the GPU (bf16): its tokens/s, peak memory, seconds per block and minutes."""
    from paser.recovery import RecoverConfig, run_recovery

    t0 = time.perf_counter()
    log = run_recovery(RecoverConfig(model=str(model), data=str(data), out=out, teacher=str(original), dtype="bf16",
                                     method=method, cutoff_len=cutoff, **({"loss": "kd"} if "kd" in method else {})))
    blocks = log.get("blockwise", log)
    seconds = [b["seconds"] for b in blocks["blocks"]]
    return {"method": method, "minutes": round((time.perf_counter() - t0) / 60, 2),
            "peak_gb": log["peak_memory_gb"], "blocks": len(seconds),
            "seconds_per_block": round(sum(seconds) / len(seconds), 2), "block_tokens_per_s": blocks["tokens_per_s"],
            "error_after_over_before": round(sum(b["loss_after"] / b["loss_before"] for b in blocks["blocks"])
                                             / len(seconds), 3),
            "zeros_kept": log["zeros_after_merge"] == log["zeros_kept"]}


def semi_structured_speedup(spec: str, tokens_per_batch: int) -> dict:
    """Dense against 2:4 semi-structured matmuls for a magnitude 2:4 copy of ``spec`` (fp16, the kernels' dtype)."""
    from paser.models import load_model
    from paser.prune import decoder_linears, magnitude_prune_

    if torch.cuda.get_device_capability() < (8, 0):
        return {"run": False, "message": "2:4 sparse kernels need compute capability 8.0 or later"}
    from torch.sparse import to_sparse_semi_structured

    model, _ = load_model(spec, dtype="fp16", device="cuda", tokenizer=False)
    magnitude_prune_(model, 0.5, nm=(2, 4))

    def timed(fn, repeats=20):
        fn()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / repeats

    shapes = {}
    for name, linear in decoder_linears(model).items():
        shape = tuple(linear.weight.shape)
        if shape in shapes:
            continue
        x = torch.randn(tokens_per_batch, shape[1], device="cuda", dtype=torch.float16)
        dense_w = linear.weight.detach()
        sparse_w = to_sparse_semi_structured(dense_w)
        dense = timed(lambda x=x, w=dense_w: torch.nn.functional.linear(x, w))
        sparse = timed(lambda x=x, w=sparse_w: torch.nn.functional.linear(x, w))
        shapes[shape] = {"layer": name, "dense_ms": round(dense * 1e3, 4), "sparse_ms": round(sparse * 1e3, 4),
                         "speedup": round(dense / sparse, 3)}
    ids = torch.randint(0, model.config.vocab_size, (tokens_per_batch // 512, 512), device="cuda")
    with torch.no_grad():
        dense_forward = timed(lambda: model(input_ids=ids), repeats=5)
        for linear in decoder_linears(model).values():
            linear.weight = torch.nn.Parameter(to_sparse_semi_structured(linear.weight.detach()), requires_grad=False)
        sparse_forward = timed(lambda: model(input_ids=ids), repeats=5)
    return {"run": True, "dtype": "fp16", "tokens_per_batch": tokens_per_batch,
            "linears": {"x".join(map(str, k)): v for k, v in shapes.items()},
            "forward_dense_ms": round(dense_forward * 1e3, 2), "forward_sparse_ms": round(sparse_forward * 1e3, 2),
            "forward_speedup": round(dense_forward / sparse_forward, 3)}


if __name__ == "__main__":
    main()
