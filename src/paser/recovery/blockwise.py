"""``blockwise``: each decoder block in turn trained toward the original model's block output, on the student's
own incoming stream (EBFT, arXiv 2402.12419; the sequential loop of SparseGPT), so the errors of the blocks before
it are corrected where they arrive instead of compounding.

For block ``i``, with ``x_o`` the original's hidden states entering it and ``x_s`` the student's (the output of
the student's blocks ``< i`` as already trained)::

    target y = original_block_i(x_o)        input x_s        loss = mse or nmse( student_block_i(x_s), y )

``nmse`` divides each hidden channel's squared error by the variance of the target in that channel (over the
block's training tokens), so a few outlier channels of the residual stream do not decide the loss alone.
Every weight of the block trains (fp32 master copy, bf16 compute where the hardware has it); the pruned positions
get zero gradient and are re-zeroed after every step, so the sparsity stays exact.

Built for a model larger than the accelerator: one block of each model is resident at a time, read from the
checkpoint's safetensors shards; the two streams live on disk in shards of the stream dtype (bf16 by default). The
recovered model is the pruned checkpoint with the trained blocks' tensors replaced, shard by shard (``OUT/merged``).
Any decoder: each block is called with the arguments the model's own forward gives it, captured once per batch
(:mod:`paser.recovery.layers`); the families whose block-by-block forward is checked against the model's own are
:data:`~paser.recovery.layers.PARITY_TESTED`.

The resume protocol (everything under ``OUT/blockwise``):

1. ``progress.json`` holds the run's key: a hash of every setting the method declares it reads
   (:func:`paser.recovery.config.resume_key_settings`), both models' weights, the dtype and the encoded records.
   A rerun whose key differs, or ``--no-resume``, removes the folder and starts afresh: nothing of another run is
   trusted, and a changed option always reruns the blocks.
2. The disk the streams and blocks need is checked before the original model is read and before any stream is
   written (the training records are encoded first: their padded length decides the streams' size).
3. ``streams/{original,student}-NNN.pt``: block NNN's input of each model, each written atomically; the original's
   output of block i is written before block i trains, so a kill in training keeps it.
4. After block i trains: ``blocks/NNN.safetensors`` (atomic), then the student's stream into block i + 1, then
   block i appended to ``progress.json`` (atomic), then block i's input streams removed. A rerun trusts exactly
   the blocks ``progress.json`` lists and restarts at the next (a block killed mid-training is redone whole).
5. ``merged/`` is assembled into a temporary folder and renamed into place; ``progress.json`` marks ``complete``
   last, and only a complete run with ``merged/config.json`` present is returned as finished.

Recipe::

    paser recover PRUNED --data selected.jsonl --out runs/bw --method blockwise --block-lr 1e-3 --block-epochs 2
    # paser run:  recover: {method: blockwise, block_lr: 0.001}
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .. import distributed, faults
from ..cache import atomic_dir, atomic_path, stable_hash, write_json
from ..data import Encoded, pad_right
from ..errors import ConfigError
from ..models import load_tokenizer, model_fingerprint, peak_memory_gb, resolve_dtype_name, resolve_spec
from ..options import option
from ..sparsity import KeepZeros
from .base import RECOVERY_METHODS, RecoveryMethod
from .data import TRAINING_DATA_FIELDS, read_records, training_data
from .layers import PARITY_TESTED, LayerReader, call_block, shape_mismatch, tensor_index
from .reads import resume_key_settings

# transformers is imported when a block-wise run starts: paser.recovery is imported by `paser --help`.

log = logging.getLogger(__name__)



@dataclass
class BlockwiseOptions:
    block_lr: Annotated[float, Field(gt=0)] = option(1e-3, "blockwise: peak learning rate (AdamW, cosine, warmup).")
    block_epochs: Annotated[float, Field(gt=0)] = option(2.0, "blockwise: passes over the training tokens per block.")
    block_loss: Literal["nmse", "mse"] = option(
        "nmse", "blockwise: nmse (each channel's error over the target's variance in it) | mse.")
    block_batch_tokens: Annotated[int, Field(ge=1)] = option(
        2048, "blockwise: padded tokens per optimizer step (records of similar length batched).")
    stream_dtype: Literal["bf16", "fp32"] = option("bf16", "blockwise: dtype of the hidden-state streams on disk.")
    block_stream: Literal["student", "original", "mix"] = option(
        "student", "blockwise: what each block learns from: student (the pruned model's own stream in, as its earlier "
        "blocks were trained) | original (the original's stream in and out: global propagation, the blocks "
        "independent) | mix (each batch one or the other, seeded).")
    block_schedule: Literal["cosine", "linear"] = option(
        "cosine", "blockwise: the learning rate's decay after warmup.")
    block_weight_decay: Annotated[float, Field(ge=0)] = option(
        0.0, "blockwise: AdamW's decoupled weight decay (pruned zeros stay zero either way).")
    block_heldout: Annotated[float, Field(ge=0, lt=0.5)] = option(
        0.0, "blockwise: share of the batches held aside per block (not trained on): their error is measured after "
        "every pass, and the block keeps the pass where it was lowest and stops once it rises (per-block early "
        "stopping; the train log holds the error before and after, per pass).")
    block_window: Annotated[int, Field(ge=1, le=4)] = option(
        1, "blockwise: blocks trained together toward the original's output of the last of them (windows overlap: "
        "each window keeps its first block and hands the others on, trained, to the next).")


@dataclass
class BlockData:
    """The training tokens as fixed micro-batches: ids and attention per batch, right-padded. Under several
    processes each process holds its part of every batch (``step_tokens``: each whole batch's real tokens)."""

    ids: list[torch.Tensor]
    attention: list[torch.Tensor]
    step_tokens: list[int] | None = None

    @classmethod
    def build(cls, encoded: Sequence[Encoded], pad_id: int, batch_tokens: int, min_records: int = 1) -> BlockData:
        """Records of similar length batched up to ``batch_tokens`` padded tokens; every batch at least
        ``min_records`` records (one per process), the last short batch joining the one before."""
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
        if len(order) < min_records:
            raise ConfigError(f"blockwise: {len(order)} training records for {min_records} processes: each process "
                              "needs a record of every batch; use fewer processes")
        batches: list[list[int]] = [[]]
        for i in order:  # ascending lengths: the batch's padded size is this record's length times its size
            if len(batches[-1]) >= min_records and (len(batches[-1]) + 1) * len(encoded[i].input_ids) > batch_tokens:
                batches.append([])
            batches[-1].append(i)
        if len(batches) > 1 and len(batches[-1]) < min_records:
            batches[-2] += batches.pop()
        padded = [pad_right([encoded[i].input_ids for i in batch], pad_id) for batch in batches]
        return cls([ids for ids, _ in padded], [attention for _, attention in padded])

    def share(self, rank: int, world: int) -> BlockData:
        """Rank ``rank``'s part of every batch (records ``rank``, ``rank + world``, ...; all of it in one process):
        each step every process trains on its part of the same batch, so the steps are one process's."""
        if world == 1:
            return self
        ids, attention = [], []
        for batch_ids, batch_attention in zip(self.ids, self.attention):
            rows = batch_attention[rank::world]
            width = int(rows.sum(1).max())  # right padding: the part's own longest record
            ids.append(batch_ids[rank::world, :width])
            attention.append(rows[:, :width])
        return BlockData(ids, attention, [int(a.sum()) for a in self.attention])

    @property
    def tokens(self) -> int:
        return int(sum(a.sum() for a in self.attention))

    @property
    def padded_tokens(self) -> int:
        return sum(a.numel() for a in self.attention)


@RECOVERY_METHODS.register("blockwise")
class Blockwise(RecoveryMethod):
    """Each decoder block toward the original's block output on the student's own stream, one block resident."""

    options = BlockwiseOptions
    needs_original = True
    reads = TRAINING_DATA_FIELDS | {"seed", "warmup_ratio", "teacher"}

    def need(self, config: Any) -> Any:
        from .memory import Shape, blockwise_need

        return blockwise_need(config, Shape.of(config.model))

    def run(self, config: Any, callbacks: Sequence[Any] = ()) -> dict:
        if not config.teacher:
            raise ConfigError("blockwise recovery trains toward the original model: give --teacher (or prune with "
                              "paser prune, which records it)")
        return BlockwiseRun(config).execute()


class BlockwiseRun:
    """One blockwise recovery: the data, the two models' layer readers, the streams, the loop over blocks."""

    def __init__(self, config: Any):
        self.config = config
        self.out = Path(config.out)
        self.work = self.out / "blockwise"
        self.dtype = resolve_dtype_name(config.dtype)
        self.device = distributed.device() or "cpu"
        records = read_records(config)  # validated before any model loads
        tokenizer = load_tokenizer(config.model)
        self.data = training_data(config, records, tokenizer, self.dtype)
        everything = BlockData.build(self.data.encoded, tokenizer.pad_token_id, config.block_batch_tokens,
                                     distributed.world_size())
        self.all_tokens, self.all_padded = everything.tokens, everything.padded_tokens
        # several processes: each holds its part of every batch, and its own streams
        self.batches = everything.share(distributed.rank(), distributed.world_size())
        self.stream_dtype = torch.bfloat16 if config.stream_dtype == "bf16" else torch.float32
        self.student = LayerReader(config.model, self.device)
        if self.student.config.model_type not in PARITY_TESTED:
            log.warning("blockwise: '%s' is not among the families whose block-by-block forward is tested (%s): "
                        "check the recovered model's fidelity", self.student.config.model_type, ", ".join(PARITY_TESTED))
        self._check_disk()  # before the original is read (a hub id downloads) and any stream is written
        self.original = LayerReader(config.teacher, self.device)
        mismatch = shape_mismatch(self.student.config, self.original.config)
        if mismatch:
            raise ConfigError(f"blockwise: {mismatch}")
        world = distributed.world_size()  # gradients averaged over this many batches a step: another result
        self.key = stable_hash("blockwise-v2", resume_key_settings(config), model_fingerprint(config.model),
                               model_fingerprint(config.teacher), self.dtype,
                               [e.input_ids for e in self.data.encoded], *([world] if world > 1 else []))

    def execute(self) -> dict:
        progress = self._progress()
        if progress.get("complete") and (self.out / "merged" / "config.json").is_file():
            log.info("blockwise: finished already (%s)", self.out / "merged")
            return json.loads((self.out / "train_log.json").read_text())
        t0 = time.perf_counter()
        streams = Streams(self._streams_root(), self.stream_dtype)
        if not progress["blocks"]:
            self._embed(streams)
        main = distributed.is_main()
        for layer in range(len(progress["blocks"]), self.student.n_layers):
            progress["blocks"].append(self._block(layer, streams))
            if main:
                write_json(self.work / "progress.json", progress)  # the block is done: a rerun starts at the next
            streams.drop(layer)
            distributed.barrier()  # every rank has its stream into the next block before the carry goes
            if main:
                shutil.rmtree(self.work / "carry" / f"from-{layer - 1:03d}", ignore_errors=True)
        if main:
            assemble(self.student, self.work / "blocks", self.out / "merged")
        distributed.barrier()
        progress["complete"] = True
        train_log = self._train_log(progress, time.perf_counter() - t0)
        if main:
            shutil.rmtree(self.work / "streams", ignore_errors=True)
            write_json(self.work / "progress.json", progress)
            write_json(self.out / "train_log.json", train_log)
        distributed.barrier()
        return train_log

    def _streams_root(self) -> Path:
        world = distributed.world_size()
        return self.work / "streams" if world == 1 else self.work / "streams" / f"rank-{distributed.rank()}"

    def _progress(self) -> dict:
        """The blocks finished by an earlier run with these very settings, models and data (else a fresh start)."""
        path = self.work / "progress.json"
        try:
            progress = json.loads(path.read_text())
        except (FileNotFoundError, ValueError):
            progress = {}
        if progress.get("key") == self.key and self.config.resume:
            if progress["blocks"]:
                log.info("blockwise: resuming at block %d of %d", len(progress["blocks"]), self.student.n_layers)
            return progress
        distributed.barrier()  # every rank has read the same progress before it goes
        if distributed.is_main():
            if self.work.exists():
                log.warning("blockwise: starting afresh in %s (%s)", self.work,
                            "--no-resume" if not self.config.resume else "other settings, models or data")
                shutil.rmtree(self.work)
            self.work.mkdir(parents=True)
        distributed.barrier()
        return {"key": self.key, "blocks": []}

    def _check_disk(self) -> None:
        """Four streams at once (each model's input to the block and output), plus the trained blocks."""
        hidden = self.student.hidden_size
        stream = self.all_padded * hidden * self.stream_dtype.itemsize  # every rank's, on a machine's one disk
        needed = 4 * stream + self.student.block_bytes * self.student.n_layers * 2
        where = next(p for p in (self.work, *self.work.parents) if p.exists())
        free = shutil.disk_usage(where).free
        log.info("blockwise: %d blocks, %s tokens (%s padded); streams need %.2f GB on disk, blocks %.2f GB; "
                 "%.1f GB free", self.student.n_layers, f"{self.all_tokens:,}", f"{self.all_padded:,}",
                 4 * stream / 1e9, (needed - 4 * stream) / 1e9, free / 1e9)
        if free < needed:
            raise ConfigError(f"blockwise recovery needs {needed / 1e9:.2f} GB of disk under {self.work} "
                              f"(hidden-state streams and trained blocks); {free / 1e9:.2f} GB are free")

    def _embed(self, streams: Streams) -> None:
        """Stream 0 of both models: what each one's own forward gives its first block for every batch."""
        readers = (("original", self.original), ("student", self.student))
        for who, reader in readers[:1] if self.config.block_stream == "original" else readers:
            streams.write(who, 0, [reader.capture(ids, attention)[0]
                                   for ids, attention in zip(self.batches.ids, self.batches.attention)])

    def _block(self, layer: int, streams: Streams) -> dict:
        """Advance the original's stream through its blocks of this window, train the student's window toward the
        original's output of its last block, keep the first block, hand the others on, and advance the student's
        stream through the kept block."""
        t0 = time.perf_counter()
        window = range(layer, min(layer + self.config.block_window, self.student.n_layers))
        context = [[calls[j] for j in window] for calls in self._calls()]
        for j in window:
            if not streams.complete("original", j + 1):
                original_block = self.original.block(j, torch.float32)
                streams.write("original", j + 1, _forward_all(original_block, streams.read("original", j),
                                                              [calls[j] for calls in self._calls()], self.device,
                                                              self.stream_dtype))
                del original_block
        blocks = Window([self._student_block(j, layer) for j in window])
        kept = KeepZeros(blocks.blocks[0])
        zeros_before = kept.zeros()
        trainer = BlockTrainer(blocks, self.config, self.dtype, self.device, self.batches.step_tokens)
        inputs, targets = self._inputs(layer, streams), streams.read("original", window[-1] + 1)
        report = trainer.fit(inputs, targets, [((calls,), {}) for calls in context], self.batches.attention,
                             f"block {layer + 1}/{self.student.n_layers}")
        if distributed.is_main():  # every rank holds the same weights (averaged gradients): one writes them
            for j, block in zip(window[1:], blocks.blocks[1:]):  # handed on: the next window starts from them
                self.student.save_block(j, block, self.work / "carry" / f"from-{layer:03d}")
            self.student.save_block(layer, blocks.blocks[0], self.work / "blocks")
        if self.config.block_stream != "original":  # the student's stream is what the next block learns from
            student_in = streams.read("student", layer)
            streams.write("student", layer + 1, _forward_all(blocks.blocks[0], student_in,
                                                             [calls[layer] for calls in self._calls()], self.device,
                                                             self.stream_dtype))
        report.update(block=layer, seconds=round(time.perf_counter() - t0, 2), sparse_layers=len(kept),
                      zeros_before=zeros_before, zeros_after=kept.zeros())
        if len(window) > 1:
            report["window"] = list(window)
        log.info("block %d: %s %.4g -> %.4g (%d steps, %.0f s)", layer, self.config.block_loss, report["loss_before"],
                 report["loss_after"], report["steps"], report["seconds"])
        return report

    def _student_block(self, layer: int, window_start: int) -> torch.nn.Module:
        """The student's block ``layer`` as the window before this one left it (the pruned checkpoint's if none)."""
        carried = self.work / "carry" / f"from-{window_start - 1:03d}" / f"{layer:03d}.safetensors"
        block = self.student.block(layer, torch.float32)
        if carried.is_file():
            from safetensors.torch import load_file

            prefix = f"{self.student.prefix}{layer}."
            block.load_state_dict({k[len(prefix):]: v.to(torch.float32) for k, v in load_file(str(carried)).items()})
        return block

    def _inputs(self, layer: int, streams: Streams) -> list[torch.Tensor]:
        """What block ``layer`` learns from (``block_stream``): the student's stream into it, the original's, or per
        batch one of the two (a seeded coin per batch and block)."""
        if self.config.block_stream == "student":
            return streams.read("student", layer)
        if self.config.block_stream == "original":
            return streams.read("original", layer)
        coins = torch.rand(len(self.batches.ids), generator=torch.Generator().manual_seed(self.config.seed * 1000 + layer))
        student, original = streams.read("student", layer), streams.read("original", layer)
        return [original[b] if coins[b] < 0.5 else student[b] for b in range(len(coins))]

    def _calls(self) -> list[list[tuple[tuple, dict]]]:
        """Per batch, each block's call arguments as the model's own forward passes them (masks, positions,
        rotary embeddings: the same for both models, whose configs match)."""
        if not hasattr(self, "_captured"):
            self._captured = [self.student.capture(ids, attention)[1]
                              for ids, attention in zip(self.batches.ids, self.batches.attention)]
        return self._captured

    def _train_log(self, progress: dict, seconds: float) -> dict:
        blocks = progress["blocks"]
        trained_tokens = self.all_tokens * self.config.block_epochs
        return {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.config).items()},
            "method": "blockwise", "dtype": self.dtype, "records": len(self.data.encoded),
            "steps": sum(b["steps"] for b in blocks), "epochs": self.config.block_epochs, "blocks": blocks,
            "loss_curve": [{"step": b["block"], "loss": b["loss_after"]} for b in blocks],
            "seconds": round(sum(b["seconds"] for b in blocks), 2), "seconds_this_run": round(seconds, 2),
            "tokens_per_s": round(trained_tokens * self.student.n_layers / max(sum(b["seconds"] for b in blocks), 1e-9), 1),
            "peak_memory_gb": round(peak_memory_gb(), 3), "trained_tokens": trained_tokens,
            "processes": distributed.world_size(),
            "targets": self.data.target_info, "skipped_records": self.data.skipped.summary(),
            "sparse_layers": sum(b["sparse_layers"] for b in blocks),
            "zeros_kept": sum(b["zeros_before"] for b in blocks),
            "zeros_after_merge": sum(b["zeros_after"] for b in blocks)}


@torch.no_grad()
def _forward_all(block: torch.nn.Module, inputs: Sequence[torch.Tensor], context: Sequence[tuple[tuple, dict]],
                 device: str, stream_dtype: torch.dtype) -> list[torch.Tensor]:
    """The block's outputs for every batch, moved off the accelerator in the stream dtype as they come."""
    return [call_block(block, x.to(device, torch.float32), call).to("cpu", stream_dtype)
            for x, call in zip(inputs, context)]


class Window(torch.nn.Module):
    """Consecutive blocks called in turn, each with its own captured arguments: what a window of
    ``block_window`` blocks trains as one (a window of one is the block itself)."""

    def __init__(self, blocks: Sequence[torch.nn.Module]):
        super().__init__()
        self.blocks = torch.nn.ModuleList(blocks)

    def forward(self, hidden: torch.Tensor, calls: Sequence[tuple[tuple, dict]]) -> torch.Tensor:
        for block, call in zip(self.blocks, calls):
            hidden = call_block(block, hidden, call)
        return hidden


class BlockTrainer:
    """Trains one block (fp32 master weights) toward its targets; pruned positions stay exactly zero."""

    def __init__(self, block: torch.nn.Module, config: Any, dtype: str, device: str,
                 step_tokens: Sequence[int] | None = None):
        """``step_tokens``: under several processes, each whole batch's real tokens (this process holds a part
        of it): each part's error is divided by the whole's count and the gradients summed, one process's step."""
        self.block, self.config, self.device, self.step_tokens = block, config, device, step_tokens
        self.autocast = dtype == "bf16"
        self.zeros = KeepZeros(block, device=device)

    def fit(self, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], context: Sequence[tuple[tuple, dict]],
            attention: Sequence[torch.Tensor], label: str) -> dict:
        scale = self._scale(targets, attention)
        batches = _Split(len(inputs), self.config.block_heldout, self.config.seed)
        before = self._loss_all(inputs, targets, context, attention, scale)
        held = [self._loss_all(*_pick(batches.held, inputs, targets, context, attention), scale)] if batches.held else []
        zeros_before = self.zeros.zeros()
        per_pass = len(batches.train)
        steps = max(1, math.ceil(self.config.block_epochs * per_pass))
        params = [p for p in self.block.parameters() if p.is_floating_point()]
        for p in params:
            p.requires_grad_(True)
        self.zeros.mask_gradients()
        optimizer = torch.optim.AdamW(params, lr=self.config.block_lr, weight_decay=self.config.block_weight_decay)
        schedule = _schedule(self.config.block_schedule, optimizer, math.ceil(self.config.warmup_ratio * steps), steps)
        generator = torch.Generator().manual_seed(self.config.seed)
        order = []
        while len(order) < steps:
            order += [batches.train[i] for i in torch.randperm(len(batches.train), generator=generator).tolist()]
        # (error, pass, weights): the block as it came in counts as pass 0, so a block that only gets worse stays
        best = (held[0], 0, {k: v.detach().clone() for k, v in self.block.state_dict().items()}) if held else None
        done = 0
        for step, b in enumerate(tqdm(order[:steps], desc=label, leave=False, unit="step"), 1):
            tokens = self.step_tokens[b] if self.step_tokens else None
            self._loss(inputs[b], targets[b], context[b], attention[b], scale, tokens).backward()
            _sum_gradients(params)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            self.zeros.restore()
            done = step
            faults.reached("blockwise.step")  # a kill here loses only this block's steps: a rerun redoes the block
            if best is not None and (step % per_pass == 0 or step == steps):
                held.append(self._loss_all(*_pick(batches.held, inputs, targets, context, attention), scale))
                if held[-1] < best[0]:
                    best = (held[-1], len(held) - 1, {k: v.detach().clone() for k, v in self.block.state_dict().items()})
                elif held[-1] > held[-2]:
                    break  # the held-aside error rose: later passes would fit the training batches only
        if best is not None and best[1] != len(held) - 1:
            self.block.load_state_dict(best[2])
        for p in params:
            p.requires_grad_(False)
        if distributed.world_size() > 1:  # averaged gradients keep the ranks' weights equal: checked, not assumed
            sums = distributed.all_gather(float(sum(p.double().sum() for p in params)))
            if len(set(sums)) > 1:
                raise RuntimeError(f"blockwise: the processes' weights differ after training ({sums})")
        after = self._loss_all(inputs, targets, context, attention, scale)
        report = {"loss_before": before, "loss_after": after, "steps": done, "sparse_layers": len(self.zeros),
                  "zeros_before": zeros_before, "zeros_after": self.zeros.zeros()}
        if held:
            report.update(heldout_batches=len(batches.held), heldout_before=held[0], heldout_after=best[0],
                          heldout_per_pass=held, kept_pass=best[1])
        return report

    def _scale(self, targets: Sequence[torch.Tensor], attention: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-channel weights of the squared error: 1 (mse) or 1 / the target's variance in the channel (nmse)."""
        hidden = targets[0].shape[-1]
        if self.config.block_loss == "mse":
            return torch.ones(hidden, device=self.device)
        total, square, count = torch.zeros(hidden, dtype=torch.float64), torch.zeros(hidden, dtype=torch.float64), 0
        for y, a in zip(targets, attention):
            real = y[a.bool()].double()
            total += real.sum(0)
            square += real.pow(2).sum(0)
            count += real.shape[0]
        total, square, count = _all_sum(total, square, torch.tensor(float(count), dtype=torch.float64))
        variance = square / count - (total / count) ** 2
        return (1.0 / variance.clamp_min(1e-6)).float().to(self.device)

    def _loss(self, x: torch.Tensor, y: torch.Tensor, call: tuple[tuple, dict], attention: torch.Tensor,
              scale: torch.Tensor, tokens: int | None = None) -> torch.Tensor:
        """The batch's mean weighted squared error (``tokens``: divided by that many tokens' channels instead: this
        process's part of a batch of ``tokens`` real tokens)."""
        real = attention.to(self.device).bool()
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
            out = call_block(self.block, x.to(self.device, torch.float32), call)
        error = (out.float()[real] - y.to(self.device, torch.float32)[real]).pow(2) * scale
        return error.mean() if tokens is None else error.sum() / (tokens * error.shape[-1])

    @torch.no_grad()
    def _loss_all(self, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                  context: Sequence[tuple[tuple, dict]],
                  attention: Sequence[torch.Tensor], scale: torch.Tensor) -> float:
        """The error over every real token of these batches (of every process's part of them)."""
        counts = [int(a.sum()) for a in attention]
        if distributed.world_size() == 1:
            losses = [self._loss(x, y, c, a, scale).item() * n
                      for x, y, c, a, n in zip(inputs, targets, context, attention, counts)]
            return sum(losses) / sum(counts)
        total = sum(self._loss(x, y, c, a, scale, 1).item() for x, y, c, a in zip(inputs, targets, context, attention))
        total, tokens = _all_sum(torch.tensor([total, sum(counts)], dtype=torch.float64))[0]
        return float(total / tokens)


def _all_sum(*tensors: torch.Tensor) -> list[torch.Tensor]:
    """Each tensor summed over the processes (itself in one process)."""
    if distributed.world_size() > 1:
        import torch.distributed as dist

        for t in tensors:
            dist.all_reduce(t)
    return list(tensors)


def _sum_gradients(params: Sequence[torch.nn.Parameter]) -> None:
    """Data parallel inside a block: each process's gradient (its part of the batch, divided by the whole batch's
    tokens) summed over the processes: the gradient of the whole batch, the same on every process."""
    if distributed.world_size() > 1:
        import torch.distributed as dist

        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)


@dataclass
class _Split:
    """The batches one block trains on and those held aside to measure it (a seeded draw)."""

    train: list[int]
    held: list[int]

    def __init__(self, n: int, share: float, seed: int):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 7919)).tolist()
        count = min(n - 1, round(share * n)) if share > 0 else 0
        self.held, self.train = sorted(order[:count]), sorted(order[count:])


def _pick(rows: Sequence[int], *columns: Sequence[Any]) -> list[list[Any]]:
    return [[column[i] for i in rows] for column in columns]


def _schedule(kind: str, optimizer: torch.optim.Optimizer, warmup: int, steps: int) -> Any:
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    make = get_cosine_schedule_with_warmup if kind == "cosine" else get_linear_schedule_with_warmup
    return make(optimizer, warmup, steps)


class Streams:
    """Hidden states of every batch entering a block, per model, on disk (one file per model and block; atomic)."""

    def __init__(self, root: Path, dtype: torch.dtype):
        self.root, self.dtype = root, dtype
        root.mkdir(parents=True, exist_ok=True)

    def _path(self, who: str, layer: int) -> Path:
        return self.root / f"{who}-{layer:03d}.pt"

    def complete(self, who: str, layer: int) -> bool:
        return self._path(who, layer).is_file()

    def write(self, who: str, layer: int, batches: Sequence[torch.Tensor]) -> None:
        with atomic_path(self._path(who, layer), suffix=".pt") as tmp:
            torch.save([b.detach().to("cpu", self.dtype) for b in batches], tmp)

    def read(self, who: str, layer: int) -> list[torch.Tensor]:
        return torch.load(self._path(who, layer), mmap=True, weights_only=True)

    def drop(self, layer: int) -> None:
        for who in ("original", "student"):
            self._path(who, layer).unlink(missing_ok=True)


def blockwise_unsupported(model: str, original: str) -> str | None:
    """Why ``auto`` does not run block-wise on this pruned model and original (None when it does), read from their
    configs alone: a family outside :data:`~paser.recovery.layers.PARITY_TESTED`, or blocks whose shapes pruning
    changed. A config that cannot be read is an error (the model could not be trained any other way either)."""
    from transformers import AutoConfig

    configs = {}
    for role, spec in (("pruned", model), ("original", original)):
        try:
            configs[role] = AutoConfig.from_pretrained(resolve_spec(spec).location)
        except (OSError, ValueError) as error:  # missing, unreadable or not a model config: say which and why
            raise ConfigError(f"the {role} model's config could not be read ({spec}): {error}") from None
        if configs[role].model_type not in PARITY_TESTED:
            return (f"'{configs[role].model_type}' is not among the families whose block-by-block forward is tested "
                    f"({', '.join(PARITY_TESTED)})")
    return shape_mismatch(configs["pruned"], configs["original"])


def assemble(student: LayerReader, blocks: Path, out: Path) -> None:
    """The pruned checkpoint with every trained block's tensors replaced, written shard by shard, with its config
    and tokenizer (paser's reports left behind)."""

    trained = tensor_index(blocks.glob("*.safetensors"))
    source = Path(student.location)
    with atomic_dir(out) as tmp:
        for item in source.iterdir():
            if item.suffix == ".safetensors":
                with safe_open(str(item), framework="pt") as f:
                    tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118
                for name in tensors.keys() & trained.keys():
                    with safe_open(trained[name], framework="pt") as f:
                        tensors[name] = f.get_tensor(name)
                save_file(tensors, str(Path(tmp) / item.name), metadata={"format": "pt"})
            elif item.is_file() and not item.name.endswith("_report.json") and item.name != "train_log.json":
                shutil.copy2(item, Path(tmp) / item.name)
