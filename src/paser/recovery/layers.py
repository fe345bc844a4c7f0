"""A decoder's blocks one at a time, for any architecture: read from the checkpoint's safetensors shards, and called
with exactly the arguments the model's own forward gives them.

How the arguments are found (the way the GPTQ / SparseGPT reference code and llm-compressor's sequential pipeline
capture a layer's real inputs): the model is built on the meta device, the modules outside its decoder blocks
(embeddings, rotary embedding, ...) are materialised from the checkpoint, and every block is replaced by a recorder
that keeps what it is called with and passes its input on. One forward of the model's own code over a batch then
gives the input of block 0 (the embeddings, with whatever scale the family applies) and, for every block, its
positional and keyword arguments: the attention mask in the form and the kind (full or sliding) that block uses, the
rotary embedding, the positions. No family's internals are named here; which families reproduce the model's own
forward block by block is established by ``tests/test_layers.py`` (:data:`PARITY_TESTED`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..cache import atomic_path
from ..errors import ConfigError
from ..models import resolve_spec

log = logging.getLogger(__name__)

# the families whose block-by-block forward equals the model's forward (logits), each checked on a tiny random
# model by tests/test_layers.py; auto runs block-wise on these, and --method blockwise tries any other decoder
PARITY_TESTED = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "granite", "phi",
                 "stablelm", "cohere", "starcoder2", "gpt_neox", "falcon", "gpt2", "opt")
# what must be equal in the pruned and the original config for their blocks to be trained one against the other
BLOCK_SHAPE_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                      "num_key_value_heads")


class _Stop(Exception):
    """Raised by the last recorder: nothing after the blocks is needed (and it is on the meta device)."""


class _Recorder(torch.nn.Module):
    """Stands in for decoder block ``index``: records its call and returns its input unchanged, in the form the
    model's loop expects (a tensor, or a tuple whose first item is the hidden states)."""

    def __init__(self, block: torch.nn.Module, index: int, calls: dict, last: bool, as_tuple: bool):
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: its attributes answer the model's questions
        self.index, self.calls, self.last, self.as_tuple = index, calls, last, as_tuple

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        hidden = kwargs.pop("hidden_states") if "hidden_states" in kwargs else args[0]
        args = args if "hidden_states" in kwargs or not args else args[1:]
        self.calls[self.index] = (tuple(args), kwargs)
        if self.index == 0:
            self.calls["input"] = hidden
        if self.last:
            raise _Stop
        return (hidden,) if self.as_tuple else hidden


def call_block(block: torch.nn.Module, hidden: torch.Tensor, call: tuple[tuple, dict]) -> torch.Tensor:
    """Block ``block`` on ``hidden`` with the captured arguments; its output hidden states."""
    args, kwargs = call
    out = block(hidden, *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def decoder_layers(model: torch.nn.Module, n_layers: int) -> tuple[str, torch.nn.Module, torch.nn.ModuleList]:
    """``(prefix, owner, layers)``: the ``ModuleList`` of the decoder's blocks (the one with ``n_layers`` entries),
    the module that runs them, and their names' prefix in the checkpoint (``model.layers.``)."""
    found = [(name, module) for name, module in model.named_modules()
             if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers]
    if not found:
        raise ConfigError(f"blockwise: no list of {n_layers} decoder blocks in {type(model).__name__}")
    name, layers = found[0]
    owner_name = name.rpartition(".")[0]
    return name + ".", model.get_submodule(owner_name) if owner_name else model, layers


class LayerReader:
    """One decoder block of a checkpoint at a time, read from its safetensors shards (the rest of the model is
    never materialised): the blocks' inputs as the model's own forward makes them, block ``i``, saving block ``i``."""

    def __init__(self, spec: str, device: str):
        from transformers import AutoConfig, AutoModelForCausalLM

        self.spec, self.device = spec, device
        self.location = safetensors_folder(spec)
        self.config = AutoConfig.from_pretrained(self.location)
        self.n_layers, self.hidden_size = self.config.num_hidden_layers, self.config.hidden_size
        self.index = tensor_index(Path(self.location).glob("*.safetensors"))
        with torch.device("meta"):
            # eval: no dropout in the captured embeddings nor in the blocks (reconstruction is deterministic)
            self.skeleton = AutoModelForCausalLM.from_config(self.config).eval()
        self.prefix, self.owner, self.layers = decoder_layers(self.skeleton, self.n_layers)
        self.block_bytes = sum(p.numel() for p in self.layers[0].parameters()) * 4
        self._front: torch.nn.Module | None = None

    def _tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        names = [n for n in self.index if n.startswith(prefix)]
        tensors = {}
        for shard in sorted({self.index[n] for n in names}):
            with safe_open(shard, framework="pt") as f:
                tensors.update({n[len(prefix):]: f.get_tensor(n) for n in names if self.index[n] == shard})
        return tensors

    def _materialise_front(self) -> torch.nn.Module:
        """The module that runs the blocks, its every part but the blocks on ``device`` with the checkpoint's
        tensors (buffers the checkpoint does not hold, such as the rotary frequencies, computed as at load)."""
        if self._front is None:
            owner_prefix, _, layers_name = self.prefix.rstrip(".").rpartition(".")
            owner_prefix = owner_prefix + "." if owner_prefix else ""  # e.g. "model." (the owner's name in the checkpoint)
            for name, child in self.owner.named_children():
                if name == layers_name:
                    continue
                child.to_empty(device=self.device)
                for module in child.modules():
                    self.skeleton._init_weights(module)
                state = self._tensors(f"{owner_prefix}{name}.")
                if state:
                    child.load_state_dict({k: v.to(torch.float32) for k, v in state.items()}, strict=False)
                child.float()
            self._front = self.owner
        return self._front

    @torch.no_grad()
    def capture(self, ids: torch.Tensor, attention: torch.Tensor) -> tuple[torch.Tensor, list[tuple[tuple, dict]]]:
        """``(input of block 0, each block's call arguments)`` for one batch, from the model's own forward."""
        owner = self._materialise_front()
        as_tuple = _returns_tuple(type(self.layers[0]))
        calls: dict[Any, Any] = {}
        layers_name = self.prefix.rstrip(".").rpartition(".")[2]
        original = getattr(owner, layers_name)
        setattr(owner, layers_name, torch.nn.ModuleList(
            _Recorder(block, i, calls, i == self.n_layers - 1, as_tuple) for i, block in enumerate(original)))
        try:
            owner(input_ids=ids.to(self.device), attention_mask=attention.to(self.device), use_cache=False)
        except _Stop:
            pass
        finally:
            setattr(owner, layers_name, original)
        missing = [i for i in range(self.n_layers) if i not in calls]
        if missing or "input" not in calls:
            raise ConfigError(f"blockwise: {self.config.model_type}'s forward did not call its blocks in order through "
                              f"{self.prefix.rstrip('.')} (blocks {missing[:3]} never called): it keeps state across "
                              "blocks that a block-by-block forward cannot reproduce; use --method end-to-end")
        return calls["input"].float(), [calls[i] for i in range(self.n_layers)]

    def block(self, layer: int, dtype: torch.dtype) -> torch.nn.Module:
        block = copy.deepcopy(self.layers[layer]).to_empty(device=self.device)
        block.load_state_dict({k: v.to(dtype) for k, v in self._tensors(f"{self.prefix}{layer}.").items()})
        return block.to(dtype).requires_grad_(False)

    def save_block(self, layer: int, block: torch.nn.Module, directory: Path) -> None:
        dtype = next(iter(self._tensors(f"{self.prefix}{layer}.").values())).dtype
        state = {f"{self.prefix}{layer}.{k}": v.detach().to("cpu", dtype).contiguous() for k, v in block.state_dict().items()}
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / f"{layer:03d}.safetensors", suffix=".safetensors") as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})


def _returns_tuple(block_class: type) -> bool:
    """Whether the family's decoder block returns a tuple (older code) rather than the hidden states."""
    import inspect
    import typing

    try:
        hint = typing.get_type_hints(block_class.forward).get("return")
    except Exception:  # unresolvable annotations: read the source's annotation text instead
        hint = inspect.signature(block_class.forward).return_annotation
    return "tuple" in str(hint).lower()


def shape_mismatch(pruned: Any, original: Any) -> str | None:
    """Why the pruned model's blocks cannot be trained against the original's (None when they can): a config
    field of :data:`BLOCK_SHAPE_FIELDS` that pruning changed (structured pruning shrinks them)."""
    for field in BLOCK_SHAPE_FIELDS:
        if getattr(pruned, field, None) != getattr(original, field, None):
            return (f"pruning changed the blocks' shapes ({field}: {getattr(pruned, field, None)} vs the original's "
                    f"{getattr(original, field, None)}; structured pruning)")
    return None


def safetensors_folder(spec: str) -> str:
    """A folder holding the checkpoint's safetensors (a hub id is downloaded into the hub cache, or found there)."""
    from huggingface_hub import snapshot_download

    resolved = resolve_spec(spec)
    if resolved.is_local:
        location = resolved.location
    else:
        location = snapshot_download(resolved.location, allow_patterns=["*.json", "*.safetensors"])
    if not list(Path(location).glob("*.safetensors")):
        raise ConfigError(f"blockwise recovery reads safetensors checkpoints; {spec} has none in {location}")
    return location


def tensor_index(files: Iterable[Path]) -> dict[str, str]:
    """Tensor name -> the safetensors file that holds it (headers only: no tensor is read)."""
    index = {}
    for path in sorted(files):
        with safe_open(str(path), framework="pt") as f:
            index.update({name: str(path) for name in f.keys()})  # noqa: SIM118  (safe_open is no dict)
    return index
