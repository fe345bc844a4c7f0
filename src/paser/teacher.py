"""The stored teacher signal: the original model's top-k log-probabilities at response positions.

One format, two uses: the distillation teacher cache (recovery trains with only the student resident) and
JSD scoring with one model resident (pass 1 runs only the original model; pass 2 only the pruned one).

Per response position we keep the k largest log-probabilities of the teacher, their token ids, and the log
of the remaining (tail) mass ``p_T = 1 - sum_{v in S} p(v)``. Divergences against a student distribution q
are then computed over the k + 1 buckets ``S + {tail}``, with ``q_T = 1 - sum_{v in S} q(v)`` from the
student's full distribution:

    KL_b(p || q) = sum_{v in S} p(v) log(p(v) / q(v)) + p_T log(p_T / q_T)

Error bound. Merging the tail into one bucket is a coarsening, so by the chain rule of f-divergences
``KL = KL_b + p_T KL(p~ || q~)`` (``p~``, ``q~``: the tails renormalised) and ``0 <= KL - KL_b``; for the
KL the gap is not bounded in general (q's tail can be tiny where p's is not), which is why the cache keeps
the tail mass and why k should cover most of the teacher's mass. For the Jensen-Shannon divergence the
same chain rule gives, with ``m = (p + q) / 2``,

    JSD - JSD_b = (p_T + q_T) / 2 * JS_pi(p~, q~),   pi = (p_T, q_T) / (p_T + q_T),

a weighted JS divergence, itself at most the entropy of ``pi`` (at most ln 2). Hence

    0 <= JSD - JSD_b <= (p_T + q_T) / 2 * H(pi) <= (p_T + q_T) / 2 * ln 2,

computable per position from the two tail masses. With k = the vocabulary size both tails are 0 and
the bucketed values are exact.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .cache import atomic_path, entry_lock, stable_hash
from .data import Encoded
from .passes import collate, length_buckets, model_pass, per_row_sums

LN2 = math.log(2.0)
TAIL_FLOOR = math.log(1e-30)  # the student's tail mass is at least this (log): finite divergences


@dataclass
class TopK:
    """Top-k teacher log-probabilities at every response position of N records (rows concatenated)."""

    logprobs: np.ndarray  # (rows, k) float32, descending
    ids: np.ndarray  # (rows, k) int32
    log_tail: np.ndarray  # (rows,) float32: log of the mass outside the top k (-inf when none)
    offsets: np.ndarray  # (N + 1,) int64: record i's rows are offsets[i]:offsets[i + 1]
    target_logprobs: np.ndarray  # (rows,) float32: the reference token's log-probability (the teacher's NLL)

    def rows(self, i: int) -> slice:
        return slice(int(self.offsets[i]), int(self.offsets[i + 1]))

    def save(self, path: Any) -> None:
        with atomic_path(path, suffix=".npz") as tmp:
            np.savez(tmp, logprobs=self.logprobs, ids=self.ids, log_tail=self.log_tail, offsets=self.offsets,
                     target_logprobs=self.target_logprobs)

    @classmethod
    def load(cls, path: Any) -> TopK:
        data = np.load(path)
        return cls(data["logprobs"], data["ids"], data["log_tail"], data["offsets"], data["target_logprobs"])


def _log_tail(top_logprobs: torch.Tensor) -> torch.Tensor:
    """log(1 - sum exp(top)) computed stably; -inf when the top k hold all the mass."""
    covered = torch.logsumexp(top_logprobs.double(), dim=-1)
    return torch.log((-torch.expm1(covered)).clamp_min(0.0)).float()  # log(1 - e^covered)


@torch.no_grad()
def teacher_topk(model: Any, encoded: Sequence[Encoded], pad_id: int, k: int = 64, batch_size: int = 16,
                 max_batch_tokens: int = 4096, chunk_rows: int = 128) -> TopK:
    """One pass of the teacher over every record; keeps the top-k log-probabilities per response position."""
    counts = [len(e.response_ids) for e in encoded]
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    k = min(k, model.get_output_embeddings().weight.shape[0])
    logprobs = np.zeros((offsets[-1], k), dtype=np.float32)
    ids = np.zeros((offsets[-1], k), dtype=np.int32)
    log_tail = np.zeros(offsets[-1], dtype=np.float32)
    target_logprobs = np.zeros(offsets[-1], dtype=np.float32)
    lengths = [len(e.input_ids) for e in encoded]
    for batch in length_buckets(lengths, batch_size, max_batch_tokens):
        ids_t, attention, predicts_response, targets = collate([encoded[i] for i in batch], pad_id)
        hidden, logits_of = model_pass(model, ids_t, attention, predicts_response)  # rows: each record's in order
        rows = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in batch])
        for start in range(0, hidden.shape[0], chunk_rows):
            sl = slice(start, start + chunk_rows)
            logp = logits_of(sl).float().log_softmax(-1)
            top = logp.topk(k, dim=-1)
            logprobs[rows[sl]] = top.values.cpu().numpy()
            ids[rows[sl]] = top.indices.cpu().numpy()
            log_tail[rows[sl]] = _log_tail(top.values).cpu().numpy()
            target_logprobs[rows[sl]] = logp.gather(-1, targets[sl].to(logp.device).unsqueeze(-1))[:, 0].cpu().numpy()
    return TopK(logprobs, ids, log_tail, offsets, target_logprobs)


def stored_topk(model_key: str, load: Any, encoded: Sequence[Encoded], pad_id: int, k: int, dtype: str,
                cache_dir: Path) -> TopK:
    """The top-k store of one model over ``encoded``, computed once and cached under ``cache_dir/teacher`` by
    the model's weights, the encodings, k and dtype. ``load()`` gives the model, called only on a miss."""

    key = stable_hash("teacher-topk-v2", model_key, [e.input_ids for e in encoded], [len(e.prompt_ids) for e in encoded],
                      k, dtype)
    path = Path(cache_dir) / "teacher" / f"{key}.npz"
    with entry_lock(path, "the top-k store"):
        if path.exists():
            logging.getLogger(__name__).info("top-%d store: from %s", k, path)
            return TopK.load(path)
        store = teacher_topk(load(), encoded, pad_id, k=k)
        store.save(path)
    return store


@torch.no_grad()
def jsd_against_store(model: Any, store: TopK, encoded: Sequence[Encoded], positions: Sequence[int], pad_id: int,
                      chunk_rows: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pass 2 of one-resident scoring: per record, the mean bucketed JSD between the stored model and
    ``model`` over the response tokens, the stored model's NLL and ``model``'s NLL (as :func:`paser.selection.score.score_batch`
    returns them). ``positions`` are the records' rows in the store."""
    ids_t, attention, predicts_response, targets = collate(encoded, pad_id)
    device = next(model.parameters()).device
    hidden, logits_of = model_pass(model, ids_t, attention, predicts_response)
    rows = torch.from_numpy(np.concatenate([np.arange(store.offsets[i], store.offsets[i + 1]) for i in positions]))
    jsd = torch.empty(hidden.shape[0], dtype=torch.float32)
    nll = torch.empty_like(jsd)
    for start in range(0, hidden.shape[0], chunk_rows):
        sl = slice(start, start + chunk_rows)
        logits = logits_of(sl).float()
        r = rows[sl].numpy()
        jsd[sl] = bucketed_jsd(torch.from_numpy(store.logprobs[r]).to(device), torch.from_numpy(store.ids[r]).to(device),
                               torch.from_numpy(store.log_tail[r]).to(device), logits)[0].cpu()
        nll[sl] = torch.nn.functional.cross_entropy(logits, targets[sl].to(device), reduction="none").cpu()
    counts = predicts_response.sum(1)
    segment = torch.repeat_interleave(torch.arange(len(encoded)), counts)

    def mean(values: torch.Tensor) -> np.ndarray:
        return (torch.zeros(len(encoded), dtype=torch.float64).index_add_(0, segment, values.double())
                / counts.clamp_min(1)).numpy()

    stored_nll = torch.from_numpy(-store.target_logprobs[rows.numpy()])
    return mean(jsd), mean(stored_nll), mean(nll)


@torch.no_grad()
def fidelity_against_store(model: Any, store: TopK, encoded: Sequence[Encoded], positions: Sequence[int], pad_id: int,
                           chunk_rows: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fidelity with only ``model`` resident: per record, the summed bucketed KL(stored || model) over its
    response positions (a lower bound of the exact KL, see the module doc), how many positions the two top-1
    tokens agree (exact: the stored model's top-1 is in its top k), and the position count."""
    ids_t, attention, predicts_response, _ = collate(encoded, pad_id)
    device = next(model.parameters()).device
    hidden, logits_of = model_pass(model, ids_t, attention, predicts_response)
    rows = np.concatenate([np.arange(store.offsets[i], store.offsets[i + 1]) for i in positions])
    kl = torch.empty(hidden.shape[0], dtype=torch.float32)
    agree = torch.empty_like(kl)
    for start in range(0, hidden.shape[0], chunk_rows):
        sl = slice(start, start + chunk_rows)
        logits = logits_of(sl).float()
        r = rows[sl]
        top_ids = torch.from_numpy(store.ids[r]).to(device)
        kl[sl] = bucketed_kl(torch.from_numpy(store.logprobs[r]).to(device), top_ids,
                             torch.from_numpy(store.log_tail[r]).to(device), logits).clamp_min(0).cpu()
        agree[sl] = (logits.argmax(-1) == top_ids[:, 0].long()).float().cpu()

    kl_sums, counts = per_row_sums(kl, predicts_response)
    agree_sums, _ = per_row_sums(agree, predicts_response)
    return kl_sums, agree_sums, counts


def _buckets(top_logprobs: torch.Tensor, top_ids: torch.Tensor, log_tail: torch.Tensor,
             student_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(teacher, student) log-probabilities over the k + 1 buckets (the top-k tokens, then the tail)."""
    log_q = student_logits.float().log_softmax(-1)
    q_top = log_q.gather(-1, top_ids.long())
    log_q_tail = _log_tail(q_top).clamp_min(TAIL_FLOOR)  # rounding can leave p a tail where q's rounds to 0
    return (torch.cat([top_logprobs.float(), log_tail.float().unsqueeze(-1)], -1),
            torch.cat([q_top, log_q_tail.unsqueeze(-1)], -1))


def bucketed_kl(top_logprobs: torch.Tensor, top_ids: torch.Tensor, log_tail: torch.Tensor,
                student_logits: torch.Tensor) -> torch.Tensor:
    """Per row: KL_b(teacher || student) over the top-k buckets and the tail (see the module doc)."""
    log_p, log_q = _buckets(top_logprobs, top_ids, log_tail, student_logits)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(-1)


def bucketed_jsd(top_logprobs: torch.Tensor, top_ids: torch.Tensor, log_tail: torch.Tensor,
                 student_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: JSD_b over the buckets, and the bound on JSD - JSD_b: (p_T + q_T) / 2 * H(pi)."""
    log_p, log_q = _buckets(top_logprobs, top_ids, log_tail, student_logits)
    p, q = log_p.exp(), log_q.exp()
    log_m = ((p + q) / 2).clamp_min(torch.finfo(torch.float32).tiny).log()
    kl_p = torch.where(p > 0, p * (log_p - log_m), torch.zeros_like(p)).sum(-1)
    kl_q = torch.where(q > 0, q * (log_q - log_m), torch.zeros_like(q)).sum(-1)
    jsd = (0.5 * (kl_p + kl_q)).clamp(0.0, LN2)
    p_t, q_t = p[..., -1], q[..., -1]
    total = p_t + q_t
    pi = torch.stack([p_t, q_t], -1) / total.clamp_min(1e-30).unsqueeze(-1)
    entropy = -(torch.where(pi > 0, pi * pi.clamp_min(1e-30).log(), torch.zeros_like(pi))).sum(-1)
    return jsd, total / 2 * entropy
