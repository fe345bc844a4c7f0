"""The recovery stage's settings: :class:`RecoverConfig`, the shared fields (:class:`RecoverBase`) joined with
every registered recovery method's, objective's and training target's own options. Which of them a given
recovery reads is derived from the same declarations (:mod:`paser.recovery.reads`); ``auto`` is resolved by
:mod:`paser.recovery.policy`; :func:`paser.recovery.run.run_recovery` runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from .. import distributed
from ..errors import ConfigError
from ..models import DTYPE_HELP, Dtype
from ..objectives import OBJECTIVES
from ..options import check_declared, joined_config, option
from ..targets import TARGETS
from .base import RECOVERY_METHODS


@dataclass
class RecoverBase:
    """Recovery settings shared by every method, objective and target; each one's own are declared on it
    (``options``) and joined into :class:`RecoverConfig` below. Defaults are the CLI's."""

    CONFIG_ONLY: ClassVar[frozenset[str]] = frozenset()  # every field is a ``paser recover`` option
    REGISTERED: ClassVar[dict[str, Any]] = {"method": RECOVERY_METHODS, "loss": OBJECTIVES, "targets": TARGETS}

    model: str = option(help="Pruned model spec to recover.", cli='argument')
    data: str = option(help="Training data: selected.jsonl from 'paser select' or any source paser reads.")
    out: str | Path = option(help="Output directory: LoRA adapter, merged model, train_log.json.")
    method: str = option('auto', "How recovery trains.")
    epochs: Annotated[float, Field(gt=0)] = option(2.0, "Training epochs.")
    lr: Annotated[float, Field(gt=0)] | None = option(None, "Peak learning rate (cosine schedule with warmup); default:"
        " 1e-3 for LoRA (a small slice trains few steps), 1e-4 for --adapter full.")
    lora_r: Annotated[int, Field(ge=1)] = option(8, "LoRA rank.")
    lora_alpha: int = option(16, "LoRA alpha.")
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] = option(0.05, "LoRA dropout.")
    lora_targets: str = option('all-linear', "LoRA target modules (peft syntax), e.g. all-linear or q_proj,v_proj.")
    cutoff_len: int = option(256, "Maximum tokens per example.")
    batch_size: int = option(64, "Effective batch size (micro-batch x gradient accumulation).")
    micro_batch_size: Annotated[int, Field(ge=1)] = option(4, "Examples per forward pass.")
    warmup_ratio: float = option(0.05, "Fraction of the optimizer steps spent warming up.")
    dtype: Dtype = option("auto", DTYPE_HELP)
    seed: int = option(0, "Seed for LoRA init, data order and dropout.")
    resume: bool = option(True, "Continue from the last checkpoint in OUT/checkpoints when it was made with the same "
        "settings and data (--no-resume starts afresh).")
    save_steps: int = option(50, "Checkpoint every N optimizer steps (what --resume restarts from).")
    template: Literal["auto", "chat", "alpaca"] = option('auto', "Prompt template: auto (the tokenizer's chat template "
        "when it has one, else alpaca) | chat | alpaca.")
    limit: int | None = option(None, "Train on the first N records only.")
    bad_records: Literal["skip", "error"] = option('skip', "skip: leave out unusable records, count them in "
        "train_log.json | error: stop at the first.")
    group_by_length: bool = option(True, "Batch records of similar length (less padding); off: a seeded random order, "
        "identical for any number of processes.")
    adapter: Literal["lora", "full"] = option('lora', "lora | full (every weight trains; pruned positions stay zero).")
    sparse_lora: Literal["masked", "off"] = option('masked', "masked: the LoRA update is masked to the pruned layer's "
        "non-zeros while training, so the merged model is the trained one | off: plain LoRA, zeros re-applied"
        " after the merge.")
    loss: str = option('auto', "The training loss; auto: kd when the original model is known (--teacher, or "
        "the model paser prune started from, recorded in MODEL/prune_report.json), else nll.")
    teacher: str | None = option(None, "The original, dense model: the teacher, block-wise's target and original targets' author "
        "(default: the one recorded by paser prune).")
    targets: str = option('reference', "What to train toward (original needs the original model: --teacher or the "
        "one paser prune recorded).")
    max_train_tokens: Annotated[int, Field(ge=1)] | None = option(None, "Train on the records in order while their "
        "tokens (prompt + response within --cutoff-len) fit: keeps a token budget when --targets original "
        "changes the answers' lengths (paser run passes the selection's).")
    kd_temperature: Annotated[float, Field(gt=0)] = option(1.0, "Softmax temperature of both distributions in the KL.")
    kd_positions: Literal["response", "all"] = option('response', "Where the KL (and kd-features' hidden-state loss) "
        "is read: response | all (prompt positions too).")
    teacher_cache: Literal["none", "topk"] = option('none', "none (the teacher runs beside the student) | topk "
        "(its top-k log-probs computed once and stored; only the student stays in memory).")
    teacher_topk: Annotated[int, Field(ge=1)] = option(64, "With --teacher-cache topk: k.")
    generated_tokens: Annotated[float, Field(ge=0)] = option(0.0, "The original writes about N tokens per real "
        "training token (sampled continuations of each record's prompt and of prefixes of its text), trained on beside "
        "the records: compute, not data (cached, resumable).")
    generated_temperature: Annotated[float, Field(gt=0)] = option(1.0, "Sampling temperature of the original's tokens.")
    generated_top_p: Annotated[float, Field(gt=0, le=1)] = option(0.95, "Nucleus (top-p) of the original's tokens.")
    generated_batch_size: Annotated[int, Field(ge=1)] = option(16, "Prefixes the original continues at once.")
    fsdp: bool = option(False, "Under accelerate launch / torchrun: shard parameters, gradients and optimizer state "
        "across the processes (FSDP2), for models that do not fit one device.")

    def validate(self) -> None:
        """The declared choices and bounds (:func:`paser.options.check_declared`), then what relates fields (those
        that need ``auto`` resolved, such as the original model, are checked by the policy)."""
        if self.loss != "auto":
            check_declared(self)
        else:  # auto is resolved later (paser.recovery.policy): check the rest as if it were nll
            check_declared(replace(self, loss="nll"))
        if self.loss != "auto" and OBJECTIVES.get(self.loss).needs_live_teacher and self.teacher_cache != "none":
            raise ConfigError(f"loss '{self.loss}' reads the original's hidden states: use --teacher-cache none")
        RECOVERY_METHODS.get(self.method).validate(self)
        if self.teacher_cache == "topk" and (self.kd_positions != "response" or self.kd_temperature != 1.0):
            raise ConfigError("the top-k teacher cache holds response positions at temperature 1: use "
                              "kd_positions response and kd_temperature 1")
        if self.batch_size < self.micro_batch_size:
            raise ConfigError("batch_size must be >= micro_batch_size >= 1")
        world = distributed.world_size()
        if self.batch_size % (self.micro_batch_size * world):
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                              f"({self.micro_batch_size})" + (f" x {world} processes" if world > 1 else ""))


def recover_options_owners() -> list[tuple[str, Any]]:
    """Every registered object whose declared options are recovery settings (``RecoverConfig`` fields)."""
    return [*RECOVERY_METHODS.items(), *TARGETS.items(), *OBJECTIVES.items()]


RecoverConfig = joined_config("RecoverConfig", RecoverBase, recover_options_owners(), __name__,
                              "Recovery settings: RecoverBase's and every registered recovery method's, training "
                              "target's and objective's (their ``options``). Defaults are the CLI's.")
