"""``rho``: Rho-1-style selective language modelling (Lin et al. 2024, arXiv 2404.07965) against the original.

Of each micro-batch's response tokens, train only on the share ``keep`` (60%, Rho-1's) where the student's loss
exceeds the original model's the most: the tokens pruning damaged, not the ones the original could not predict
either. The excess is ``NLL_student - NLL_original`` per token (the original runs live, or from its stored top-k
with the reference token's log-probability); the loss is the mean NLL over the kept tokens. A token-level
counterpart of record selection: the budget is spent inside each record, on its damaged tokens.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .base import OBJECTIVES, Objective


@OBJECTIVES.register("rho")
class Rho(Objective):
    """Rho-1: NLL on the 60% of tokens the student lost most against the original."""
    terms = frozenset({"token_nll", "teacher_token_nll"})
    keep = 0.6  # share of the response tokens trained on

    def loss(self, terms: dict[str, torch.Tensor], config: Any) -> torch.Tensor:
        token_nll = terms["token_nll"]
        excess = (token_nll - terms["teacher_token_nll"].to(token_nll.device)).detach()
        kept = excess.topk(max(1, math.ceil(self.keep * excess.numel()))).indices
        return token_nll[kept].mean()
