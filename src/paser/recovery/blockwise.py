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
Llama-family decoders (``SUPPORTED``) only.

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

import copy
import json
import logging
import math
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from huggingface_hub import snapshot_download
from pydantic import Field
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .. import faults
from ..cache import atomic_dir, atomic_path, stable_hash, write_json
from ..data import Encoded, pad_right
from ..errors import ConfigError
from ..models import load_tokenizer, model_fingerprint, peak_memory_gb, resolve_dtype_name, resolve_spec
from ..options import option
from ..sparsity import KeepZeros
from .base import RECOVERY_METHODS, RecoveryMethod
from .data import TRAINING_DATA_FIELDS, read_records, training_data
from .reads import resume_key_settings

# transformers is imported when a block-wise run starts: paser.recovery is imported by `paser --help`.

log = logging.getLogger(__name__)

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")  # decoders found through model.layers and model.rotary_emb
# what must be equal in the pruned and the original config for their blocks to be trained one against the other
BLOCK_SHAPE_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
                      "num_key_value_heads")


@dataclass
class BlockwiseOptions:
    block_lr: Annotated[float, Field(gt=0)] = option(1e-3, "blockwise: peak learning rate (AdamW, cosine, warmup).")
    block_epochs: Annotated[float, Field(gt=0)] = option(2.0, "blockwise: passes over the training tokens per block.")
    block_loss: Literal["nmse", "mse"] = option(
        "nmse", "blockwise: nmse (each channel's error over the target's variance in it) | mse.")
    block_batch_tokens: Annotated[int, Field(ge=1)] = option(
        2048, "blockwise: padded tokens per optimizer step (records of similar length batched).")
    stream_dtype: Literal["bf16", "fp32"] = option("bf16", "blockwise: dtype of the hidden-state streams on disk.")


@dataclass
class BlockData:
    """The training tokens as fixed micro-batches: ids and attention per batch, right-padded."""

    ids: list[torch.Tensor]
    attention: list[torch.Tensor]

    @classmethod
    def build(cls, encoded: Sequence[Encoded], pad_id: int, batch_tokens: int) -> BlockData:
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
        batches: list[list[int]] = [[]]
        for i in order:  # ascending lengths: the batch's padded size is this record's length times its size
            if batches[-1] and (len(batches[-1]) + 1) * len(encoded[i].input_ids) > batch_tokens:
                batches.append([])
            batches[-1].append(i)
        padded = [pad_right([encoded[i].input_ids for i in batch], pad_id) for batch in batches]
        return cls([ids for ids, _ in padded], [attention for _, attention in padded])

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
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        records = read_records(config)  # validated before any model loads
        tokenizer = load_tokenizer(config.model)
        self.data = training_data(config, records, tokenizer, self.dtype)
        self.batches = BlockData.build(self.data.encoded, tokenizer.pad_token_id, config.block_batch_tokens)
        self.stream_dtype = torch.bfloat16 if config.stream_dtype == "bf16" else torch.float32
        self.student = LayerReader(config.model, self.device)
        self._check_disk()  # before the original is read (a hub id downloads) and any stream is written
        self.original = LayerReader(config.teacher, self.device)
        mismatch = shape_mismatch(self.student.config, self.original.config)
        if mismatch:
            raise ConfigError(f"blockwise: {mismatch}")
        self.key = stable_hash("blockwise-v2", resume_key_settings(config), model_fingerprint(config.model),
                               model_fingerprint(config.teacher), self.dtype,
                               [e.input_ids for e in self.data.encoded])

    def execute(self) -> dict:
        progress = self._progress()
        if progress.get("complete") and (self.out / "merged" / "config.json").is_file():
            log.info("blockwise: finished already (%s)", self.out / "merged")
            return json.loads((self.out / "train_log.json").read_text())
        t0 = time.perf_counter()
        streams = Streams(self.work / "streams", self.stream_dtype)
        if not progress["blocks"]:
            self._embed(streams)
        for layer in range(len(progress["blocks"]), self.student.n_layers):
            progress["blocks"].append(self._block(layer, streams))
            write_json(self.work / "progress.json", progress)  # the block is done: a rerun starts at the next
            streams.drop(layer)
        assemble(self.student, self.work / "blocks", self.out / "merged")
        shutil.rmtree(self.work / "streams", ignore_errors=True)
        progress["complete"] = True
        write_json(self.work / "progress.json", progress)
        train_log = self._train_log(progress, time.perf_counter() - t0)
        write_json(self.out / "train_log.json", train_log)
        return train_log

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
        if self.work.exists():
            log.warning("blockwise: starting afresh in %s (%s)", self.work,
                        "--no-resume" if not self.config.resume else "other settings, models or data")
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        return {"key": self.key, "blocks": []}

    def _check_disk(self) -> None:
        """Four streams at once (each model's input to the block and output), plus the trained blocks."""
        hidden = self.student.hidden_size
        stream = self.batches.padded_tokens * hidden * self.stream_dtype.itemsize
        needed = 4 * stream + self.student.block_bytes * self.student.n_layers * 2
        where = next(p for p in (self.work, *self.work.parents) if p.exists())
        free = shutil.disk_usage(where).free
        log.info("blockwise: %d blocks, %s tokens (%s padded); streams need %.2f GB on disk, blocks %.2f GB; "
                 "%.1f GB free", self.student.n_layers, f"{self.batches.tokens:,}", f"{self.batches.padded_tokens:,}",
                 4 * stream / 1e9, (needed - 4 * stream) / 1e9, free / 1e9)
        if free < needed:
            raise ConfigError(f"blockwise recovery needs {needed / 1e9:.2f} GB of disk under {self.work} "
                              f"(hidden-state streams and trained blocks); {free / 1e9:.2f} GB are free")

    def _embed(self, streams: Streams) -> None:
        """Stream 0 of both models: the token embeddings of every batch."""
        for who, reader in (("original", self.original), ("student", self.student)):
            embed = reader.embeddings()
            streams.write(who, 0, [embed(ids.to(self.device)) for ids in self.batches.ids])
            del embed

    def _block(self, layer: int, streams: Streams) -> dict:
        """Advance the original's stream through its block ``layer``, train the student's toward it, save the block,
        and advance the student's stream through the trained block."""
        t0 = time.perf_counter()
        context = self._context()
        if not streams.complete("original", layer + 1):
            original_block = self.original.block(layer, torch.float32)
            streams.write("original", layer + 1, _forward_all(original_block, streams.read("original", layer),
                                                              context, self.device, self.stream_dtype))
            del original_block
        block = self.student.block(layer, torch.float32)
        trainer = BlockTrainer(block, self.config, self.dtype, self.device)
        inputs, targets = streams.read("student", layer), streams.read("original", layer + 1)
        report = trainer.fit(inputs, targets, context, self.batches.attention, f"block {layer + 1}/{self.student.n_layers}")
        self.student.save_block(layer, block, self.work / "blocks")
        streams.write("student", layer + 1, _forward_all(block, inputs, context, self.device, self.stream_dtype))
        report.update(block=layer, seconds=round(time.perf_counter() - t0, 2))
        log.info("block %d: %s %.4g -> %.4g (%d steps, %.0f s)", layer, self.config.block_loss, report["loss_before"],
                 report["loss_after"], report["steps"], report["seconds"])
        return report

    def _context(self) -> list[dict]:
        if not hasattr(self, "_contexts"):
            self._contexts = [self.student.attention_context(a.to(self.device)) for a in self.batches.attention]
        return self._contexts

    def _train_log(self, progress: dict, seconds: float) -> dict:
        blocks = progress["blocks"]
        trained_tokens = self.batches.tokens * self.config.block_epochs
        return {
            "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self.config).items()},
            "method": "blockwise", "dtype": self.dtype, "records": len(self.data.encoded),
            "steps": sum(b["steps"] for b in blocks), "epochs": self.config.block_epochs, "blocks": blocks,
            "loss_curve": [{"step": b["block"], "loss": b["loss_after"]} for b in blocks],
            "seconds": round(sum(b["seconds"] for b in blocks), 2), "seconds_this_run": round(seconds, 2),
            "tokens_per_s": round(trained_tokens * self.student.n_layers / max(sum(b["seconds"] for b in blocks), 1e-9), 1),
            "peak_memory_gb": round(peak_memory_gb(), 3), "trained_tokens": trained_tokens,
            "targets": self.data.target_info, "skipped_records": self.data.skipped.summary(),
            "sparse_layers": sum(b["sparse_layers"] for b in blocks),
            "zeros_kept": sum(b["zeros_before"] for b in blocks),
            "zeros_after_merge": sum(b["zeros_after"] for b in blocks)}


@torch.no_grad()
def _forward_all(block: torch.nn.Module, inputs: Sequence[torch.Tensor], context: Sequence[dict], device: str,
                 stream_dtype: torch.dtype) -> list[torch.Tensor]:
    """The block's outputs for every batch, moved off the accelerator in the stream dtype as they come."""
    block.eval()
    return [block(x.to(device, torch.float32), **ctx).to("cpu", stream_dtype) for x, ctx in zip(inputs, context)]


class BlockTrainer:
    """Trains one block (fp32 master weights) toward its targets; pruned positions stay exactly zero."""

    def __init__(self, block: torch.nn.Module, config: Any, dtype: str, device: str):
        self.block, self.config, self.device = block, config, device
        self.autocast = dtype == "bf16"
        self.zeros = KeepZeros(block, device=device)

    def fit(self, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], context: Sequence[dict],
            attention: Sequence[torch.Tensor], label: str) -> dict:
        from transformers import get_cosine_schedule_with_warmup

        scale = self._scale(targets, attention)
        before = self._loss_all(inputs, targets, context, attention, scale)
        zeros_before = self.zeros.zeros()
        steps = max(1, math.ceil(self.config.block_epochs * len(inputs)))
        params = [p for p in self.block.parameters() if p.is_floating_point()]
        for p in params:
            p.requires_grad_(True)
        self.zeros.mask_gradients()
        optimizer = torch.optim.AdamW(params, lr=self.config.block_lr, weight_decay=0.0)
        schedule = get_cosine_schedule_with_warmup(optimizer, math.ceil(self.config.warmup_ratio * steps), steps)
        generator = torch.Generator().manual_seed(self.config.seed)
        order = []
        while len(order) < steps:
            order += torch.randperm(len(inputs), generator=generator).tolist()
        self.block.train()
        for b in tqdm(order[:steps], desc=label, leave=False, unit="step"):
            loss = self._loss(inputs[b], targets[b], context[b], attention[b], scale)
            loss.backward()
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            self.zeros.restore()
            faults.reached("blockwise.step")  # a kill here loses only this block's steps: a rerun redoes the block
        for p in params:
            p.requires_grad_(False)
        after = self._loss_all(inputs, targets, context, attention, scale)
        return {"loss_before": before, "loss_after": after, "steps": steps, "sparse_layers": len(self.zeros),
                "zeros_before": zeros_before, "zeros_after": self.zeros.zeros()}

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
        variance = square / count - (total / count) ** 2
        return (1.0 / variance.clamp_min(1e-6)).float().to(self.device)

    def _loss(self, x: torch.Tensor, y: torch.Tensor, ctx: dict, attention: torch.Tensor,
              scale: torch.Tensor) -> torch.Tensor:
        real = attention.to(self.device).bool()
        with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.block(x.to(self.device, torch.float32), **ctx)
        error = (out.float()[real] - y.to(self.device, torch.float32)[real]).pow(2)
        return (error * scale).mean()

    @torch.no_grad()
    def _loss_all(self, inputs: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], context: Sequence[dict],
                  attention: Sequence[torch.Tensor], scale: torch.Tensor) -> float:
        losses = [self._loss(x, y, c, a, scale).item() * int(a.sum()) for x, y, c, a in zip(inputs, targets, context, attention)]
        return sum(losses) / sum(int(a.sum()) for a in attention)


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


class LayerReader:
    """One decoder block of a checkpoint at a time, read from its safetensors shards (the rest of the model is
    never materialised): the embeddings, block ``i``, the rotary embedding and the attention mask's form."""

    def __init__(self, spec: str, device: str):
        from transformers import AutoConfig

        self.spec, self.device = spec, device
        self.location = safetensors_folder(spec)
        self.config = AutoConfig.from_pretrained(self.location)
        if self.config.model_type not in SUPPORTED:
            raise ConfigError(f"blockwise recovery supports Llama-family decoders ({', '.join(SUPPORTED)}); "
                              f"{spec} is '{self.config.model_type}'")
        self.n_layers, self.hidden_size = self.config.num_hidden_layers, self.config.hidden_size
        self.index = tensor_index(Path(self.location).glob("*.safetensors"))
        self.prefix = "model.layers."
        self._rotary = None
        with torch.device("meta"):
            from transformers import AutoModelForCausalLM

            self.skeleton = AutoModelForCausalLM.from_config(self.config)
        self.block_bytes = sum(p.numel() for p in self.skeleton.model.layers[0].parameters()) * 4

    def _tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        names = [n for n in self.index if n.startswith(prefix)]
        tensors = {}
        for shard in sorted({self.index[n] for n in names}):
            with safe_open(shard, framework="pt") as f:
                tensors.update({n[len(prefix):]: f.get_tensor(n) for n in names if self.index[n] == shard})
        return tensors

    def embeddings(self) -> torch.nn.Embedding:
        weight = self._tensors("model.embed_tokens.")["weight"]
        return torch.nn.Embedding.from_pretrained(weight.to(self.device, torch.float32))

    def block(self, layer: int, dtype: torch.dtype) -> torch.nn.Module:
        block = copy.deepcopy(self.skeleton.model.layers[layer]).to_empty(device=self.device)
        block.load_state_dict({k: v.to(dtype) for k, v in self._tensors(f"{self.prefix}{layer}.").items()})
        return block.to(dtype).requires_grad_(False)

    def attention_context(self, attention: torch.Tensor) -> dict[str, Any]:
        """The block's keyword arguments for one batch: the additive causal + padding mask and the rotary
        embedding's (cos, sin) at positions 0..T-1."""
        if self._rotary is None:
            rotary_class = type(self.skeleton.model.rotary_emb)
            self._rotary = rotary_class(config=self.config).to(self.device)
        batch, length = attention.shape
        causal = torch.ones(length, length, dtype=torch.bool, device=self.device).tril()
        allowed = causal[None, None] & attention.bool()[:, None, None, :]
        mask = torch.zeros(batch, 1, length, length, device=self.device).masked_fill(~allowed, torch.finfo(torch.float32).min)
        positions = torch.arange(length, device=self.device)[None].expand(batch, -1)
        dummy = torch.zeros(1, device=self.device, dtype=torch.float32)
        return {"attention_mask": mask, "position_ids": positions,
                "position_embeddings": self._rotary(dummy, position_ids=positions)}

    def save_block(self, layer: int, block: torch.nn.Module, directory: Path) -> None:
        dtype = next(iter(self._tensors(f"{self.prefix}{layer}.input_layernorm.").values())).dtype
        state = {f"{self.prefix}{layer}.{k}": v.detach().to("cpu", dtype).contiguous() for k, v in block.state_dict().items()}
        directory.mkdir(parents=True, exist_ok=True)
        with atomic_path(directory / f"{layer:03d}.safetensors", suffix=".safetensors") as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})


def shape_mismatch(pruned: Any, original: Any) -> str | None:
    """Why the pruned model's blocks cannot be trained against the original's (None when they can): a config
    field of :data:`BLOCK_SHAPE_FIELDS` that pruning changed (structured pruning shrinks them)."""
    for field in BLOCK_SHAPE_FIELDS:
        if getattr(pruned, field, None) != getattr(original, field, None):
            return (f"pruning changed the blocks' shapes ({field}: {getattr(pruned, field, None)} vs the original's "
                    f"{getattr(original, field, None)}; structured pruning)")
    return None


def blockwise_unsupported(model: str, original: str) -> str | None:
    """Why block-wise recovery cannot run on this pruned model and original (None when it can), read from their
    configs alone: a decoder outside :data:`SUPPORTED`, or blocks whose shapes pruning changed. A config that
    cannot be read is an error (the model could not be trained any other way either)."""
    from transformers import AutoConfig

    configs = {}
    for role, spec in (("pruned", model), ("original", original)):
        try:
            configs[role] = AutoConfig.from_pretrained(resolve_spec(spec).location)
        except (OSError, ValueError) as error:  # missing, unreadable or not a model config: say which and why
            raise ConfigError(f"the {role} model's config could not be read ({spec}): {error}") from None
        if configs[role].model_type not in SUPPORTED:
            return f"block-wise supports Llama-family decoders ({', '.join(SUPPORTED)}), not '{configs[role].model_type}'"
    return shape_mismatch(configs["pruned"], configs["original"])


def safetensors_folder(spec: str) -> str:
    """A folder holding the checkpoint's safetensors (a hub id is downloaded into the hub cache, or found there)."""
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
