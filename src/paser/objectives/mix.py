"""``mix``: ``kd_alpha * KD + (1 - kd_alpha) * NLL`` (distillation from the original beside the targets)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import Field

from ..options import option
from .base import OBJECTIVES, Objective


@dataclass
class MixOptions:
    kd_alpha: Annotated[float, Field(ge=0, le=1)] = option(0.5, "mix: alpha * kd + (1 - alpha) * nll.")


@OBJECTIVES.register("mix")
class Mix(Objective):
    """Half NLL, half KD (--kd-alpha)."""
    terms = frozenset({"kd", "nll"})
    options = MixOptions

    def loss(self, terms: dict[str, torch.Tensor], config: Any) -> torch.Tensor:
        return config.kd_alpha * terms["kd"] + (1 - config.kd_alpha) * terms["nll"]
