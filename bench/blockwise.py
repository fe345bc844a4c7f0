"""Blockwise reconstruction's cost: seconds and peak memory per block of one finished run (``paser recover
--method blockwise``; its ``train_log.json``), and the memory paser plans for larger models' block-wise recovery
(:mod:`paser.recovery.memory`, the plan ``auto`` checks before loading) on the run's step size.

    python bench/blockwise.py runs/bw/train_log.json

The plan holds, per block: the trained block's fp32 weights, gradient and AdamW's two moments (16 bytes a
parameter), the original's block (fp32), both models' input embeddings (fp32) and one step's activations; the
streams are on disk (``8 N h`` bytes for ``N`` training tokens of hidden size ``h``, bf16). Measured against it on
synthetic checkpoints by ``bench/scale.py`` (docs/scale.md).

Prints one JSON line.
"""

import argparse
import json
from pathlib import Path

# hidden, MLP width, layers, attention heads, key-value heads, vocabulary: the published configs
SHAPES = {
    "smollm2-135m": (576, 1536, 30, 9, 3, 49152),
    "llama-2-7b": (4096, 11008, 32, 32, 32, 32000),
    "llama-2-13b": (5120, 13824, 40, 40, 40, 32000),
    "llama-3-70b": (8192, 28672, 80, 64, 8, 128256),
}


def plan(shape: tuple, step_tokens: int, train_tokens: int) -> dict:
    from types import SimpleNamespace

    from transformers import LlamaConfig

    from paser.recovery.memory import GB, Shape, blockwise_need

    hidden, mlp, layers, heads, kv_heads, vocab = shape
    sizes = Shape.from_config(LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                                          num_attention_heads=heads, num_key_value_heads=kv_heads, vocab_size=vocab))
    need = blockwise_need(SimpleNamespace(block_window=1, block_batch_tokens=step_tokens, block_heldout=0), sizes)
    return {"block_parameters": sizes.block, "layers": layers, "resident_gb": round(need.total / GB, 2),
            "parts_gb": {k: round(v / GB, 2) for k, v in need.parts.items()},
            "streams_disk_gb": round(8 * train_tokens * hidden / GB, 2),
            "trained_blocks_disk_gb": round(2 * sizes.block * layers / GB, 1)}


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
        "plan": {name: plan(shape, step_tokens, tokens) for name, shape in SHAPES.items()},
    }))


if __name__ == "__main__":
    main()
