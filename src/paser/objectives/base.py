"""What a recovery objective is, and the registry they join.

An objective turns the per-micro-batch loss terms into the loss the optimizer follows: ``nll`` (the
reference answers' cross-entropy), ``kd`` (forward KL from the original model, the teacher) or any mix.
It declares whether it needs the teacher; the trainer computes only the terms asked for and logs each.
Full-parameter vs LoRA is an adapter choice beside it (``RecoverConfig.adapter``).

A new objective is one module in this package plus its import in ``__init__``; its settings, if any, are a
dataclass in ``options`` (they become ``RecoverConfig`` fields and ``paser recover`` options)::

    @dataclass
    class ReverseKDOptions:
        reverse_kd_weight: float = option(1.0, "reverse_kd: the loss weight.")   # paser recover --reverse-kd-weight

    @OBJECTIVES.register("reverse_kd")
    class ReverseKD(Objective):
        needs_teacher = True
        options = ReverseKDOptions
        def loss(self, terms, config): return config.reverse_kd_weight * terms["kd"]
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from ..registry import Registry


class Objective:
    """A recovery loss. ``needs_teacher``: the original model's next-token distributions are computed (live or
    from its stored top-k); ``version`` enters the recovery's checkpoint key."""

    name = "base"
    needs_teacher = False
    version = 1
    options: ClassVar[type | None] = None  # a dataclass of its settings (fields of RecoverConfig, paser.options.option)

    def loss(self, terms: dict[str, torch.Tensor], config: Any) -> torch.Tensor:
        """The loss from the terms and the recovery settings. Terms: ``nll`` (mean over response tokens); with a
        teacher also ``kd``, and per response token ``token_nll`` (the student's) and ``teacher_token_nll``."""
        raise NotImplementedError


OBJECTIVES: Registry[Objective] = Registry("recovery objective")
