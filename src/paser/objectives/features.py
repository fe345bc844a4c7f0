"""``kd-features``: logit distillation plus SquareHead's per-layer feature distillation (Kurtic et al. 2023,
arXiv 2310.06927): ``KD + feature_weight * features``, where ``features`` is the mean over decoder layers of the
mean-squared error between the student's and the original's hidden states (each layer's output), each divided by
the variance of the original's (so every layer weighs alike, whatever its scale), at the positions KD reads
(``kd_positions``). Needs the original running beside the student (no stored top-k teacher)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import Field

from ..options import option
from .base import OBJECTIVES, Objective


@dataclass
class FeatureOptions:
    feature_weight: Annotated[float, Field(ge=0)] = option(1.0, "kd-features: the weight of the hidden-state loss.")


@OBJECTIVES.register("kd-features")
class KDFeatures(Objective):
    """KD plus every layer's hidden-state loss against the original (SquareHead)."""
    terms = frozenset({"kd", "features"})
    options = FeatureOptions

    def loss(self, terms: dict[str, torch.Tensor], config: Any) -> torch.Tensor:
        return terms["kd"] + config.feature_weight * terms["features"]
