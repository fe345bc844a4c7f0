"""``kd``: forward KL from the original model (the teacher) to the student at response positions
(``kd_positions all``: every real position), at temperature ``kd_temperature`` and scaled by T^2."""

from __future__ import annotations

from typing import Any

import torch

from .base import OBJECTIVES, Objective


@OBJECTIVES.register("kd")
class KD(Objective):
    """Distil the teacher's next-token distributions."""
    terms = frozenset({"kd"})

    def loss(self, terms: dict[str, torch.Tensor], config: Any) -> torch.Tensor:
        return terms["kd"]
