"""LoRA recovery of a pruned model: peft adapters trained with the transformers Trainer.

- The loss covers response tokens only: prompt positions carry label -100 (same template and
  prompt/response split as selection, via :class:`paser.data.PromptFormatter`).
- Gradient accumulation (``batch_size / (micro_batch_size x processes)``), warmup, cosine schedule, seeded.
- Several processes (``accelerate launch -m paser recover ...`` or ``torchrun``): the Trainer runs DDP; the
  effective batch stays ``batch_size``, every rank sees the micro-batches a single process would accumulate
  (accelerate hands them out in turn), and rank 0 alone merges and writes.
- Outputs in ``out``: ``adapter/`` (peft), ``merged/`` (a plain model directory with the tokenizer),
  ``train_log.json`` (loss curve, tokens/s, seconds, peak memory) and ``checkpoints/`` for ``--resume``.
- Pruned zeros survive the merge: for every linear layer that is at least 1% zeros before training,
  the zero mask is re-applied to the merged weight, so unstructured and N:M sparsity stay exact.
"""

from __future__ import annotations

import json
import logging
import resource
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Sequence

import torch
from pydantic import Field

from . import distributed, faults
from .cache import atomic_dir, stable_hash, write_json
from .data import Encoded, PromptFormatter, encode_records, load_records, pad_right
from .errors import ConfigError
from .models import check_compatible, load_model, resolve_dtype_name
from .objectives import OBJECTIVES
from .options import check_declared, joined_config
from .targets import TARGETS
from .sparsity import apply_masks, sparsity_masks

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class RecoverBase:
    """Recovery settings shared by every objective and target; each target's and objective's own are declared on
    it (``options``) and joined into :class:`RecoverConfig` below. Defaults are the CLI's."""

    CONFIG_ONLY: ClassVar[frozenset[str]] = frozenset()  # every field is a ``paser recover`` option
    REGISTERED: ClassVar[dict[str, Any]] = {"loss": OBJECTIVES, "targets": TARGETS}

    model: str
    data: str
    out: str | Path
    epochs: Annotated[float, Field(gt=0)] = 2.0
    lr: Annotated[float, Field(gt=0)] | None = None  # None: the adapter's (DEFAULT_LR, resolve_lr)
    lora_r: Annotated[int, Field(ge=1)] = 8
    lora_alpha: int = 16
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.05
    lora_targets: str = "all-linear"  # peft target_modules: "all-linear" or comma-separated module names
    cutoff_len: int = 256
    batch_size: int = 64  # effective batch (micro_batch_size x gradient accumulation)
    micro_batch_size: Annotated[int, Field(ge=1)] = 4
    warmup_ratio: float = 0.05  # fraction of the optimizer steps spent warming up
    dtype: Literal["auto", "bf16", "fp32", "fp16"] = "auto"
    seed: int = 0
    resume: bool = True  # continue from OUT/checkpoints when they were made with these settings and data
    save_steps: int = 50  # checkpoint every N optimizer steps (what a rerun resumes from)
    template: Literal["auto", "chat", "alpaca"] = "auto"
    limit: int | None = None
    bad_records: Literal["skip", "error"] = "skip"  # skip: leave unusable records out and report them | error: stop at the first
    group_by_length: bool = True  # micro-batches of similar lengths (less padding: faster steps)
    adapter: Literal["lora", "full"] = "lora"  # lora | full (every weight, pruned positions kept at zero)
    # masked: the LoRA update keeps the pruned zeros while training | off: re-mask after merge
    sparse_lora: Literal["masked", "off"] = "masked"
    loss: str = "auto"  # auto: kd when the original is known, else nll | nll (the targets' answers) | kd | mix | rho
    teacher: str | None = None  # the original model: kd/mix's teacher, original targets' author (``paser run``: its model)
    targets: str = "reference"  # reference: the data's answers | original: the original model's own (paser.targets)
    # train on the records in order while their tokens (prompt + response within cutoff_len) fit: a token budget
    # kept when the targets change the answers' lengths (``paser run`` passes the selection's token budget)
    max_train_tokens: Annotated[int, Field(ge=1)] | None = None
    kd_temperature: Annotated[float, Field(gt=0)] = 1.0
    kd_positions: Literal["response", "all"] = "response"  # response | all (prompt positions too)
    # none: the teacher runs live | topk: its top-k log-probs computed once, stored
    teacher_cache: Literal["none", "topk"] = "none"
    teacher_topk: Annotated[int, Field(ge=1)] = 64  # k of the teacher cache
    fsdp: bool = False  # under a launcher: shard parameters, gradients and optimizer state (FSDP2) across processes

    def validate(self) -> None:
        """The declared choices and bounds (:func:`paser.options.check_declared`), then what relates fields."""
        if self.loss != "auto":
            check_declared(self)
        else:  # auto is resolved later (resolve_loss): check the rest as if it were nll
            check_declared(replace(self, loss="nll"))
        if TARGETS.get(self.targets).needs_original and not self.teacher and recorded_original(self.model) is None:
            raise ConfigError(f"targets '{self.targets}' needs the original model (--teacher)")
        if self.loss != "auto" and OBJECTIVES.get(self.loss).needs_teacher and not self.teacher:
            raise ConfigError(f"loss '{self.loss}' needs a teacher model (--teacher, the original model)")
        if self.teacher_cache == "topk" and (self.kd_positions != "response" or self.kd_temperature != 1.0):
            raise ConfigError("the top-k teacher cache holds response positions at temperature 1: use "
                              "kd_positions response and kd_temperature 1")
        if self.batch_size < self.micro_batch_size:
            raise ConfigError("batch_size must be >= micro_batch_size >= 1")
        from . import distributed

        world = distributed.world_size()
        if self.batch_size % (self.micro_batch_size * world):
            raise ConfigError(f"batch_size ({self.batch_size}) must be a multiple of micro_batch_size "
                              f"({self.micro_batch_size})" + (f" x {world} processes" if world > 1 else ""))


RecoverConfig = joined_config("RecoverConfig", RecoverBase, [*TARGETS.items(), *OBJECTIVES.items()], __name__,
                              "Recovery settings: RecoverBase's and every registered training target's and "
                              "objective's (their ``options``). Defaults are the CLI's.")


def recorded_original(model: str | Path) -> str | None:
    """The model ``paser prune`` started from, as recorded in ``MODEL/prune_report.json``; None when the
    folder has no report or the recorded model is a path that no longer exists."""
    report = Path(str(model)).expanduser() / "prune_report.json"
    try:
        original = json.loads(report.read_text())["config"]["model"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if original.startswith((".", "/", "~")) and not Path(original).expanduser().exists():
        log.warning("%s names the original model %s, which is not there: no teacher", report, original)
        return None
    return str(original)


# The peak learning rate when none is given, per adapter, for recovery slices of a few hundred records (tens of
# optimizer steps): at LoRA's usual 2e-4 such a run removed a tenth of the KL pruning added, at 1e-3 about twice
# that, on NLL and KD alike (docs/fidelity.md, table 5; distillation's target is the original, so the larger step
# does not pull the model away from it). Full-parameter: 2e-5, the usual full fine-tuning rate, barely moved in 50
# steps; 1e-4 recovered (docs/recovery.md).
DEFAULT_LR = {"lora": 1e-3, "full": 1e-4}


def resolve_lr(lr: float | None, adapter: str) -> float:
    """``lr``, or the adapter's default (:data:`DEFAULT_LR`) when it is None."""
    return DEFAULT_LR[adapter] if lr is None else lr


def resolve_original(config: RecoverConfig) -> RecoverConfig:
    """``loss: auto`` made concrete (:func:`resolve_loss`), ``lr`` filled in from the adapter's default
    (:func:`resolve_lr`), and the original model filled in where the targets need it and ``--teacher`` is not
    given (the model ``paser prune`` recorded)."""
    config = replace(resolve_loss(config), lr=resolve_lr(config.lr, config.adapter))
    if TARGETS.get(config.targets).needs_original and not config.teacher:
        config = replace(config, teacher=recorded_original(config.model))
    return config


def resolve_loss(config: RecoverConfig) -> RecoverConfig:
    """``loss: auto`` (the default) made concrete: ``kd`` whenever the original is known (``--teacher``, or
    recorded by ``paser prune`` in the pruned folder), else ``nll``. At equal training tokens, distilling the
    original's next-token distributions removed more of the KL pruning added, and recovered more WikiText-2
    perplexity, than NLL on the reference answers (docs/fidelity.md); it fits the pool's own reference answers
    less well, which is not what recovery is for."""
    if config.loss != "auto":
        return config
    teacher = config.teacher or recorded_original(config.model)
    if teacher is None:
        log.info("loss auto: no original model known (--teacher), training on the reference answers (nll)")
    return replace(config, loss="kd" if teacher else "nll", teacher=teacher)


def within_tokens(encoded: Sequence[Encoded], max_tokens: int) -> tuple[list[Encoded], int]:
    """The longest prefix of ``encoded`` (selection order) whose tokens fit ``max_tokens`` (at least one record),
    and how many records were left out."""
    total, kept = 0, 0
    for e in encoded:
        if total + len(e.input_ids) > max_tokens and kept:
            break
        total += len(e.input_ids)
        kept += 1
    return list(encoded[:kept]), len(encoded) - kept


def labels_for(encoded: Encoded) -> list[int]:
    """Training labels: prompt positions masked, response tokens kept."""
    return [IGNORE_INDEX] * len(encoded.prompt_ids) + list(encoded.response_ids)


class _Examples(torch.utils.data.Dataset):
    def __init__(self, encoded: Sequence[Encoded], with_record: bool = False):
        self.items = [{"input_ids": e.input_ids, "labels": labels_for(e), **({"record": i} if with_record else {})}
                      for i, e in enumerate(encoded)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def collate_for_training(features: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; padding gets attention 0 and label -100."""
    ids, attention = pad_right([f["input_ids"] for f in features], pad_id)
    labels, _ = pad_right([f["labels"] for f in features], IGNORE_INDEX)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": attention}
    if "record" in features[0]:  # which records: the teacher cache's rows
        batch["record"] = torch.tensor([f["record"] for f in features])
    return batch


def _peak_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1024**3
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def _report_saves() -> Any:
    """A callback that marks each finished checkpoint for the kill-and-resume hook (:mod:`paser.faults`)."""
    from transformers import TrainerCallback

    class ReportSaves(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            faults.reached("recover.saved")

    return ReportSaves()


def _checkpoint_to_resume(config: RecoverConfig, checkpoints: Path, encoded: Sequence[Encoded],
                          dtype: str) -> str | None:
    """The last checkpoint in ``checkpoints`` if it was made by this very training run (same settings,
    model and data), else None; stale checkpoints of other settings are removed first."""
    import json
    import shutil

    from .models import model_fingerprint

    settings = {k: v for k, v in asdict(config).items() if k not in {"out", "resume", "data", "limit", "save_steps"}}
    key = stable_hash("recover-v1", settings, model_fingerprint(config.model), dtype,
                      [e.input_ids for e in encoded], [len(e.prompt_ids) for e in encoded])
    marker = checkpoints / "paser_run.json"
    existing = sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1]))
    try:
        same = json.loads(marker.read_text())["key"] == key
    except (FileNotFoundError, ValueError, KeyError):
        same = False
    if existing and not (config.resume and same):
        why = "--no-resume" if not config.resume else "they were made with other settings or data"
        log.warning("starting afresh: removing %d checkpoint(s) in %s (%s)", len(existing), checkpoints, why)
        shutil.rmtree(checkpoints)
        existing = []
    checkpoints.mkdir(parents=True, exist_ok=True)
    write_json(marker, {"key": key})
    if existing:
        log.info("resuming from %s", existing[-1])
        return str(existing[-1])
    return None


def run_recovery(config: RecoverConfig, callbacks: Sequence[Any] = ()) -> dict:
    """Train (LoRA, or all weights) on ``config.data``, merge, and write the outputs; returns the train log."""
    from peft import get_peft_model
    from transformers import TrainingArguments, set_seed

    from .adapters import lora_config
    from .distill import trainer_class

    config.validate()
    config = resolve_original(config)
    out = Path(config.out)
    # validated before any model loads
    records = load_records(config.data, limit=config.limit, bad_records=config.bad_records)
    skipped = records.skipped
    dtype = resolve_dtype_name(config.dtype)
    set_seed(config.seed)
    model, tokenizer = load_model(config.model, dtype=dtype)
    formatter = PromptFormatter(tokenizer, template=config.template, max_length=config.cutoff_len)
    records, target_info = TARGETS.get(config.targets).build(records, config, tokenizer, dtype)
    records, encoded = encode_records(formatter, records, config.bad_records, skipped)
    if config.max_train_tokens is not None:
        encoded, target_info["dropped_for_token_budget"] = within_tokens(encoded, config.max_train_tokens)
        records = records[:len(encoded)]
    masks = sparsity_masks(model)
    masked = config.adapter == "lora" and config.sparse_lora == "masked" and bool(masks)
    log.info("%d records; %d sparse linear layers keep their zeros (%s)", len(encoded), len(masks),
             "full-parameter, gradients masked" if config.adapter == "full"
             else "masked LoRA: exact" if masked else "LoRA, re-masked after the merge")
    objective = OBJECTIVES.get(config.loss)
    teacher = None
    if objective.needs_teacher:
        teacher, teacher_tokenizer = load_model(config.teacher or config.model, dtype=dtype)
        check_compatible(tokenizer, teacher_tokenizer, model, teacher)
        teacher.eval().requires_grad_(False)
        if config.teacher_cache == "topk":
            teacher = _teacher_store(teacher, config, encoded, tokenizer.pad_token_id, dtype)  # frees the teacher

    def trainable(base: Any) -> Any:
        if config.adapter == "lora":
            targets: Any = (config.lora_targets if config.lora_targets == "all-linear"
                            else [t.strip() for t in config.lora_targets.split(",")])
            return get_peft_model(base, lora_config(config.lora_r, config.lora_alpha, config.lora_dropout, targets,
                                                    masked))
        base.requires_grad_(True)
        _mask_gradients(base, masks)
        return base

    model = trainable(model)
    accumulation = config.batch_size // (config.micro_batch_size * distributed.world_size())
    checkpoints = out / "checkpoints"
    args = TrainingArguments(
        output_dir=str(checkpoints), per_device_train_batch_size=config.micro_batch_size,
        gradient_accumulation_steps=accumulation, num_train_epochs=config.epochs, learning_rate=config.lr,
        lr_scheduler_type="cosine", warmup_steps=config.warmup_ratio, logging_steps=1, weight_decay=0.0,
        save_strategy="steps", save_steps=config.save_steps, save_total_limit=2, seed=config.seed,
        data_seed=config.seed, report_to=[], bf16=dtype == "bf16", use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=False,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        ddp_find_unused_parameters=False,
        fsdp=True if config.fsdp else None, fsdp_config={"version": 2} if config.fsdp else None,
    )
    extra = [_keep_zeros(masks)] if config.adapter == "full" and masks else []
    trainer = trainer_class(objective)(
        model=model, args=args, train_dataset=_Examples(encoded, with_record=config.teacher_cache == "topk"),
        data_collator=lambda f: collate_for_training(f, tokenizer.pad_token_id),
        callbacks=[*callbacks, *extra, _report_saves()],
        **({"teacher": teacher, "objective": objective, "settings": config} if objective.needs_teacher else {}))
    resume_from = _checkpoint_to_resume(config, checkpoints, encoded, dtype) if distributed.is_main() else None
    resume_from = distributed.all_gather(resume_from)[0]  # every rank resumes from rank 0's choice
    t0 = time.perf_counter()
    result = trainer.train(resume_from_checkpoint=resume_from)
    seconds = time.perf_counter() - t0

    if config.fsdp:  # every rank takes part in gathering the shards; rank 0 rebuilds the whole trained model
        state = trainer.accelerator.get_state_dict(trainer.model)
        if distributed.is_main():
            model = trainable(load_model(config.model, dtype=dtype, tokenizer=False)[0])
            model.load_state_dict(state)
    if not distributed.is_main():
        distributed.barrier()  # rank 0 merges and writes
        return json.loads((out / "train_log.json").read_text())
    trained_tokens = sum(len(e.input_ids) for e in encoded) * config.epochs
    losses = [{"step": h["step"], "loss": h["loss"], "lr": h.get("learning_rate"),
               **{k: h[k] for k in ("nll", "kd") if k in h}}
              for h in trainer.state.log_history if "loss" in h]
    probe = [collate_for_training(trainer.train_dataset[i:i + config.micro_batch_size], tokenizer.pad_token_id)
             for i in range(0, min(len(encoded), 2 * config.micro_batch_size), config.micro_batch_size)]
    trained_logits = _logits(model, probe)
    if config.adapter == "lora":
        model.save_pretrained(out / "adapter")
        merged = model.merge_and_unload()
    else:
        merged = model
    apply_masks(merged, masks)  # exact already for masked LoRA and full; today's re-masking for sparse_lora=off
    merge_diff = max((a - b).abs().max().item() for a, b in zip(trained_logits, _logits(merged, probe)))
    with atomic_dir(out / "merged") as tmp:
        merged.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    zeros_after = sum(int((dict(merged.named_modules())[n].weight == 0).sum()) for n in masks)
    train_log = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "dtype": dtype, "records": len(encoded), "steps": trainer.state.global_step,
        "epochs": config.epochs, "loss_curve": losses, "final_train_loss": result.training_loss,
        "seconds": round(seconds, 2), "tokens_per_s": round(trained_tokens / seconds, 1) if seconds else None,
        "seconds_per_step": round(seconds / max(trainer.state.global_step, 1), 3),
        "peak_memory_gb": round(_peak_memory_gb(), 3), "sparse_layers": len(masks),
        "zeros_kept": int(sum(m.sum().item() for m in masks.values())), "zeros_after_merge": zeros_after,
        "sparse_lora": "masked" if masked else "off", "merge_max_logit_diff": merge_diff,
        "resumed_from": resume_from, "processes": distributed.world_size(), "skipped_records": skipped.summary(),
        "targets": target_info, "trained_tokens": trained_tokens,
    }
    write_json(out / "train_log.json", train_log)
    distributed.barrier()
    return train_log


def _teacher_store(teacher: Any, config: RecoverConfig, encoded: Sequence[Encoded], pad_id: int, dtype: str) -> Any:
    """The teacher's top-k log-probabilities over the training set, computed once and cached by teacher,
    data, k and dtype (:mod:`paser.teacher`); only the student stays resident while training."""
    from .cache import cache_root
    from .models import model_fingerprint
    from .teacher import stored_topk

    return stored_topk(model_fingerprint(config.teacher), lambda: teacher, encoded, pad_id, config.teacher_topk, dtype,
                       cache_root())


@torch.no_grad()
def _logits(model: torch.nn.Module, batches: Sequence[dict]) -> list[torch.Tensor]:
    """fp32 logits at the real positions of a few batches (the merge check)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for batch in batches:
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)).logits
        out.append(logits.float()[batch["attention_mask"].to(device).bool()].cpu())
    model.train(was_training)
    return out


def _mask_gradients(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Full-parameter recovery: pruned positions get zero gradient (so Adam, without weight decay, never
    moves them)."""
    modules = dict(model.named_modules())
    for name, zeros in masks.items():
        keep = (~zeros).to(modules[name].weight.device)
        modules[name].weight.register_hook(lambda grad, keep=keep: grad * keep.to(grad.dtype))


def _keep_zeros(masks: dict[str, torch.Tensor]) -> Any:
    """Re-applies the pruned zeros after every optimizer step (a guard beside the masked gradients)."""
    from transformers import TrainerCallback

    class KeepZeros(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if model is not None:
                apply_masks(model, masks)

    return KeepZeros()
