"""``mix``: ``kd_alpha * KD + (1 - kd_alpha) * NLL`` (distillation from the original beside the targets)."""

from __future__ import annotations

from typing import Any

import torch

from .base import OBJECTIVES, Objective


@OBJECTIVES.register("mix")
class Mix(Objective):
    needs_teacher = True

    def loss(self, terms: dict[str, torch.Tensor], config: Any) -> torch.Tensor:
        return config.kd_alpha * terms["kd"] + (1 - config.kd_alpha) * terms["nll"]
