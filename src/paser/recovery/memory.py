"""What a recovery needs in memory, from the models' configs alone, before any weight is read; and what this
machine has.

Each method states its own need (:meth:`paser.recovery.base.RecoveryMethod.need`) as named parts, in bytes:

- end-to-end: the student in the compute dtype; the original beside it when the objective distils from it
  (nothing with ``--teacher-cache topk``: the stored top-k is read per batch); the trained weights' gradients and
  AdamW's two moments in fp32 (LoRA's adapters, or every weight with ``--adapter full``, plus its fp32 master
  copy); the masks that keep the pruned zeros (a byte per weight of the linear layers); activations of one
  micro-batch (about 34 bytes per token, layer and hidden unit in 16 bits, Korthikanti et al. 2022, without
  recomputation) and its logits (fp32: the student's, their gradient and log-softmax, the original's two more);
- block-wise: one trained block (fp32 weights, gradient, two moments: 16 bytes a parameter; ``block_window``
  of them), the original's block beside it (fp32), the embeddings both models run to make each batch's block
  inputs (fp32), a step's activations (``block_batch_tokens`` x (12 h + 4 f) x 4 bytes, forward and backward) and
  the best pass's copy when batches are held aside; the streams are on disk and mapped, not resident;
- block-wise + KD: the larger of its two stages (they run one after the other).

A fixed 1 GB stands for the runtime (Python, torch, tokenizer, the data). The available memory is the
accelerator's free memory, or the machine's available RAM; ``PASER_MEMORY_GB`` replaces it (plan for another
machine, or leave room for other jobs). :func:`paser.recovery.policy.resolve_recovery` checks the need against it
before anything loads: ``auto`` picks what fits and says so, an explicit method that cannot fit is an error with
the figures and what would fit.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import cache

GB = 10**9
RUNTIME = GB


@dataclass(frozen=True)
class Shape:
    """A decoder's sizes, read from its config (parameters counted on the meta device: nothing is allocated)."""

    parameters: int
    block: int  # parameters of one decoder block
    linear: int  # weights of the decoder blocks' linear layers (where the pruned zeros are)
    embedding: int  # the input embedding's parameters
    hidden: int
    mlp: int
    layers: int
    vocab: int

    @classmethod
    def of(cls, spec: str) -> Shape:
        return _shape(str(spec))

    @classmethod
    def from_config(cls, config) -> Shape:
        """From a transformers config object (a model that need not exist anywhere: plans for other shapes)."""
        import torch
        from transformers import AutoModelForCausalLM

        from .layers import decoder_layers

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        _, _, layers = decoder_layers(model, config.num_hidden_layers)
        return cls(parameters=sum(p.numel() for p in model.parameters()),
                   block=sum(p.numel() for p in layers[0].parameters()),
                   linear=sum(m.weight.numel() for m in layers.modules() if isinstance(m, torch.nn.Linear)),
                   embedding=model.get_input_embeddings().weight.numel(), hidden=config.hidden_size,
                   mlp=getattr(config, "intermediate_size", None) or 4 * config.hidden_size,
                   layers=config.num_hidden_layers, vocab=config.vocab_size)


@cache
def _shape(spec: str) -> Shape:
    from transformers import AutoConfig

    from ..errors import ConfigError
    from ..models import resolve_spec

    try:
        config = AutoConfig.from_pretrained(resolve_spec(spec).location)
    except (OSError, ValueError) as error:
        raise ConfigError(f"the model's config could not be read ({spec}): {error}") from None
    return Shape.from_config(config)


@dataclass
class Need:
    """A method's memory, in named parts (bytes), for one model on one config."""

    method: str
    parts: dict[str, int] = field(default_factory=dict)
    stage: str = ""  # the stage whose need it is, for a method of several stages

    @property
    def total(self) -> int:
        return RUNTIME + sum(self.parts.values())

    def describe(self) -> str:
        parts = ", ".join(f"{name} {gb(size)}" for name, size in self.parts.items() if size)
        return f"{gb(self.total)} ({f'its {self.stage} stage: ' if self.stage else ''}{parts}, runtime {gb(RUNTIME)})"


def gb(size: float) -> str:
    return f"{size / GB:.1f} GB"


def dtype_bytes(dtype: str) -> int:
    return 2 if dtype in ("bf16", "fp16") else 4


def available_memory() -> tuple[int, str]:
    """``(bytes, where)``: ``PASER_MEMORY_GB`` if set, else the accelerator's free memory, else available RAM."""
    if os.environ.get("PASER_MEMORY_GB"):
        return int(float(os.environ["PASER_MEMORY_GB"]) * GB), "PASER_MEMORY_GB"
    import torch

    if torch.cuda.is_available():
        return torch.cuda.mem_get_info()[0], "free on the GPU"
    import psutil

    return psutil.virtual_memory().available, "available RAM"


def end_to_end_need(config, shape: Shape, dtype: str, distils: bool) -> Need:
    """The Trainer over the whole model (see the module docstring)."""
    b = dtype_bytes(dtype)
    tokens = config.micro_batch_size * config.cutoff_len
    parts = {"student": shape.parameters * b}
    if distils and config.teacher_cache != "topk":
        parts["original"] = shape.parameters * b
    if config.adapter == "full":
        parts["optimizer"] = shape.parameters * 16  # fp32 master copy, gradient, two moments
    else:  # LoRA on every linear layer of the blocks: r x (in + out) each, about 2 r (4 h + 3 (h + f)) a block
        lora = config.lora_r * (8 * shape.hidden + 6 * (shape.hidden + shape.mlp)) * shape.layers
        parts["optimizer"] = lora * 16
    parts["masks"] = shape.linear
    parts["activations"] = tokens * shape.layers * shape.hidden * 17 * b
    parts["logits"] = tokens * shape.vocab * 4 * (5 if distils else 3)
    return Need("end-to-end", parts)


def blockwise_need(config, shape: Shape) -> Need:
    """One block of each model resident (see the module docstring)."""
    window = config.block_window
    parts = {"trained block": 16 * shape.block * window, "original block": 4 * shape.block,
             "embeddings": 2 * 4 * shape.embedding,
             "activations": 2 * config.block_batch_tokens * (12 * shape.hidden + 4 * shape.mlp) * 4 * window}
    if config.block_heldout > 0:
        parts["best pass"] = 4 * shape.block * window
    return Need("blockwise", parts)
