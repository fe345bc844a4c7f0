"""Degradation scoring for selection: one teacher-forced pass of each model per sample, response tokens only
(the passes themselves are :mod:`paser.passes`).

Both models read the formatted prompt plus the reference response. At every response position the
Jensen-Shannon divergence between the two next-token distributions is computed; a sample's JSD is the
mean over its response tokens. Each model's response NLL comes from the same pass.

Efficiency: the decoder runs once per model per batch, the LM head only at response positions
(:mod:`paser.passes`).

Per-sample tables are cached as parquet under ``<cache>/scores/``, keyed by both models' weights, the
records, the prompt template and the dtype; an interrupted run resumes from its partial file.

Scorers (in the spirit of Torch-Pruning's ``Importance`` objects) turn that table into one number per
sample: ``jsd`` (PASER), ``loss_gap`` (pruned minus original response loss), ``pruned_loss``. Add one by
subclassing :class:`SampleScorer` and registering it with ``@SCORERS.register(name)``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .. import distributed, faults
from ..cache import checkpoint_seconds, stable_hash, write_parquet
from ..data import Encoded
from ..passes import collate, jsd_and_nll, length_buckets, model_pass, summed_nll
from ..registry import Registry

log = logging.getLogger(__name__)

PAIR_VALUES = ("jsd", "loss_original", "loss_pruned")  # what the two-model pass stores per sample
SCORE_COLUMNS = ["index", "jsd", "prompt_tokens", "response_tokens", "loss_original", "loss_pruned", "truncated"]


@dataclass(frozen=True)
class ScoreConfig:
    """Scoring settings (documented defaults, shared by the CLI and the API)."""

    batch_size: int = 16  # samples per batch at most
    max_batch_tokens: int = 4096  # padded tokens per batch at most
    chunk_rows: int = 128  # response positions per LM-head/JSD chunk (keeps logits cache-sized)
    # how often partial results are saved for resuming ($PASER_CHECKPOINT_SECONDS, default 60)
    checkpoint_seconds: float = field(default_factory=checkpoint_seconds)


# ------------------------------------------------------------------------------------------- batching


@torch.no_grad()
def score_batch(original: Any, pruned: Any, encoded: Sequence[Encoded], pad_id: int, chunk_rows: int = 128):
    """Per-sample mean JSD and response losses for one batch: one decoder pass of each model."""
    ids, attention, predicts_response, targets = collate(encoded, pad_id)
    # (with a device_map, each model's layers may sit on several devices)
    (h_p, logits_p_of), (_, logits_q_of) = (model_pass(m, ids, attention, predicts_response) for m in (original, pruned))
    device = h_p.device
    targets = targets.to(device)
    rows = h_p.shape[0]
    jsd = torch.empty(rows, dtype=torch.float32, device=device)
    nll_p = torch.empty_like(jsd)
    nll_q = torch.empty_like(jsd)
    for start in range(0, rows, chunk_rows):
        sl = slice(start, start + chunk_rows)
        logits_p = logits_p_of(sl)
        jsd[sl], nll_p[sl], nll_q[sl] = jsd_and_nll(logits_p, logits_q_of(sl).to(logits_p.device),
                                                    targets[sl].to(logits_p.device))
    counts = predicts_response.sum(1)
    segment = torch.repeat_interleave(torch.arange(len(encoded)), counts).to(device)

    def mean(values: torch.Tensor) -> np.ndarray:
        sums = torch.zeros(len(encoded), dtype=torch.float64, device=device).index_add_(0, segment, values.double())
        return (sums / counts.to(device).clamp_min(1)).cpu().numpy()

    return mean(jsd), mean(nll_p), mean(nll_q)


# --------------------------------------------------------------------------------------------- driver
def score_cache_key(original_fp: str, pruned_fp: str, data_fp: str, template_fp: dict, dtype: str) -> str:
    return stable_hash("scores-v2", original_fp, pruned_fp, data_fp, template_fp, dtype)


def score_records(original: Any, pruned: Any, encoded: Sequence[Encoded], pad_id: int,
                  config: ScoreConfig = ScoreConfig(), cache_file: Path | None = None,
                  progress: bool = True) -> pd.DataFrame:
    """Score every encoded sample; resumes from ``cache_file``'s partial file if one exists.

    Returns the per-sample table (columns :data:`SCORE_COLUMNS`, in input order).
    """
    def batch(items: Sequence[Encoded]) -> tuple[np.ndarray, ...]:
        return score_batch(original, pruned, items, pad_id, config.chunk_rows)

    return score_table(encoded, batched_values(encoded, batch, PAIR_VALUES, config, cache_file, "score (JSD)",
                                               progress))


def score_table(encoded: Sequence[Encoded], values: dict[str, np.ndarray]) -> pd.DataFrame:
    """The per-sample table (:data:`SCORE_COLUMNS`) from the pair values and the encodings."""
    return pd.DataFrame({
        "index": np.arange(len(encoded)), "jsd": values["jsd"],
        "prompt_tokens": [len(e.prompt_ids) for e in encoded],
        "response_tokens": [len(e.response_ids) for e in encoded],
        "loss_original": values["loss_original"], "loss_pruned": values["loss_pruned"],
        "truncated": [e.truncated for e in encoded],
    })[SCORE_COLUMNS]


def response_loss_batch(model: Any, encoded: Sequence[Encoded], pad_id: int, chunk_rows: int = 128) -> np.ndarray:
    """Per-sample mean NLL of the response tokens given what precedes them: one decoder pass."""
    ids, attention, predicts_response, targets = collate(encoded, pad_id)
    sums, counts = summed_nll(model, ids, attention, predicts_response, targets, chunk_rows)
    return sums / np.maximum(counts, 1)


def response_losses(model: Any, encoded: Sequence[Encoded], pad_id: int, config: ScoreConfig = ScoreConfig(),
                    cache_file: Path | None = None, progress: bool = True, desc: str = "response loss") -> np.ndarray:
    """Mean response NLL per sample under one model (batched, resumable like :func:`score_records`)."""
    def batch(items: Sequence[Encoded]) -> tuple[np.ndarray, ...]:
        return (response_loss_batch(model, items, pad_id, config.chunk_rows),)

    return batched_values(encoded, batch, ("loss",), config, cache_file, desc, progress)["loss"]


def read_values(cache_file: Path, columns: Sequence[str]) -> dict[str, np.ndarray]:
    """The finished per-sample values :func:`batched_values` stored in ``cache_file``."""
    done = pd.read_parquet(cache_file)
    return {c: done[c].to_numpy(np.float64) for c in columns}


def batched_values(encoded: Sequence[Encoded], compute: Any, columns: Sequence[str], config: ScoreConfig,
                   cache_file: Path | None, desc: str, progress: bool = True) -> dict[str, np.ndarray]:
    """Run ``compute`` (a batch of encodings -> one array per column) over length-bucketed batches.

    With ``cache_file``, finished rows are saved to a partial file beside it every ``config.checkpoint_seconds``
    and a rerun continues from them; the full table is written to ``cache_file`` (atomically) at the end and
    the partial files removed.

    Under ``accelerate launch`` / ``torchrun`` (:mod:`paser.distributed`) the batches still to do (formed as
    one process forms them, so every value is the one a single process computes) are split across the
    processes by token count; each saves its own partial file (``<cache>.rank<r>.partial.parquet``), so a
    killed rank's finished work is kept, whatever the number of processes of the rerun. Every rank returns
    the merged values; rank 0 writes ``cache_file``.
    """

    n = len(encoded)
    if cache_file and cache_file.exists():
        return read_values(cache_file, columns)
    values = {c: np.full(n, np.nan) for c in columns}
    rank, world = distributed.rank(), distributed.world_size()
    partial = None
    if cache_file:
        partial = cache_file.with_suffix(f".rank{rank}.partial.parquet" if world > 1 else ".partial.parquet")
    carried = _resume_from_partials(cache_file, partial, values, columns, world)
    first = values[columns[0]]
    todo = [i for i in range(n) if np.isnan(first[i])]
    if len(todo) < n:
        log.info("resuming scoring: %d of %d samples already scored", n - len(todo), n)
    distributed.barrier()  # every rank has read the partial files before any rank writes one
    batches = _my_batches(encoded, todo, config, rank, world)
    lengths = [len(encoded[i].input_ids) for b in batches for i in b]
    mine = np.zeros(n, dtype=bool)

    def table(rows: np.ndarray) -> pd.DataFrame:
        return pd.DataFrame({"index": rows, **{c: values[c][rows] for c in columns}})

    last_save = time.monotonic()
    with tqdm(total=sum(lengths), unit="tok", desc=desc, disable=not progress or not batches or rank != 0) as bar:
        for batch in batches:
            for c, v in zip(columns, compute([encoded[i] for i in batch])):
                values[c][batch] = v
            mine[batch] = True
            bar.update(sum(len(encoded[i].input_ids) for i in batch))
            if partial and time.monotonic() - last_save > config.checkpoint_seconds:
                write_parquet(partial, table(np.flatnonzero(mine | carried)))
                last_save = time.monotonic()
                faults.reached("score.saved")
    if world > 1:  # each rank filled its shard: merge
        _merge_ranks(values, columns, mine)
    if cache_file and distributed.is_main():
        write_parquet(cache_file, table(np.arange(n)))
        for f in _partial_files(cache_file):
            f.unlink(missing_ok=True)
    distributed.barrier()  # the cache file exists for everyone before anyone moves on
    return values


def _merge_ranks(values: dict[str, np.ndarray], columns: Sequence[str], mine: np.ndarray) -> None:
    """Every rank's rows into every rank's ``values``."""

    rows = np.flatnonzero(mine)
    for part_rows, part in distributed.all_gather((rows, {c: values[c][rows] for c in columns})):
        for c in columns:
            values[c][part_rows] = part[c]


def _resume_from_partials(cache_file: Path | None, partial: Path | None, values: dict[str, np.ndarray],
                          columns: Sequence[str], world: int) -> np.ndarray:
    """Fill ``values`` from the partial files of an interrupted run; returns the rows this process's own partial
    file must keep holding."""
    carried = np.zeros(len(values[columns[0]]), dtype=bool)
    for path in _partial_files(cache_file):
        done = pd.read_parquet(path)
        rows = done["index"].to_numpy()
        for c in columns:
            values[c][rows] = done[c].to_numpy()
        if world == 1 or path == partial:
            carried[rows] = True
    return carried


def _my_batches(encoded: Sequence[Encoded], todo: list[int], config: ScoreConfig, rank: int, world: int
                ) -> list[list[int]]:
    """The length-bucketed batches still to do; under a launcher, this process's share of whole batches (as one
    process forms them, so the values are identical), balanced by token count."""

    lengths = [len(encoded[i].input_ids) for i in todo]
    batches = [[todo[j] for j in b] for b in length_buckets(lengths, config.batch_size, config.max_batch_tokens)]
    if world > 1:
        tokens = [sum(len(encoded[i].input_ids) for i in b) for b in batches]
        batches = [batches[j] for j in distributed.shard_by_tokens(tokens, world)[rank]]
    return batches


def _partial_files(cache_file: Path | None) -> list[Path]:
    """The partial files of an interrupted computation of ``cache_file`` (one process's, or one per rank)."""
    if not cache_file:
        return []
    single = cache_file.with_suffix(".partial.parquet")
    ranks = sorted(cache_file.parent.glob(cache_file.with_suffix("").name + ".rank*.partial.parquet"))
    return [f for f in (single, *ranks) if f.exists()]


# -------------------------------------------------------------------------------------------- scorers
class SampleScorer:
    """Turns the per-sample score table into one degradation number per sample (higher = more damaged)."""

    name = "base"

    def __call__(self, table: pd.DataFrame) -> np.ndarray:
        raise NotImplementedError


SCORERS: Registry[SampleScorer] = Registry("scorer", "paser.scorers")


@SCORERS.register("jsd")
class JSDScore(SampleScorer):
    """PASER's: mean response-token JSD between the original and the pruned model."""

    def __call__(self, table: pd.DataFrame) -> np.ndarray:
        return table["jsd"].to_numpy(dtype=np.float64)


@SCORERS.register("loss_gap")
class LossGapScore(SampleScorer):
    """How much worse the pruned model predicts the reference response (nats/token), floored at 0."""

    def __call__(self, table: pd.DataFrame) -> np.ndarray:
        return np.maximum(table["loss_pruned"].to_numpy(np.float64) - table["loss_original"].to_numpy(np.float64), 0.0)


@SCORERS.register("pruned_loss")
class PrunedLossScore(SampleScorer):
    """The pruned model's response loss alone (a difficulty score that ignores the original)."""

    def __call__(self, table: pd.DataFrame) -> np.ndarray:
        return table["loss_pruned"].to_numpy(np.float64)


def get_scorer(name: str) -> SampleScorer:
    return SCORERS.get(name)
