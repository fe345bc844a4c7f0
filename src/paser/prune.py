"""Pruning: Wanda and SparseGPT through llmcompressor's one-shot modifiers; magnitude pruning directly.

Every method prunes the linear layers inside the decoder blocks (embeddings and LM head are kept),
unstructured or N:M (``pattern="2:4"``: at least N zeros in every M consecutive input weights).
llmcompressor's ``MagnitudePruningModifier`` is a training-schedule modifier that leaves weights
untouched in one-shot use (checked with llmcompressor 0.14), so ``magnitude`` is implemented here.
Taylor structured pruning (LLM-Pruner style, through torch-pruning) is not built yet.

The output directory is a plain Hugging Face model (dense safetensors, no compression config) plus the
tokenizer and ``prune_report.json``.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .cache import atomic_dir, write_json
from .data import pad_right
from .errors import ConfigError, NotBuiltError

log = logging.getLogger(__name__)

METHODS = ("wanda", "sparsegpt", "magnitude", "taylor")


@dataclass
class PruneConfig:
    """Pruning settings; defaults are the CLI's."""

    model: str
    out: str | Path
    method: str = "wanda"
    sparsity: float = 0.5
    pattern: str | None = None  # "N:M", e.g. "2:4"
    calib_data: str = "demo"  # any instruction source paser reads, or a plain .txt file
    calib_samples: int = 128
    seq_len: int = 256
    heldout_samples: int = 32  # calibration-source samples (not used for calibration) for perplexity
    seed: int = 0

    def nm(self) -> tuple[int, int] | None:
        if not self.pattern:
            return None
        try:
            n, m = (int(x) for x in self.pattern.split(":"))
        except ValueError:
            raise ConfigError(f"pattern must look like N:M (e.g. 2:4), not '{self.pattern}'") from None
        if not 0 < n < m:
            raise ConfigError(f"pattern {self.pattern}: need 0 < N < M")
        return n, m

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"method must be one of {', '.join(METHODS)}, not '{self.method}'")
        if not 0 < self.sparsity < 1:
            raise ConfigError(f"sparsity must be in (0, 1), not {self.sparsity}")
        nm = self.nm()
        if nm and self.method == "taylor":
            raise ConfigError("an N:M pattern applies to unstructured methods (wanda, sparsegpt, magnitude), not taylor")
        if nm and not math.isclose(self.sparsity, nm[0] / nm[1]):
            raise ConfigError(f"pattern {self.pattern} means sparsity {nm[0] / nm[1]:g}, but --sparsity is {self.sparsity:g}")
        if self.calib_samples < 1 or self.seq_len < 8:
            raise ConfigError("calib_samples must be >= 1 and seq_len >= 8")
        if self.method == "taylor":
            raise NotBuiltError("taylor (structured) pruning is not built yet; use wanda, sparsegpt or magnitude")


# ------------------------------------------------------------------------------------------ pure core
def decoder_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The linear layers inside the decoder blocks (what pruning targets)."""
    return {name: module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}"}


@torch.no_grad()
def magnitude_prune_(model: torch.nn.Module, sparsity: float = 0.5, nm: tuple[int, int] | None = None) -> torch.nn.Module:
    """Zero the smallest-magnitude weights of every decoder linear layer, in place.

    Unstructured: the ``sparsity`` fraction of each output row. N:M: the N smallest of every M
    consecutive input weights. Returns the same model.
    """
    if not 0 < sparsity < 1:
        raise ValueError(f"sparsity must be in (0, 1), not {sparsity}")
    for module in decoder_linears(model).values():
        weight = module.weight
        if nm:
            n, m = nm
            groups = weight.view(weight.shape[0], -1, m)
            drop = groups.abs().float().topk(n, dim=-1, largest=False).indices
            groups.scatter_(-1, drop, 0.0)
            continue
        k = int(weight.shape[1] * sparsity)
        if k:
            weight.scatter_(1, weight.abs().float().topk(k, dim=1, largest=False).indices, 0.0)
    return model


def layer_sparsity(model: torch.nn.Module) -> dict[str, float]:
    return {name: (m.weight == 0).float().mean().item() for name, m in decoder_linears(model).items()}


@torch.no_grad()
def perplexity(model: Any, sequences: Sequence[Sequence[int]], batch_size: int = 8) -> float:
    """exp(mean NLL) over every predicted token of the sequences (right-padded batches)."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(sequences), batch_size):
        ids, mask = pad_right(sequences[start:start + batch_size], 0)  # padding is masked out below
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:].to(device), reduction="none")
        valid = mask[:, 1:].to(device).bool()
        total += nll[valid].sum().item()
        count += int(valid.sum())
    return math.exp(total / max(count, 1))


# ---------------------------------------------------------------------------------------------- I/O
def calibration_sequences(source: str, tokenizer: Any, count: int, seq_len: int) -> list[list[int]]:
    """Token id sequences: formatted instruction records, or consecutive chunks of a plain text file."""
    from .data import PromptFormatter, load_records

    if source.endswith(".txt"):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"calibration text file not found: {source}")
        ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        return [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:count]
    formatter = PromptFormatter(tokenizer, max_length=seq_len)
    return [e.input_ids for e in formatter.encode_all(load_records(source, limit=count))]


def _llmcompressor_prune(model: Any, tokenizer: Any, config: PruneConfig, calibration: list[list[int]]) -> Any:
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.obcq import SparseGPTModifier
    from llmcompressor.modifiers.pruning import WandaPruningModifier

    structure = config.pattern or "0:0"  # llmcompressor's spelling of "unstructured"
    cls = WandaPruningModifier if config.method == "wanda" else SparseGPTModifier
    modifier = cls(sparsity=config.sparsity, mask_structure=structure, ignore=["re:.*lm_head"])
    dataset = Dataset.from_dict({"input_ids": calibration, "attention_mask": [[1] * len(s) for s in calibration]})
    return oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=modifier,
                   num_calibration_samples=len(calibration), max_seq_length=config.seq_len,
                   shuffle_calibration_samples=False)


def run_prune(config: PruneConfig) -> dict:
    """Prune ``config.model`` and write the model directory and ``prune_report.json``; returns the report."""
    from .models import load_model

    config.validate()
    started = time.perf_counter()
    model, tokenizer = load_model(config.model, dtype="fp32")
    torch.manual_seed(config.seed)
    sequences = calibration_sequences(config.calib_data, tokenizer, config.calib_samples + config.heldout_samples,
                                      config.seq_len)
    if len(sequences) <= config.heldout_samples:
        raise ConfigError(f"calibration source '{config.calib_data}' gave {len(sequences)} sequences; "
                          f"need more than {config.heldout_samples} (held out for perplexity)")
    calibration, heldout = sequences[:-config.heldout_samples], sequences[-config.heldout_samples:]
    params_before = sum(p.numel() for p in model.parameters())
    ppl_before = perplexity(model, heldout)

    t0 = time.perf_counter()
    if config.method == "magnitude":
        magnitude_prune_(model, config.sparsity, config.nm())
    else:
        model = _llmcompressor_prune(model, tokenizer, config, calibration)
    prune_seconds = time.perf_counter() - t0
    ppl_after = perplexity(model, heldout)

    per_layer = layer_sparsity(model)
    sizes = {name: m.weight.numel() for name, m in decoder_linears(model).items()}
    zeros_total = sum(per_layer[n] * sizes[n] for n in sizes)
    report = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "method": config.method, "pattern": config.pattern, "target_sparsity": config.sparsity,
        "achieved_sparsity": zeros_total / sum(sizes.values()),
        "achieved_sparsity_all_parameters": zeros_total / params_before,
        "layers": {n: {"target": config.sparsity, "achieved": round(s, 6)} for n, s in per_layer.items()},
        "parameters_before": params_before, "parameters_after": sum(p.numel() for p in model.parameters()),
        "nonzero_parameters_after": int(sum(int((p != 0).sum()) for p in model.parameters())),
        "calibration_samples": len(calibration), "heldout_samples": len(heldout),
        "perplexity_before": ppl_before, "perplexity_after": ppl_after,
        "prune_seconds": round(prune_seconds, 2), "seconds": round(time.perf_counter() - started, 2),
        "peak_memory_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3),
    }
    out = Path(config.out)
    with atomic_dir(out) as tmp:
        if config.method == "magnitude":
            model.save_pretrained(tmp)
        else:  # llmcompressor wraps save_pretrained; ask for plain dense tensors, not a compressed format
            model.save_pretrained(tmp, save_compressed=False)
        tokenizer.save_pretrained(tmp)
        write_json(Path(tmp) / "prune_report.json", report)
    return report
