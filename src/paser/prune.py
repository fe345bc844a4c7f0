"""Pruning: Wanda and SparseGPT through llmcompressor's one-shot modifiers; magnitude and Taylor here.

Unstructured methods prune the linear layers inside the decoder blocks (embeddings and LM head are
kept), unstructured or N:M (``pattern="2:4"``: at least N zeros in every M consecutive input weights).
llmcompressor's ``MagnitudePruningModifier`` is a training-schedule modifier that leaves weights
untouched in one-shot use (checked with llmcompressor 0.14), so ``magnitude`` is implemented here.

``taylor`` is LLM-Pruner-style structured pruning: first-order Taylor importance |w * dL/dw| from the
calibration loss, summed over each coupled group (an MLP channel: a row of gate/up and a column of
down; a key/value head group: its query, key and value rows and its output columns). The lowest-ranked
groups are removed physically with torch-pruning's pruning functions. Every decoder layer loses the
same number of channels and head groups, because a plain Hugging Face config has one
``intermediate_size`` and one head count for all layers; LLM-Pruner's habit of keeping the first and
last layers dense would give per-layer widths that no stock config can describe, so it is not offered.

The output directory is a plain Hugging Face model (dense safetensors, no compression config) plus the
tokenizer and ``prune_report.json``.
"""

from __future__ import annotations

import logging
import math
import resource
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

import torch
from pydantic import Field

from .cache import atomic_dir, write_json
from .data import PromptFormatter, iter_records, pad_right
from .errors import ConfigError
from .models import load_model, resolve_spec
from .options import check_declared, option
from .passes import perplexity
from .registry import Registry

# transformers, datasets, llmcompressor and torch-pruning are imported by the pruning method that uses them: each
# takes seconds to load, and `paser --help` imports this module.

log = logging.getLogger(__name__)

TAYLOR_BATCH = 4  # calibration sequences per backward pass
CALIBRATION_BATCH = 8  # sequences per llmcompressor calibration pass (all windows have the same length)
TAYLOR_MODEL_TYPES = ("llama", "mistral", "qwen2")  # gated MLP + (grouped-query) attention, one width per config


@dataclass
class PruneConfig:
    """Pruning settings; defaults are the CLI's."""

    CONFIG_ONLY: ClassVar[frozenset[str]] = frozenset()  # every field is a ``paser prune`` option

    model: str = option(help="Model spec: smollm2-135m-instruct, a local HF directory, a .gguf file or a hub id.", cli='argument')
    out: str | Path = option(help="Output directory (a plain Hugging Face model directory).")
    method: str = option('wanda', "Pruning method.")
    sparsity: Annotated[float, Field(gt=0, lt=1)] = option(0.5, "Fraction of weights (or, for taylor, of prunable "
        "channels/heads) to remove, in (0, 1).")
    pattern: str | None = option(None, "N:M semi-structured pattern, e.g. 2:4 (wanda, sparsegpt, magnitude).")
    calib_data: str = option('demo', "Calibration data: any instruction source paser reads (formatted records packed "
        "into full windows), or a plain .txt file.")
    calib_samples: Annotated[int, Field(ge=1)] = option(128, "Number of calibration samples.")
    seq_len: Annotated[int, Field(ge=8)] = option(256, "Calibration sequence length in tokens.")
    heldout_samples: Annotated[int, Field(ge=1)] = option(32, "Further windows of the calibration source, not "
        "calibrated on, for the perplexity before/after.")
    seed: int = option(0, "Seed.")

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
        check_declared(self)
        method = PRUNING_METHODS.get(self.method)
        nm = self.nm()
        if nm and method.structured:
            unstructured = ", ".join(n for n, m in PRUNING_METHODS.items() if not m.structured)
            raise ConfigError(f"an N:M pattern applies to unstructured methods ({unstructured}), not {self.method}")
        if nm and not math.isclose(self.sparsity, nm[0] / nm[1]):
            raise ConfigError(f"pattern {self.pattern} means sparsity {nm[0] / nm[1]:g}, but --sparsity is {self.sparsity:g}")


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


def check_taylor_supported(config: Any, spec: str) -> None:
    """Taylor pruning needs a stock gated-MLP decoder whose config holds one width for all layers."""
    model_type = getattr(config, "model_type", None)
    if model_type not in TAYLOR_MODEL_TYPES:
        raise ConfigError(f"taylor pruning supports {', '.join(TAYLOR_MODEL_TYPES)} architectures; "
                          f"'{spec}' is '{model_type}'")
    if not isinstance(getattr(config, "intermediate_size", None), int):
        raise ConfigError(f"taylor pruning: '{spec}' has per-layer MLP widths, which it cannot handle")


def _head_groups(config: Any) -> tuple[int, int, int]:
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return heads, kv_heads, head_dim


def _salience(linear: torch.nn.Linear) -> torch.Tensor:
    """First-order Taylor importance of each weight: |w * dL/dw|."""
    return (linear.weight.detach() * linear.weight.grad).abs().float()


def _drop_mlp_channels(tp: Any, mlp: torch.nn.Module, drop: int) -> None:
    """Remove the ``drop`` least salient intermediate channels (gate, up and down projections together)."""
    score = _salience(mlp.gate_proj).sum(1) + _salience(mlp.up_proj).sum(1) + _salience(mlp.down_proj).sum(0)
    channels = score.argsort()[:drop].tolist()
    tp.prune_linear_out_channels(mlp.gate_proj, channels)
    tp.prune_linear_out_channels(mlp.up_proj, channels)
    tp.prune_linear_in_channels(mlp.down_proj, channels)


def _drop_head_groups(tp: Any, attn: torch.nn.Module, drop: int, kv_heads: int, q_per_kv: int, head_dim: int) -> int:
    """Remove the ``drop`` least salient key/value head groups with their query heads; returns how many."""
    q = _salience(attn.q_proj).sum(1).view(kv_heads, q_per_kv * head_dim).sum(1)
    k = _salience(attn.k_proj).sum(1).view(kv_heads, head_dim).sum(1)
    v = _salience(attn.v_proj).sum(1).view(kv_heads, head_dim).sum(1)
    o = _salience(attn.o_proj).sum(0).view(kv_heads, q_per_kv * head_dim).sum(1)
    groups = (q + k + v + o).argsort()[:drop].tolist()
    q_rows = [g * q_per_kv * head_dim + i for g in groups for i in range(q_per_kv * head_dim)]
    kv_rows = [g * head_dim + i for g in groups for i in range(head_dim)]
    tp.prune_linear_out_channels(attn.q_proj, q_rows)
    tp.prune_linear_out_channels(attn.k_proj, kv_rows)
    tp.prune_linear_out_channels(attn.v_proj, kv_rows)
    tp.prune_linear_in_channels(attn.o_proj, q_rows)
    return len(groups)


def taylor_prune_(model: torch.nn.Module, batches: Sequence[Sequence[Sequence[int]]], ratio: float,
                  progress: bool = True) -> dict:
    """LLM-Pruner-style structured pruning in place; returns what was removed.

    ``ratio`` is the fraction of MLP channels and of key/value head groups removed from every decoder
    layer (LLM-Pruner's meaning; head groups round down, so a model with few of them may keep all).
    Importance is accumulated over ``batches`` of token ids (each a list of sequences).
    """
    import torch_pruning as tp
    from tqdm.auto import tqdm

    config = model.config
    layers = model.model.layers
    heads, kv_heads, head_dim = _head_groups(config)
    q_per_kv = heads // kv_heads
    channels = config.intermediate_size
    drop_channels = int(round(ratio * channels))
    drop_groups = int(ratio * kv_heads)
    if drop_channels >= channels:
        raise ConfigError(f"taylor ratio {ratio} would remove all {channels} MLP channels")

    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    for batch in tqdm(batches, desc="taylor gradients", disable=not progress, leave=False):
        ids, mask = pad_right(batch, 0)
        labels = ids.masked_fill(mask == 0, -100)
        model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device)).loss.backward()

    removed_groups = 0
    with torch.no_grad():
        for layer in layers:
            _drop_mlp_channels(tp, layer.mlp, drop_channels)
            if drop_groups:
                removed_groups += _drop_head_groups(tp, layer.self_attn, drop_groups, kv_heads, q_per_kv, head_dim)
    model.zero_grad(set_to_none=True)

    config.intermediate_size = channels - drop_channels
    if drop_groups:
        config.num_key_value_heads = kv_heads - drop_groups
        config.num_attention_heads = (kv_heads - drop_groups) * q_per_kv
        config.head_dim = head_dim  # no longer hidden_size // heads
        for layer in layers:  # attention modules cache these at construction
            for name, value in (("num_heads", config.num_attention_heads),
                                ("num_key_value_heads", config.num_key_value_heads)):
                if hasattr(layer.self_attn, name):
                    setattr(layer.self_attn, name, value)
    return {"mlp_channels": [channels, channels - drop_channels],
            "kv_head_groups": [kv_heads, kv_heads - drop_groups],
            "attention_heads": [heads, config.num_attention_heads], "head_groups_removed": removed_groups}


def layer_sparsity(model: torch.nn.Module) -> dict[str, float]:
    return {name: (m.weight == 0).float().mean().item() for name, m in decoder_linears(model).items()}


# ---------------------------------------------------------------------------------------------- I/O
def calibration_sequences(source: str, tokenizer: Any, count: int, seq_len: int) -> list[list[int]]:
    """``count`` windows of exactly ``seq_len`` token ids: consecutive chunks of a plain text file, or of
    formatted instruction records packed end to end (so every window is full, as with C4 in Wanda)."""

    if source.endswith(".txt"):
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"calibration text file not found: {source}")
        ids = tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    else:
        formatter = PromptFormatter(tokenizer, max_length=seq_len)
        ids = []
        for record in iter_records(source):
            ids.extend(formatter.encode(record).input_ids)
            if len(ids) >= count * seq_len:
                break
    return [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:count]


class PruningMethod:
    """A pruning method: ``prune`` returns the pruned model and, for structured methods, what was removed."""

    name = "base"
    structured = False  # parameters physically removed (no N:M pattern), or zeros inside unchanged shapes
    version = 1

    def check(self, config: PruneConfig) -> None:
        """Checks that need only the model's config (before any model loads)."""

    def prune(self, model: Any, tokenizer: Any, config: PruneConfig, calibration: list[list[int]]) -> tuple[Any, Any]:
        raise NotImplementedError

    def save(self, model: Any, directory: Any) -> None:
        model.save_pretrained(directory)


PRUNING_METHODS: Registry[PruningMethod] = Registry("pruning method", "paser.pruning")
PruneConfig.REGISTERED = {"method": PRUNING_METHODS}  # (the registry is defined after the config)


class _OneShot(PruningMethod):
    """llmcompressor's one-shot modifiers (calibrated on ``calibration``; ``lm_head`` left dense)."""

    def modifier(self) -> type:
        raise NotImplementedError

    def prune(self, model: Any, tokenizer: Any, config: PruneConfig, calibration: list[list[int]]) -> tuple[Any, Any]:
        from datasets import Dataset
        from llmcompressor import oneshot

        structure = config.pattern or "0:0"  # llmcompressor's spelling of "unstructured"
        modifier = self.modifier()(sparsity=config.sparsity, mask_structure=structure, ignore=["re:.*lm_head"])
        dataset = Dataset.from_dict({"input_ids": calibration, "attention_mask": [[1] * len(s) for s in calibration]})
        return oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=modifier,
                       num_calibration_samples=len(calibration), max_seq_length=config.seq_len,
                       batch_size=CALIBRATION_BATCH, shuffle_calibration_samples=False), None

    def save(self, model: Any, directory: Any) -> None:
        model.save_pretrained(directory, save_compressed=False)  # plain dense tensors, not a compressed format


@PRUNING_METHODS.register("wanda")
class Wanda(_OneShot):
    """|weight| x input norm, unstructured or N:M (llmcompressor)."""
    def modifier(self) -> type:
        from llmcompressor.modifiers.pruning import WandaPruningModifier

        return WandaPruningModifier


@PRUNING_METHODS.register("sparsegpt")
class SparseGPT(_OneShot):
    """Second-order reconstruction, unstructured or N:M (llmcompressor)."""
    def modifier(self) -> type:
        from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

        return SparseGPTModifier


@PRUNING_METHODS.register("magnitude")
class Magnitude(PruningMethod):
    """|weight|, unstructured or N:M."""
    def prune(self, model: Any, tokenizer: Any, config: PruneConfig, calibration: list[list[int]]) -> tuple[Any, Any]:
        return magnitude_prune_(model, config.sparsity, config.nm()), None


@PRUNING_METHODS.register("taylor")
class Taylor(PruningMethod):
    """Structured: MLP channels and head groups by first-order Taylor importance (torch-pruning)."""
    structured = True

    def check(self, config: PruneConfig) -> None:
        from transformers import AutoConfig

        check_taylor_supported(AutoConfig.from_pretrained(resolve_spec(config.model).location), config.model)

    def prune(self, model: Any, tokenizer: Any, config: PruneConfig, calibration: list[list[int]]) -> tuple[Any, Any]:
        batches = [calibration[i:i + TAYLOR_BATCH] for i in range(0, len(calibration), TAYLOR_BATCH)]
        structure = taylor_prune_(model, batches, config.sparsity)
        return model, structure


def run_prune(config: PruneConfig) -> dict:
    """Prune ``config.model`` and write the model directory and ``prune_report.json``; returns the report."""

    config.validate()
    method = PRUNING_METHODS.get(config.method)
    method.check(config)  # e.g. the architecture, before the model loads
    started = time.perf_counter()
    model, tokenizer = load_model(config.model, dtype="fp32")
    torch.manual_seed(config.seed)
    sequences = calibration_sequences(config.calib_data, tokenizer, config.calib_samples + config.heldout_samples,
                                      config.seq_len)
    if len(sequences) <= config.heldout_samples:
        raise ConfigError(f"calibration source '{config.calib_data}' gave {len(sequences)} sequences; "
                          f"need more than {config.heldout_samples} (held out for perplexity)")
    calibration, heldout = sequences[:-config.heldout_samples], sequences[-config.heldout_samples:]
    if len(calibration) < config.calib_samples:
        log.warning("calibration source '%s' gave %d windows of %d tokens for calibration (%d asked; %d more held out "
                    "for perplexity): pruning is calibrated on %d", config.calib_data, len(calibration), config.seq_len,
                    config.calib_samples, len(heldout), len(calibration))
    params_before = sum(p.numel() for p in model.parameters())
    sizes_before = {name: m.weight.numel() for name, m in decoder_linears(model).items()}
    ppl_before = perplexity(model, heldout)

    t0 = time.perf_counter()
    model, structure = method.prune(model, tokenizer, config, calibration)
    prune_seconds = time.perf_counter() - t0
    ppl_after = perplexity(model, heldout)

    if structure is None:  # unstructured: zeros within unchanged shapes
        per_layer = layer_sparsity(model)
        removed = {n: per_layer[n] * sizes_before[n] for n in sizes_before}
    else:  # structured: parameters physically removed
        sizes_after = {name: m.weight.numel() for name, m in decoder_linears(model).items()}
        removed = {n: sizes_before[n] - sizes_after[n] for n in sizes_before}
        per_layer = {n: removed[n] / sizes_before[n] for n in sizes_before}
    params_after = sum(p.numel() for p in model.parameters())
    report = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "method": config.method, "pattern": config.pattern, "target_sparsity": config.sparsity,
        "achieved_sparsity": sum(removed.values()) / sum(sizes_before.values()),
        "achieved_sparsity_all_parameters": sum(removed.values()) / params_before,
        "layers": {n: {"target": config.sparsity, "achieved": round(s, 6)} for n, s in per_layer.items()},
        "parameters_before": params_before, "parameters_after": params_after,
        "parameters_removed_fraction": 1 - params_after / params_before,
        "nonzero_parameters_after": int(sum(int((p != 0).sum()) for p in model.parameters())),
        "structure": structure,
        "calibration_samples": len(calibration), "heldout_samples": len(heldout),
        "perplexity_before": ppl_before, "perplexity_after": ppl_after,
        "prune_seconds": round(prune_seconds, 2), "seconds": round(time.perf_counter() - started, 2),
        "peak_memory_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2, 3),
    }
    out = Path(config.out)
    with atomic_dir(out) as tmp:
        method.save(model, tmp)
        tokenizer.save_pretrained(tmp)
        write_json(Path(tmp) / "prune_report.json", report)
    return report
