"""Model passes every stage shares: teacher-forced passes that keep only what is asked for (per-row sums of the
NLL or of the divergence between two models at chosen positions), batch building, perplexity.

Efficiency: the decoder runs once per batch; the LM head is applied only to the hidden states at the positions a
measure reads, in chunks of ``chunk_rows`` rows, so full-vocabulary logits for prompt and padding positions are never
formed. Batches are length-bucketed and right-padded (causal attention makes the real tokens' results independent of
the padding). Selection's scoring (:mod:`paser.selection.score`), the stored teacher (:mod:`paser.teacher`),
pruning's perplexity and evaluation's measurements all read these.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import Encoded, pad_right

LN2 = math.log(2.0)


def jsd_and_nll(logits_p: torch.Tensor, logits_q: torch.Tensor, targets: torch.Tensor | None = None):
    """Per-row Jensen-Shannon divergence (nats, in [0, ln 2]) between softmax(logits_p) and
    softmax(logits_q), and the NLL of ``targets`` under each. Computed in fp32 log space: with
    ``m = log((p + q) / 2)``, ``JSD = (sum p (log p - m) + sum q (log q - m)) / 2``."""
    zp = logits_p.float()
    zq = logits_q.float()
    zp = zp - zp.amax(dim=-1, keepdim=True)
    zq = zq - zq.amax(dim=-1, keepdim=True)
    ep, eq = zp.exp(), zq.exp()
    sp, sq = ep.sum(-1, keepdim=True), eq.sum(-1, keepdim=True)
    log_p, log_q = zp - sp.log(), zq - sq.log()
    p, q = ep / sp, eq / sq
    # Both probabilities can underflow to 0; the clamp keeps m finite and such terms are exactly 0.
    m = (p + q).clamp_min(torch.finfo(torch.float32).tiny).log() - LN2
    jsd = 0.5 * ((p * (log_p - m)).sum(-1) + (q * (log_q - m)).sum(-1))
    jsd = torch.nan_to_num(jsd, nan=0.0).clamp_(0.0, LN2)
    if targets is None:
        return jsd, None, None
    t = targets.unsqueeze(-1)
    return jsd, -log_p.gather(-1, t).squeeze(-1), -log_q.gather(-1, t).squeeze(-1)


def length_buckets(lengths: Sequence[int], batch_size: int, max_batch_tokens: int) -> list[list[int]]:
    """Group sample indices into batches of similar length (longest first)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        width = lengths[current[0]] if current else lengths[i]  # the first is the longest
        if current and (len(current) >= batch_size or width * (len(current) + 1) > max_batch_tokens):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def collate(encoded: Sequence[Encoded], pad_id: int):
    """Right-padded ids, attention mask, response mask over hidden positions, and response targets."""
    ids, attention = pad_right([e.input_ids for e in encoded], pad_id)
    predicts_response = torch.zeros_like(ids, dtype=torch.bool)
    for row, e in enumerate(encoded):
        n, p = len(e.input_ids), len(e.prompt_ids)
        predicts_response[row, p - 1:n - 1] = True  # hidden state at t predicts token t + 1
    targets = ids[:, 1:][predicts_response[:, :-1]]
    return ids, attention, predicts_response, targets


def _decoder_and_head(model: Any):
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model.base_model
    return decoder, model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)


def _head(head: Any, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    logits = head(hidden)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def model_pass(model: Any, ids: torch.Tensor, attention: torch.Tensor, predicts: torch.Tensor, **decoder_kwargs: Any):
    """The public model-pass helper: one decoder pass, hidden states at the ``predicts`` positions (rows in
    batch order), and a function giving the LM head's logits for a slice of those rows. Callers run the head
    ``chunk_rows`` rows at a time, so full-vocabulary logits are never formed for a whole batch. Scoring, the
    teacher store, IFD, Nuggets (``past_key_values``: a shared demonstration), evaluation and fidelity use it."""
    device = next(model.parameters()).device
    decoder, head, softcap = _decoder_and_head(model)
    states = decoder(input_ids=ids.to(device), attention_mask=attention.to(device), **decoder_kwargs).last_hidden_state
    hidden = states[predicts.to(states.device)]
    return hidden, lambda rows: _head(head, hidden[rows], softcap)


def per_row_sums(values: torch.Tensor, predicts: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Per batch row: the sum of ``values`` (one per predicting position, in row order) and their count."""
    counts = predicts.sum(1)
    segment = torch.repeat_interleave(torch.arange(len(predicts)), counts)
    sums = torch.zeros(len(predicts), dtype=torch.float64).index_add_(0, segment, values.double().cpu())
    return sums.numpy(), counts.numpy()


@torch.no_grad()
def summed_nll(model: Any, ids: torch.Tensor, attention: torch.Tensor, predicts: torch.Tensor,
               targets: torch.Tensor, chunk_rows: int = 128) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the summed NLL of ``targets`` predicted at the ``predicts`` positions, and their count
    (evaluation and scoring share this)."""
    hidden, logits_of = model_pass(model, ids, attention, predicts)
    nll = torch.empty(hidden.shape[0], dtype=torch.float32)
    for start in range(0, hidden.shape[0], chunk_rows):
        sl = slice(start, start + chunk_rows)
        logits = logits_of(sl).float()
        nll[sl] = torch.nn.functional.cross_entropy(logits, targets[sl].to(logits.device), reduction="none").cpu()
    return per_row_sums(nll, predicts)


@torch.no_grad()
def fidelity_sums(original: Any, model: Any, ids: torch.Tensor, attention: torch.Tensor, predicts: torch.Tensor,
                  chunk_rows: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, over the ``predicts`` positions: the summed KL(original || model) of the next-token
    distributions (exact, over the whole vocabulary), how many positions the two models' top-1 tokens agree,
    and the position count. One decoder pass of each model."""
    hidden_p, logits_p = model_pass(original, ids, attention, predicts)
    hidden_q, logits_q = model_pass(model, ids, attention, predicts)
    kl = torch.empty(hidden_p.shape[0], dtype=torch.float32)
    agree = torch.empty(hidden_p.shape[0], dtype=torch.float32)
    for start in range(0, hidden_p.shape[0], chunk_rows):
        sl = slice(start, start + chunk_rows)
        log_p = logits_p(sl).float().log_softmax(-1)
        log_q = logits_q(sl).float().to(log_p.device).log_softmax(-1)
        kl[sl] = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0).cpu()
        agree[sl] = (log_p.argmax(-1) == log_q.argmax(-1)).float().cpu()
    kl_sums, counts = per_row_sums(kl, predicts)
    agree_sums, _ = per_row_sums(agree, predicts)
    return kl_sums, agree_sums, counts


@torch.no_grad()
def sequence_nll(model: Any, sequences: Sequence[Sequence[int]], batch_size: int = 8,
                 progress: bool = False) -> tuple[list[float], list[int]]:
    """Per sequence: the summed NLL of its predicted tokens and their count (perplexity's per-item parts)."""
    sums: list[float] = []
    counts: list[int] = []
    starts = range(0, len(sequences), batch_size)
    for start in tqdm(starts, desc="perplexity", disable=not progress, leave=False):
        ids, mask = pad_right(sequences[start:start + batch_size], 0)
        batch_sums, batch_counts = summed_nll(model, ids, mask, next_token_positions(mask),
                                              ids[:, 1:][mask[:, 1:].bool()])
        sums.extend(batch_sums.tolist())
        counts.extend(batch_counts.tolist())
    return sums, counts


def next_token_positions(mask: torch.Tensor) -> torch.Tensor:
    """Positions that predict a real next token (position t predicts token t + 1)."""
    predicts = torch.zeros_like(mask, dtype=torch.bool)
    predicts[:, :-1] = mask[:, 1:].bool()
    return predicts


def perplexity(model: Any, sequences: Sequence[Sequence[int]], batch_size: int = 8, progress: bool = False) -> float:
    """exp(mean NLL) over every predicted token of the sequences (right-padded batches)."""
    nll, count = sequence_nll(model, sequences, batch_size, progress)
    return math.exp(sum(nll) / max(sum(count), 1))
