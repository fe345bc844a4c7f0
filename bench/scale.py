"""Block-wise recovery on a model larger than memory, measured: a synthetic checkpoint with a real model's block
shapes (random weights, the pruned copy with half of every linear layer's row zeroed by magnitude), written layer by
layer (never whole in memory), recovered with ``paser recover --method blockwise`` from a few records, optionally
inside a memory cgroup smaller than the checkpoint.

    python bench/scale.py --shape llama-2-13b --layers 20 --cap-gb 12 --out /tmp/scale   # larger than its memory
    python bench/scale.py --shape llama-2-7b --layers 2                                   # the depth table's rows

Prints one JSON line: checkpoint size on disk (GB, each of the two), machine RAM, the cap, peak RSS of the recovery
process, its cgroup's peak (page cache included; GiB), seconds per block, minutes, peak disk of the run folder, and the
memory plan paser made before loading (``resolved.memory``). The shapes are the published configs' (hidden, MLP
width, heads, key-value heads); the vocabulary is the embedded model's (49,152, tied embeddings), so the
tokenizer is real. Weights are random: the errors measure nothing about a real model, the time and memory do.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

SHAPES = {  # hidden, MLP width, attention heads, key-value heads (published configs)
    "smollm2-135m": (576, 1536, 9, 3),
    "llama-3.2-1b": (2048, 8192, 32, 8),
    "llama-2-7b": (4096, 11008, 32, 32),
    "llama-2-13b": (5120, 13824, 40, 40),
    "llama-3-70b": (8192, 28672, 64, 8),
}
VOCAB = 49152
CGROUP = Path("/sys/fs/cgroup/memory")


def write_pair(folder: Path, shape: str, layers: int, seed: int) -> tuple[Path, Path]:
    """``folder/original`` and ``folder/pruned``: the same random weights, the pruned one with the smaller half of
    each linear layer's rows zeroed; one safetensors shard per layer, written as it is made."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, LlamaConfig

    from paser.models import load_tokenizer

    hidden, mlp, heads, kv = SHAPES[shape]
    config = LlamaConfig(hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, vocab_size=VOCAB,
                         max_position_embeddings=4096, tie_word_embeddings=True, torch_dtype="bfloat16")
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    names = {name: p.shape for name, p in skeleton.named_parameters()}
    groups = [[n for n in names if not n.startswith("model.layers.")]]
    groups += [[n for n in names if n.startswith(f"model.layers.{i}.")] for i in range(layers)]
    tokenizer = load_tokenizer("smollm2-135m-instruct")
    paths = folder / "original", folder / "pruned"
    for path in paths:
        path.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(path)
        tokenizer.save_pretrained(path)
    generator = torch.Generator().manual_seed(seed)
    weight_map = {}
    for index, group in enumerate(groups):
        original, pruned = {}, {}
        for name in group:
            if name.endswith("norm.weight"):
                tensor = torch.ones(names[name])
            else:
                tensor = torch.randn(names[name], generator=generator) * 0.02
            original[name] = tensor.to(torch.bfloat16)
            if name.endswith("proj.weight"):  # half of each output row zeroed by magnitude (Wanda's comparison group)
                keep = tensor.abs() >= tensor.abs().median(dim=1, keepdim=True).values
                tensor = tensor * keep
            pruned[name] = tensor.to(torch.bfloat16)
        shard = f"model-{index + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(original, str(paths[0] / shard), metadata={"format": "pt"})
        save_file(pruned, str(paths[1] / shard), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, shard))
        del original, pruned
    for path in paths:
        (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return paths


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=SHAPES, default="llama-2-7b")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--records", type=int, default=4)
    parser.add_argument("--cutoff-len", type=int, default=64)
    parser.add_argument("--block-epochs", type=float, default=2)
    parser.add_argument("--cap-gb", type=float, default=None,
                        help="run the recovery in a memory cgroup (v1) of this many GiB")
    parser.add_argument("--out", type=Path, default=Path("/tmp/paser-scale"))
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and the run folder")
    args = parser.parse_args()

    import psutil

    from paser.demo_data import demo_records

    work = args.out / f"{args.shape}-{args.layers}"
    shutil.rmtree(work, ignore_errors=True)
    t0 = time.perf_counter()
    original, pruned = write_pair(work, args.shape, args.layers, seed=0)
    write_seconds = time.perf_counter() - t0
    data = work / "records.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in demo_records()["train"][:args.records]))
    run = work / "run"
    command = [sys.executable, "-m", "paser", "recover", str(pruned), "--data", str(data), "--out", str(run),
               "--method", "blockwise", "--teacher", str(original), "--cutoff-len", str(args.cutoff_len),
               "--block-epochs", str(args.block_epochs)]
    group = None
    if args.cap_gb:
        group = CGROUP / f"paser-scale-{os.getpid()}"
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(int(args.cap_gb * 1024**3)))
        command = ["sh", "-c", f'echo $$ > {group}/cgroup.procs && exec "$@"', "sh", *command]
    peak_disk = [0]
    done = threading.Event()

    def watch() -> None:
        while not done.wait(2):
            peak_disk[0] = max(peak_disk[0], folder_bytes(run))

    threading.Thread(target=watch, daemon=True).start()
    t1 = time.perf_counter()
    finished = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    minutes = (time.perf_counter() - t1) / 60
    done.set()
    cgroup_peak = int((group / "memory.max_usage_in_bytes").read_text()) if group else None
    if group:
        group.rmdir()
    if finished.returncode:
        sys.exit(f"paser recover failed ({finished.returncode}):\n{finished.stderr[-3000:]}")
    log = json.loads((run / "train_log.json").read_text())
    seconds = [b["seconds"] for b in log["blocks"]]
    print(json.dumps({
        "shape": args.shape, "layers": args.layers, "checkpoint_gb": round(folder_bytes(original) / 1e9, 2),
        "both_checkpoints_gb": round((folder_bytes(original) + folder_bytes(pruned)) / 1e9, 2),
        "machine_ram_gib": round(psutil.virtual_memory().total / 1024**3, 1), "cap_gib": args.cap_gb,
        "peak_rss_gib": log["peak_memory_gb"], "cgroup_peak_gib": cgroup_peak and round(cgroup_peak / 1024**3, 2),
        "plan": log["resolved"].get("memory", {}).get("need"), "dtype": log["dtype"],
        "tokens": log["trained_tokens"], "seconds_per_block": seconds,
        "seconds_per_block_mean": round(sum(seconds) / len(seconds), 1), "recover_minutes": round(minutes, 2),
        "write_minutes": round(write_seconds / 60, 2), "peak_disk_gb": round(max(peak_disk[0], folder_bytes(run)) / 1e9, 2),
        "bench_peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 2),
    }))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
