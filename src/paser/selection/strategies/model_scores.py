"""Global top-B baselines from per-record model scores: ``perplexity``, ``loss_gap`` and ``ifd``.

- ``perplexity``: the pruned model's mean response loss, highest first (what the pruned model finds
  hardest).
- ``loss_gap``: the pruned minus the original model's response loss, highest first (what pruning made
  harder; one pass of each model, shared with PASER's JSD scores).
- ``ifd``: Instruction-Following Difficulty (Li et al., "From Quantity to Quality", NAACL 2024):
  IFD = loss(response | instruction) / loss(response alone), under the pruned model by default
  (``ifd_model``). Records with IFD >= 1 (the instruction does not help predict the response) are
  left out unless the budget cannot be met without them; the highest IFD is taken first. "Alone" means
  the response after a single BOS token (EOS where the tokenizer has no BOS), so both losses cover the
  same response tokens.
"""

from __future__ import annotations

import numpy as np

from ...data import Encoded
from .base import STRATEGIES, SelectionContext, Strategy, top_k


@STRATEGIES.register("perplexity")
class Perplexity(Strategy):
    description = "the pruned model's response loss, highest first"

    def select(self, ctx: SelectionContext) -> tuple[list[int], dict]:
        loss = ctx.response_losses("pruned")
        ctx.table["loss_pruned"] = loss
        ctx.table["score"] = loss
        return top_k(loss, ctx.budget), {"score": "pruned response loss (nats/token)"}


@STRATEGIES.register("loss_gap")
class LossGap(Strategy):
    description = "pruned minus original response loss, highest first"

    def select(self, ctx: SelectionContext) -> tuple[list[int], dict]:
        table = ctx.pair_scores()
        gap = table["loss_pruned"].to_numpy(np.float64) - table["loss_original"].to_numpy(np.float64)
        ctx.table["score"] = gap
        return top_k(gap, ctx.budget), {"score": "pruned - original response loss (nats/token)"}


def response_alone(encoded: Encoded, start_id: int) -> Encoded:
    """The response with only a start token before it: IFD's unconditioned pass."""
    return Encoded([start_id], list(encoded.response_ids), encoded.truncated)


def ifd_scores(ctx: SelectionContext, which: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(IFD, conditioned loss, unconditioned loss) per record under model ``which``."""
    tokenizer = ctx.tokenizer
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    conditioned = ctx.response_losses(which)
    alone = ctx.response_losses(which, [response_alone(e, start) for e in ctx.encoded], tag=f"alone-{start}")
    return conditioned / np.maximum(alone, 1e-8), conditioned, alone


@STRATEGIES.register("ifd")
class IFD(Strategy):
    description = "Instruction-Following Difficulty (Cherry LLM): keep IFD < 1, highest first"

    def select(self, ctx: SelectionContext) -> tuple[list[int], dict]:
        which = ctx.config.ifd_model
        ifd, conditioned, alone = ifd_scores(ctx, which)
        ctx.table["ifd"] = ifd
        ctx.table["score"] = ifd
        eligible = ifd < 1.0
        chosen = top_k(ifd, ctx.budget, eligible)
        admitted = int(sum(not eligible[i] for i in chosen))
        return chosen, {"score": f"IFD under the {which} model", "ifd_model": which,
                        "ifd_below_1": int(eligible.sum()), "admitted_with_ifd_at_least_1": admitted,
                        "ifd": {"mean": float(np.mean(ifd)), "median": float(np.median(ifd))}}
