"""Blockwise reconstruction's cost: seconds and peak memory per block of one finished run (``paser recover
--method blockwise``; its ``train_log.json``), and what one block resident needs for larger models on one GPU.

    python bench/blockwise.py runs/bw/train_log.json

Memory model (one block resident; streams on disk; ``P`` the block's parameters, ``T`` tokens per optimizer step,
``h`` the hidden size, ``f`` the MLP width, ``N`` the training tokens):

- the trained block: fp32 master weights, gradients and AdamW's two moments, ``16 P`` bytes;
- the original's block beside it (bf16): ``2 P``;
- activations of one step's forward and backward (fp32, SDPA attention, no T x T scores kept): about
  ``T * (12 h + 4 f) * 4`` bytes;
- on disk: four streams (each model's input to the block and its output) of ``N * h`` values in bf16: ``8 N h``.

Prints one JSON line.
"""

import argparse
import json
from pathlib import Path

# hidden, MLP width, layers, attention heads, key-value heads: the published configs
SHAPES = {
    "smollm2-135m": (576, 1536, 30, 9, 3),
    "llama-2-7b": (4096, 11008, 32, 32, 32),
    "llama-3-70b": (8192, 28672, 80, 64, 8),
}


def block_parameters(hidden: int, mlp: int, heads: int, kv_heads: int) -> int:
    head_dim = hidden // heads
    attention = 2 * hidden * hidden + 2 * hidden * kv_heads * head_dim
    return attention + 3 * hidden * mlp + 2 * hidden


def memory(shape: tuple, step_tokens: int, train_tokens: int) -> dict:
    hidden, mlp, layers, heads, kv_heads = shape
    p = block_parameters(hidden, mlp, heads, kv_heads)
    resident = 16 * p + 2 * p + step_tokens * (12 * hidden + 4 * mlp) * 4
    return {"block_parameters": p, "layers": layers, "resident_gb": round(resident / 1e9, 2),
            "streams_disk_gb": round(8 * train_tokens * hidden / 1e9, 2),
            "trained_blocks_disk_gb": round(2 * p * layers / 1e9, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("train_log", type=Path, help="a blockwise run's train_log.json")
    parser.add_argument("--step-tokens", type=int, default=None, help="tokens per step (default: the run's)")
    args = parser.parse_args()
    log = json.loads(args.train_log.read_text())
    log = log.get("blockwise", log)  # a blockwise+kd run keeps its blockwise log inside
    blocks = log["blocks"]
    seconds = [b["seconds"] for b in blocks]
    step_tokens = args.step_tokens or log["config"]["block_batch_tokens"]
    tokens = int(log["trained_tokens"] / log["epochs"])
    print(json.dumps({
        "run": str(args.train_log), "dtype": log["dtype"], "blocks": len(blocks), "train_tokens": tokens,
        "steps_per_block": blocks[0]["steps"], "seconds_total": round(sum(seconds), 1),
        "seconds_per_block_mean": round(sum(seconds) / len(seconds), 1), "seconds_per_block_max": max(seconds),
        "peak_memory_gb": log["peak_memory_gb"],
        "error_ratio_after_before": [round(b["loss_after"] / b["loss_before"], 3) for b in blocks],
        "one_gpu": {name: memory(shape, step_tokens, tokens) for name, shape in SHAPES.items()},
    }))


if __name__ == "__main__":
    main()
