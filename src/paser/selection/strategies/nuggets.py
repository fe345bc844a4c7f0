"""Nuggets: one-shot learning value (Li et al., "One Shot Learning as Instruction Data Prospector", ACL 2024).

A fixed anchor set (``anchors`` records drawn from the pool with the seed, or ``anchor_data``) is scored
zero-shot by the pruned model: the mean loss of each anchor's response given its prompt. A candidate's
score is the fraction of anchors whose response loss *drops* when the candidate (its prompt and
response) is placed before the anchor as a one-shot demonstration. The budget takes the highest scores.

Cost: one pass over each candidate, then one batched pass of all anchors on top of the candidate's KV
cache (the candidate is encoded once and its cache reused across the anchors): about
``candidates x anchors x anchor length`` forward tokens, printed before the run starts. On a 2-core CPU that
is hours for thousands of candidates; ``nuggets_candidates`` scores a seeded sub-sample instead (records
outside it are not selected unless the budget needs them).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field

from ...cache import stable_hash
from ...data import Encoded, PromptFormatter, encode_records, load_records
from ...options import option
from ...passes import collate, model_pass
from ..score import ScoreConfig, batched_values, response_loss_batch
from .base import STRATEGIES, SelectionContext, Strategy, top_k

log = logging.getLogger(__name__)


@torch.no_grad()
def one_shot_losses(model: Any, demonstration: Encoded, anchors: Sequence[Encoded], pad_id: int,
                    chunk_rows: int = 128) -> np.ndarray:
    """Mean response loss of each anchor with ``demonstration`` before it; the demonstration's KV cache
    is computed once and shared by every anchor row."""
    device = next(model.parameters()).device
    prefix = torch.tensor([demonstration.input_ids], device=device)
    cache = model.get_decoder()(input_ids=prefix, use_cache=True).past_key_values
    cache.batch_repeat_interleave(len(anchors))
    ids, attention, predicts_response, targets = collate(anchors, pad_id)
    full_attention = torch.cat([torch.ones(len(anchors), prefix.shape[1], dtype=attention.dtype), attention], 1)
    hidden, logits_of = model_pass(model, ids, full_attention, predicts_response, past_key_values=cache,
                                   use_cache=True)
    targets = targets.to(device)
    nll = torch.empty(hidden.shape[0], dtype=torch.float32, device=device)
    for start in range(0, hidden.shape[0], chunk_rows):
        sl = slice(start, start + chunk_rows)
        nll[sl] = torch.nn.functional.cross_entropy(logits_of(sl).float(), targets[sl], reduction="none")
    counts = predicts_response.sum(1)
    segment = torch.repeat_interleave(torch.arange(len(anchors)), counts).to(device)
    sums = torch.zeros(len(anchors), dtype=torch.float64, device=device).index_add_(0, segment, nll.double())
    return (sums / counts.to(device).clamp_min(1)).cpu().numpy()


def nuggets_scores(model: Any, candidates: Sequence[Encoded], anchors: Sequence[Encoded], pad_id: int,
                   cache_file: Any = None, progress: bool = True) -> np.ndarray:
    """Per candidate: the fraction of anchors whose response loss drops with it as a one-shot demo."""
    zero_shot = response_loss_batch(model, anchors, pad_id)

    def batch(items: Sequence[Encoded]) -> tuple[np.ndarray]:
        return (np.array([np.mean(one_shot_losses(model, c, anchors, pad_id) < zero_shot) for c in items]),)

    return batched_values(candidates, batch, ("nuggets",), ScoreConfig(batch_size=8), cache_file, "nuggets",
                          progress)["nuggets"]


@dataclass
class NuggetsOptions:
    anchors: Annotated[int, Field(ge=1)] = option(32, "nuggets: anchor records sampled from the data with the seed.")
    anchor_data: str | None = option(None, "nuggets: take the anchors from this data instead.")
    nuggets_candidates: Annotated[int, Field(ge=1)] | None = option(
        None, "nuggets: score only a seeded sub-sample of N candidates (its cost is candidates x anchors passes).")


@STRATEGIES.register("nuggets")
class Nuggets(Strategy):
    options = NuggetsOptions
    description = "one-shot learning value against a fixed anchor set (O(candidates x anchors) passes)"

    def select(self, ctx: SelectionContext) -> tuple[list[int], dict]:
        config = ctx.config
        rng = np.random.default_rng(config.seed)
        n = len(ctx.records)
        if config.anchor_data:
            formatter = PromptFormatter(ctx.tokenizer, template=config.template, max_length=config.max_length)
            _, anchors = encode_records(formatter, load_records(config.anchor_data, bad_records="skip"), "skip")
            anchor_positions: list[int] = []
        else:
            anchor_positions = sorted(int(i) for i in rng.choice(n, size=min(config.anchors, n), replace=False))
            anchors = [ctx.encoded[i] for i in anchor_positions]
        taken = set(anchor_positions)
        others = [i for i in range(n) if i not in taken]
        if config.nuggets_candidates and config.nuggets_candidates < len(others):
            candidates = sorted(int(i) for i in rng.choice(others, size=config.nuggets_candidates, replace=False))
        else:
            candidates = others
        anchor_tokens = sum(len(a.input_ids) for a in anchors)
        passes = len(candidates) * len(anchors)
        tokens = sum(len(ctx.encoded[i].input_ids) for i in candidates) + len(candidates) * anchor_tokens
        log.warning("nuggets: %d candidates x %d anchors = %d one-shot evaluations, about %.2fM forward tokens",
                    len(candidates), len(anchors), passes, tokens / 1e6)
        ctx.cost["model_forward_tokens"] += tokens
        model = ctx.model("pruned")
        key = stable_hash("nuggets-v1", ctx.model_key("pruned"), [a.input_ids for a in anchors],
                          [ctx.encoded[i].input_ids for i in candidates], ctx.dtype)
        scores = np.full(n, np.nan)
        scores[candidates] = nuggets_scores(model, [ctx.encoded[i] for i in candidates], anchors,
                                            ctx.tokenizer.pad_token_id, ctx.cache / "nuggets" / f"{key}.parquet")
        ctx.table["nuggets"] = scores
        ctx.table["score"] = scores
        return top_k(scores, ctx.budget, ~np.isnan(scores)), {
            "score": "share of anchors whose response loss drops with the record as a one-shot demonstration",
            "anchors": len(anchors), "anchor_source": config.anchor_data or "pool (seeded sample)",
            "candidates_scored": len(candidates), "one_shot_evaluations": passes}
