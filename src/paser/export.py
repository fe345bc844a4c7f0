"""Deployable checkpoints: a pruned or recovered model written as compressed-tensors quantized weights (the
format vLLM serves and transformers loads), its pruned zeros kept.

Formats (``EXPORT_FORMATS``; llmcompressor's preset schemes, ``lm_head`` left in full precision):

- ``dense``: the model as it is (plain tensors, zeros included): today's folder.
- ``w4a16``: 4-bit integer weights, symmetric, one scale per group of 128 inputs (64 or 32 where a layer's input
  width is not a multiple of 128, e.g. SmolLM2-135M's 576; the report says which); activations unquantized.
- ``w8a8``: 8-bit integer weights, symmetric, one scale per output channel; activations quantized per token at
  run time (dynamic, so no activation statistics are calibrated).

Methods: ``rtn`` (round to nearest, llmcompressor's ``QuantizationModifier``; the default) needs no data and keeps
every zero exactly: the schemes are symmetric, so a zero weight rounds to the integer 0. ``gptq``
(``GPTQModifier``) is calibrated on instruction records (``calib_data``; default the recovery data named in the
model's ``train_log.json``) and compensates each column's rounding error on the columns not yet quantized, pruned
positions included (llmcompressor 0.14 has no sparsity mask for it), so the pruned positions are set back to zero
after quantization, a value every symmetric grid holds.

Why not a sparse-compressed file: compressed-tensors removed its sparse-bitmask and 2:4 compressors in 0.15 and
transformers 5.x no longer loads them; the quantized formats above are what serving engines read today, and
quantizing keeps the zeros as zeros (checked: ``export_report.json`` lists each pruned layer's sparsity before and
after, read back from the written folder).

Sample (what ``paser export`` runs)::

    paser export runs/tokens/recover/default-s0/merged --format w4a16 --out exported/w4a16
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import torch
from pydantic import Field

from . import faults
from .cache import atomic_dir, package_versions, write_json
from .data import PromptFormatter, load_records
from .errors import ConfigError, DataError, ModelError
from .options import check_declared, option
from .registry import Registry
from .sparsity import SPARSE_LAYER_MIN_ZEROS, apply_masks, sparsity_masks

# llmcompressor, compressed-tensors, datasets and transformers are imported when an export runs: they take
# seconds to load and nothing else in paser needs them.

CALIBRATION_BATCH = 8


class ExportFormat:
    """How a model is written: ``scheme`` is llmcompressor's preset (None: unquantized)."""

    name = "base"
    scheme: str | None = None
    version = 1


EXPORT_FORMATS: Registry[ExportFormat] = Registry("export format", "paser.export")


@EXPORT_FORMATS.register("dense")
class Dense(ExportFormat):
    """Plain tensors in the model's dtype, zeros included."""


@EXPORT_FORMATS.register("w4a16")
class W4A16(ExportFormat):
    """int4 weights (symmetric, groups of 128), 16-bit activations."""

    scheme = "W4A16"


@EXPORT_FORMATS.register("w8a8")
class W8A8(ExportFormat):
    """int8 weights (symmetric, per channel), int8 activations quantized per token at run time."""

    scheme = "W8A8"


@dataclass
class ExportConfig:
    model: str = option(help="A model folder: paser prune's output, paser recover's OUT/merged, or any save_pretrained "
        "folder.", cli='argument')
    out: str = option(help="Output folder (written whole or not at all): the checkpoint, its tokenizer, "
        "export_report.json.")
    format: str = option('w4a16', "Checkpoint format: compressed-tensors, what vLLM serves.")
    method: Literal["rtn", "gptq"] = option('rtn', "rtn: round to nearest, no data, every zero stays zero | gptq: "
        "calibrated on --calib-data, pruned positions set back to zero.")
    calib_data: str | None = option(None, "--method gptq: instruction records (default: the recovery data in "
        "MODEL/../train_log.json).")
    calib_samples: Annotated[int, Field(ge=1)] = option(128, "--method gptq: records to calibrate on.")
    seq_len: Annotated[int, Field(ge=8)] = option(256, "--method gptq: tokens per calibration record at most.")

    REGISTERED: ClassVar[dict[str, Registry]] = {"format": EXPORT_FORMATS}
    CONFIG_ONLY: ClassVar[frozenset[str]] = frozenset()  # every field is a ``paser export`` option

    def validate(self) -> None:
        check_declared(self)
        if self.format == "dense" and self.method != "rtn":
            raise ConfigError("format dense writes the model unquantized: --method applies to w4a16 and w8a8 only")


def _model_folder(spec: str) -> Path:
    path = Path(spec)
    if not path.is_dir():
        raise ModelError(f"{spec}: not a model folder (paser export reads a folder written by paser prune, "
                         f"paser recover or save_pretrained)")
    if not (path / "config.json").is_file():
        raise ModelError(f"{spec}: not a Hugging Face model folder (no config.json)")
    try:
        quantized = json.loads((path / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path / 'config.json'}:{exc.lineno}: not valid JSON ({exc.msg})") from None
    if quantized:
        raise ModelError(f"{spec}: already quantized ({quantized.get('quant_method', 'unknown method')}); "
                         f"export the unquantized model")
    return path


def _calibration_source(config: ExportConfig, folder: Path) -> str:
    if config.calib_data:
        return config.calib_data
    log_path = folder.parent / "train_log.json"  # paser recover writes OUT/merged beside OUT/train_log.json
    if log_path.is_file():
        data = json.loads(log_path.read_text(encoding="utf-8")).get("config", {}).get("data")
        if data:
            return data
    raise ConfigError(f"--method gptq needs calibration records: give --calib-data (no recovery data is recorded "
                      f"in {log_path})")


def calibration_windows(source: str, tokenizer: Any, count: int, seq_len: int) -> list[list[int]]:
    """Formatted instruction records, one per window (prompt and answer, up to ``seq_len`` tokens), validated
    before the model loads: a bad record stops here with its file, line and field."""

    records = load_records(source, limit=count, bad_records="error")
    formatter = PromptFormatter(tokenizer, max_length=seq_len)
    return [formatter.encode(record).input_ids for record in records]


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def _weight_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def _zero_fractions(model: torch.nn.Module, names: list[str]) -> dict[str, float]:
    modules = dict(model.named_modules())
    return {name: (modules[name].weight == 0).float().mean().item() for name in names}


def dequantized_model(folder: str | Path) -> Any:
    """A written folder loaded back with its integer weights expanded to floats (transformers alone)."""
    from transformers import AutoModelForCausalLM
    from transformers.utils.quantization_config import CompressedTensorsConfig

    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    if not config.get("quantization_config"):
        return AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    return AutoModelForCausalLM.from_pretrained(folder, dtype="auto",
                                                quantization_config=CompressedTensorsConfig(dequantize=True))


GROUP_SIZES = (128, 64, 32, 16)  # int4 group sizes serving kernels take (vLLM's Marlin: 128, 64, 32)


def quantized_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The layers an export quantizes: every linear layer but ``lm_head``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] != "lm_head"}


def group_size(model: torch.nn.Module) -> int:
    """The largest of :data:`GROUP_SIZES` that divides every quantized layer's input width."""
    widths = {m.in_features for m in quantized_linears(model).values()}
    for size in GROUP_SIZES:
        if all(w % size == 0 for w in widths):
            return size
    raise ModelError(f"no int4 group size in {GROUP_SIZES} divides every layer's input width {sorted(widths)}: "
                     f"use --format w8a8 (one scale per channel)")


def _recipe(model: torch.nn.Module, fmt: ExportFormat, method: str) -> tuple[Any, dict[str, Any]]:
    """The llmcompressor modifier for ``fmt`` and what it quantizes with (for the report)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from llmcompressor.modifiers.gptq import GPTQModifier
    from llmcompressor.modifiers.quantization import QuantizationModifier

    modifier = QuantizationModifier if method == "rtn" else GPTQModifier
    if fmt.scheme == "W4A16" and (size := group_size(model)) != 128:
        weights = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group", group_size=size)
        groups = {"group_0": QuantizationScheme(targets=["Linear"], weights=weights)}
        return modifier(config_groups=groups, ignore=["lm_head"]), {"group_size": size}
    details = {"group_size": 128} if fmt.scheme == "W4A16" else {}
    return modifier(targets="Linear", scheme=fmt.scheme, ignore=["lm_head"]), details


def _quantize(model: Any, tokenizer: Any, fmt: ExportFormat, config: ExportConfig,
              calibration: list[list[int]] | None) -> dict[str, Any]:
    from llmcompressor import oneshot

    recipe, details = _recipe(model, fmt, config.method)
    if config.method == "rtn":
        oneshot(model=model, recipe=recipe)
        return details
    from datasets import Dataset

    dataset = Dataset.from_dict({"input_ids": calibration, "attention_mask": [[1] * len(s) for s in calibration]})
    oneshot(model=model, tokenizer=tokenizer, dataset=dataset, recipe=recipe, num_calibration_samples=len(calibration),
            max_seq_length=config.seq_len, batch_size=1, shuffle_calibration_samples=False)
    return details


def _calibration(config: ExportConfig, fmt: Any, folder: Path, tokenizer: Any) -> tuple[Any, str | None]:
    """GPTQ's calibration windows and where they came from (none for rtn and dense)."""
    if not (fmt.scheme and config.method == "gptq"):
        return None, None
    source = _calibration_source(config, folder)
    try:
        return calibration_windows(source, tokenizer, config.calib_samples, config.seq_len), source
    except FileNotFoundError as exc:
        raise DataError(f"calibration data not found: {exc.filename or source}") from None


def run_export(config: ExportConfig) -> dict:
    """Write ``config.model`` to ``config.out`` in ``config.format``; returns ``export_report.json``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config.validate()
    folder = _model_folder(config.model)
    fmt = EXPORT_FORMATS.get(config.format)
    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    calibration, calib_source = _calibration(config, fmt, folder, tokenizer)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    except (OSError, ValueError) as exc:
        raise ModelError(f"{folder}: cannot be loaded as a causal language model ({exc})") from None
    quantized = quantized_linears(model)
    masks = {n: m for n, m in sparsity_masks(model).items() if n in quantized}  # the pruned layers (lm_head is not)
    sparsity_before = _zero_fractions(model, sorted(masks))
    details: dict[str, Any] = {}
    if fmt.scheme:
        details = _quantize(model, tokenizer, fmt, config, calibration)
        apply_masks(model, masks)  # rtn: already zero; gptq: its error compensation moved them
    out = Path(config.out)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp, save_compressed=bool(fmt.scheme))
        tokenizer.save_pretrained(tmp)
        for name in ("prune_report.json", "train_log.json"):  # the provenance paser evaluate and report read
            if (folder / name).is_file():
                (Path(tmp) / name).write_bytes((folder / name).read_bytes())
        written = dequantized_model(tmp)  # read back: what a user's loader sees
        sparsity_after = _zero_fractions(written, sorted(masks))
        del written
        lost = {n: (sparsity_before[n], sparsity_after[n]) for n in masks if sparsity_after[n] < sparsity_before[n]}
        if lost:
            name, (before, after) = next(iter(lost.items()))
            raise ModelError(f"export lost pruned zeros in {len(lost)} layer(s), e.g. {name}: "
                             f"{before:.4f} -> {after:.4f}; nothing written to {out}")
        report = {
            "config": asdict(config), "format": fmt.name, "scheme": fmt.scheme,
            "method": config.method if fmt.scheme else None, "ignored": ["lm_head"] if fmt.scheme else [],
            "quantized_layers": len(quantized) if fmt.scheme else 0, **details,
            "calibration": {"source": calib_source, "records": len(calibration)} if calibration else None,
            "size_bytes": {"input_weights": _weight_bytes(folder), "output_weights": _weight_bytes(Path(tmp)),
                           "input_folder": _folder_bytes(folder)},
            "pruned_layers": len(masks), "sparse_layer_min_zeros": SPARSE_LAYER_MIN_ZEROS,
            "sparsity": {"input_min": min(sparsity_before.values(), default=None),
                         "output_min": min(sparsity_after.values(), default=None),
                         "layers": {n: {"input": round(sparsity_before[n], 6), "output": round(sparsity_after[n], 6)}
                                    for n in sorted(masks)}},
            "seconds": round(time.perf_counter() - started, 2),
            "versions": package_versions("llmcompressor", "compressed-tensors", "transformers", "torch"),
        }
        report["size_bytes"]["output_folder"] = _folder_bytes(Path(tmp)) + len(json.dumps(report))
        report["size_bytes"]["weights_ratio"] = round(report["size_bytes"]["output_weights"]
                                                      / max(report["size_bytes"]["input_weights"], 1), 4)
        write_json(Path(tmp) / "export_report.json", report)
        faults.reached("export.written")  # a kill here must leave ``out`` as it was
    return report
