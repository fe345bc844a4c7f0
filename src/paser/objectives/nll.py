"""``nll``: cross-entropy of the training targets' response tokens (the stock Trainer's loss)."""

from __future__ import annotations

from typing import Any

import torch

from .base import OBJECTIVES, Objective


@OBJECTIVES.register("nll")
class NLL(Objective):
    """The targets' answers, next-token NLL."""
    def loss(self, terms: dict[str, torch.Tensor], config: Any) -> torch.Tensor:
        return terms["nll"]
