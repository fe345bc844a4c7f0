"""``end-to-end``: the whole pruned model trained with the transformers Trainer (:class:`paser.recovery.trainer.RecoveryTrainer`)
on the selected records, toward the training targets (:mod:`paser.targets`) under an objective (:mod:`paser.objectives`).

- Adapter: masked LoRA (peft; the update is masked to the pruned layer's non-zeros, so the merged model keeps
  every zero exactly) or ``full`` (every weight; pruned positions get zero gradient and are re-zeroed each step).
- The loss covers response tokens only: prompt positions carry label -100 (same template and prompt/response
  split as selection, via :class:`paser.data.PromptFormatter`).
- Gradient accumulation (``batch_size / (micro_batch_size x processes)``), warmup, cosine schedule, seeded.
- Several processes (``accelerate launch -m paser recover ...`` or ``torchrun``): the Trainer runs DDP (or FSDP2);
  the effective batch stays ``batch_size``, and rank 0 alone merges and writes.
- Outputs in ``out``: ``adapter/`` (peft), ``merged/`` (a plain model directory with the tokenizer),
  ``train_log.json`` (loss curve per term, tokens/s, seconds, peak memory) and ``checkpoints/`` for ``--resume``.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from .. import distributed, faults
from ..cache import atomic_dir, cache_root, stable_hash, write_json
from ..data import Encoded
from ..models import check_compatible, load_model, model_fingerprint, peak_memory_gb, resolve_dtype_name
from ..objectives import OBJECTIVES
from ..sparsity import KeepZeros, apply_masks, sparsity_masks
from ..teacher import stored_topk
from .base import RECOVERY_METHODS, RecoveryMethod
from .data import TRAINING_DATA_FIELDS, Examples, TrainingData, collate_for_training, read_records, training_data

# transformers' Trainer and peft are imported when training starts: peft alone takes 3 s to load, and
# `paser --help` imports this module.

log = logging.getLogger(__name__)

# what the Trainer reads (``_trainer``); ``loss`` brings the objective's own reads (paser.recovery.config.fields_read)
TRAINER_FIELDS = frozenset({"seed", "epochs", "lr", "adapter", "batch_size", "micro_batch_size", "warmup_ratio",
                            "group_by_length", "save_steps", "fsdp", "loss"})
LORA_FIELDS = frozenset({"lora_r", "lora_alpha", "lora_dropout", "lora_targets", "sparse_lora"})  # adapter lora

@RECOVERY_METHODS.register("end-to-end")
class EndToEnd(RecoveryMethod):
    """The whole model at once under the Trainer: masked LoRA or every weight, any objective and targets.
    Recipe: ``recover: {method: end-to-end, loss: kd, lr: 0.001}``."""

    objective = True
    reads = TRAINING_DATA_FIELDS | TRAINER_FIELDS | LORA_FIELDS

    def fields_read(self, config: Any) -> frozenset[str]:
        return self.reads - (LORA_FIELDS if config.adapter == "full" else frozenset())

    def need(self, config: Any) -> Any:
        from .memory import Shape, end_to_end_need

        return end_to_end_need(config, Shape.of(config.model), resolve_dtype_name(config.dtype),
                               OBJECTIVES.get(config.loss).needs_teacher)

    def run(self, config: Any, callbacks: Sequence[Any] = ()) -> dict:
        from transformers import set_seed

        dtype = resolve_dtype_name(config.dtype)
        records = read_records(config)
        set_seed(config.seed)
        model, tokenizer = load_model(config.model, dtype=dtype)
        data = training_data(config, records, tokenizer, dtype)
        masks = sparsity_masks(model)
        masked = config.adapter == "lora" and config.sparse_lora == "masked" and bool(masks)
        log.info("%d records; %d sparse linear layers keep their zeros (%s)", len(data.encoded), len(masks),
                 "full-parameter, gradients masked" if config.adapter == "full"
                 else "masked LoRA: exact" if masked else "LoRA, re-masked after the merge")
        objective = OBJECTIVES.get(config.loss)
        teacher = load_teacher(config, model, tokenizer, data.encoded, dtype) if objective.needs_teacher else None
        model = trainable(model, config, masks, masked)
        trainer = _trainer(config, model, tokenizer, data, objective, teacher, masks, dtype, callbacks)
        resume_from = _checkpoint_to_resume(config, Path(config.out) / "checkpoints", data.encoded, dtype)
        t0 = time.perf_counter()
        result = trainer.train(resume_from_checkpoint=resume_from)
        seconds = time.perf_counter() - t0
        if config.fsdp:  # every rank takes part in gathering the shards; rank 0 rebuilds the whole trained model
            state = trainer.accelerator.get_state_dict(trainer.model)
            if distributed.is_main():
                model = trainable(load_model(config.model, dtype=dtype, tokenizer=False)[0], config, masks, masked)
                model.load_state_dict(state)
        if not distributed.is_main():
            distributed.barrier()  # rank 0 merges and writes
            return json.loads((Path(config.out) / "train_log.json").read_text())
        merged, merge_diff = _merge(model, config, trainer, tokenizer, data.encoded, masks)
        train_log = {**_train_log(config, dtype, trainer, result, seconds, data), **KeepZeros(merged, masks).kept(),
                     "sparse_lora": "masked" if masked else "off", "merge_max_logit_diff": merge_diff,
                     "resumed_from": resume_from}
        write_json(Path(config.out) / "train_log.json", train_log)
        distributed.barrier()
        return train_log


def load_teacher(config: Any, model: Any, tokenizer: Any, encoded: Sequence[Encoded], dtype: str) -> Any:
    """The original model beside the student (frozen), or its stored top-k (``teacher_cache: topk``)."""
    teacher, teacher_tokenizer = load_model(config.teacher or config.model, dtype=dtype)
    check_compatible(tokenizer, teacher_tokenizer, model, teacher)
    teacher.eval().requires_grad_(False)
    if config.teacher_cache != "topk":
        return teacher
    # computed once and cached by teacher, data, k and dtype; only the student stays resident while training
    return stored_topk(model_fingerprint(config.teacher), lambda: teacher, encoded, tokenizer.pad_token_id,
                       config.teacher_topk, dtype, cache_root())


def trainable(base: Any, config: Any, masks: dict[str, torch.Tensor], masked: bool) -> Any:
    """The model as it trains: wrapped in (masked) LoRA adapters, or every weight with pruned gradients masked."""
    if config.adapter == "lora":
        from peft import get_peft_model

        from .adapters import lora_config

        targets: Any = (config.lora_targets if config.lora_targets == "all-linear"
                        else [t.strip() for t in config.lora_targets.split(",")])
        return get_peft_model(base, lora_config(config.lora_r, config.lora_alpha, config.lora_dropout, targets, masked))
    base.requires_grad_(True)
    KeepZeros(base, masks).mask_gradients()
    return base


def _trainer(config: Any, model: Any, tokenizer: Any, data: TrainingData, objective: Any, teacher: Any,
             masks: dict[str, torch.Tensor], dtype: str, callbacks: Sequence[Any]) -> Any:
    from transformers import TrainingArguments

    from .trainer import RecoveryTrainer

    accumulation = config.batch_size // (config.micro_batch_size * distributed.world_size())
    args = TrainingArguments(
        output_dir=str(Path(config.out) / "checkpoints"), per_device_train_batch_size=config.micro_batch_size,
        gradient_accumulation_steps=accumulation, num_train_epochs=config.epochs, learning_rate=config.lr,
        # a float below 1 is a ratio of the optimizer steps in transformers 5 (warmup_ratio is deprecated there)
        lr_scheduler_type="cosine", warmup_steps=config.warmup_ratio, logging_steps=1, weight_decay=0.0,
        save_strategy="steps", save_steps=config.save_steps, save_total_limit=2, seed=config.seed,
        data_seed=config.seed, report_to=[], bf16=dtype == "bf16", use_cpu=not torch.cuda.is_available(),
        dataloader_num_workers=0, remove_unused_columns=False, disable_tqdm=False,
        train_sampling_strategy="group_by_length" if config.group_by_length else "random",
        ddp_find_unused_parameters=False,
        fsdp=True if config.fsdp else None, fsdp_config={"version": 2} if config.fsdp else None,
    )
    extra = [_restore_zeros(masks)] if config.adapter == "full" and masks else []
    return RecoveryTrainer(
        model=model, args=args, train_dataset=Examples(data.encoded, with_record=config.teacher_cache == "topk"),
        data_collator=lambda f: collate_for_training(f, tokenizer.pad_token_id),
        callbacks=[*callbacks, *extra, _report_saves()], objective=objective, settings=config, teacher=teacher)


def _merge(model: Any, config: Any, trainer: Any, tokenizer: Any, encoded: Sequence[Encoded],
           masks: dict[str, torch.Tensor]) -> tuple[Any, float]:
    """Merge the adapter (LoRA), put the zeros back, write ``OUT/merged``; returns the merged model and how far
    its logits are from the trained model's on two micro-batches."""
    out = Path(config.out)
    probe = [collate_for_training(trainer.train_dataset[i:i + config.micro_batch_size], tokenizer.pad_token_id)
             for i in range(0, min(len(encoded), 2 * config.micro_batch_size), config.micro_batch_size)]
    trained_logits = _logits(model, probe)
    if config.adapter == "lora":
        model.save_pretrained(out / "adapter")
        model = model.merge_and_unload()
    apply_masks(model, masks)  # exact already for masked LoRA and full; the re-masking for sparse_lora=off
    merge_diff = max((a - b).abs().max().item() for a, b in zip(trained_logits, _logits(model, probe)))
    with atomic_dir(out / "merged") as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return model, merge_diff


def _train_log(config: Any, dtype: str, trainer: Any, result: Any, seconds: float, data: TrainingData) -> dict:
    trained_tokens = sum(len(e.input_ids) for e in data.encoded) * config.epochs
    logged = ("nll", "kd", *sorted(OBJECTIVES.get(config.loss).terms - {"nll", "kd"}))
    losses = [{"step": h["step"], "loss": h["loss"], "lr": h.get("learning_rate"), **{k: h[k] for k in logged if k in h}}
              for h in trainer.state.log_history if "loss" in h]
    steps = trainer.state.global_step
    return {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "method": "end-to-end", "dtype": dtype, "records": len(data.encoded), "steps": steps,
        "epochs": config.epochs, "loss_curve": losses, "final_train_loss": result.training_loss,
        "seconds": round(seconds, 2), "tokens_per_s": round(trained_tokens / seconds, 1) if seconds else None,
        "seconds_per_step": round(seconds / max(steps, 1), 3), "peak_memory_gb": round(peak_memory_gb(), 3),
        "processes": distributed.world_size(), "skipped_records": data.skipped.summary(),
        "targets": data.target_info, "trained_tokens": trained_tokens}


def _report_saves() -> Any:
    """A callback that marks each finished checkpoint for the kill-and-resume hook (:mod:`paser.faults`)."""
    from transformers import TrainerCallback

    class ReportSaves(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            if state.is_world_process_zero:  # rank 0 writes trainer_state.json, the checkpoint's last file
                faults.reached("recover.saved")

    return ReportSaves()


def _checkpoint_to_resume(config: Any, checkpoints: Path, encoded: Sequence[Encoded], dtype: str) -> str | None:
    """The last checkpoint in ``checkpoints`` if it was made by this very training run (same settings, model and
    data), else None; stale checkpoints of other settings are removed first. Every rank resumes from rank 0's."""
    choice = _same_run_checkpoint(config, checkpoints, encoded, dtype) if distributed.is_main() else None
    return distributed.all_gather(choice)[0]


def _same_run_checkpoint(config: Any, checkpoints: Path, encoded: Sequence[Encoded], dtype: str) -> str | None:
    """Rank 0's choice: the last complete checkpoint when ``paser_run.json`` holds this run's key (what the method,
    its objective and targets read, the model's weights and the encoded records), else a clean folder."""
    from .reads import resume_key_settings

    key = stable_hash("recover-v2", resume_key_settings(config), model_fingerprint(config.model), dtype,
                      [e.input_ids for e in encoded], [len(e.prompt_ids) for e in encoded])
    marker = checkpoints / "paser_run.json"
    existing = _complete_checkpoints(checkpoints)
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


def _complete_checkpoints(checkpoints: Path) -> list[Path]:
    """The checkpoints in step order that the Trainer finished writing (``trainer_state.json`` is its last
    file); one cut short by a kill is removed, so a resume never loads half a checkpoint."""
    from transformers.trainer import TRAINER_STATE_NAME

    complete = []
    for path in sorted(checkpoints.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[-1])):
        if (path / TRAINER_STATE_NAME).is_file():
            complete.append(path)
        else:
            log.warning("removing %s: its writing was cut short (no %s)", path, TRAINER_STATE_NAME)
            shutil.rmtree(path)
    return complete


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


def _restore_zeros(masks: dict[str, torch.Tensor]) -> Any:
    """Puts the pruned zeros back after every optimizer step (a guard beside the masked gradients)."""
    from transformers import TrainerCallback

    class RestoreZeros(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if model is not None:
                apply_masks(model, masks)

    return RestoreZeros()
