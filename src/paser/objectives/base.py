"""What a recovery objective is, and the registry they join.

An objective turns the loss terms of a micro-batch into the loss the optimizer follows. It declares the terms it
reads (``terms``); the trainer (:class:`paser.recovery.trainer.RecoveryTrainer`, the one training path of every objective)
computes those and no others, and logs each beside the loss. The terms:

- ``nll``: the student's mean cross-entropy on the response tokens (alone, token-weighted over the optimizer step,
  as the stock Trainer's loss);
- ``token_nll``: the same per response token (batch order);
- ``kd``: forward KL from the original model (the teacher) to the student (:mod:`paser.recovery.trainer`);
- ``teacher_token_nll``: the teacher's cross-entropy per response token;
- ``features``: SquareHead's per-layer hidden-state loss against the teacher (:func:`paser.recovery.trainer.feature_loss`).

A term other than the student's own (``TEACHER_TERMS``) needs the original model. Full-parameter vs LoRA is an
adapter choice beside it (``RecoverConfig.adapter``).

What an objective reads is declared once: the terms it asks for (each term's settings, :data:`TERM_READS`), its
own ``options`` and any other shared field in ``reads``; an option none of them declares is refused when given.

A new objective is one module in this package plus its import in ``__init__`` (or, from another package, the
``paser.objectives`` entry point); its settings, if any, are a dataclass in ``options`` (they become
``RecoverConfig`` fields and ``paser recover`` options)::

    @dataclass
    class ScaledKDOptions:
        scaled_kd_weight: float = option(1.0, "scaled-kd: the loss weight.")   # paser recover --scaled-kd-weight

    @OBJECTIVES.register("scaled-kd")
    class ScaledKD(Objective):
        terms = frozenset({"kd"})
        options = ScaledKDOptions
        def loss(self, terms, config): return config.scaled_kd_weight * terms["kd"]
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

from ..registry import Registry

TERMS = frozenset({"nll", "token_nll", "kd", "teacher_token_nll", "features"})
TEACHER_TERMS = frozenset({"kd", "teacher_token_nll", "features"})
LIVE_TEACHER_TERMS = frozenset({"features"})  # the stored top-k teacher cannot give them
_TEACHER = frozenset({"teacher", "teacher_cache", "teacher_topk"})
TERM_READS = {  # the recovery settings each term is computed under (paser.recovery.trainer)
    "nll": frozenset(), "token_nll": frozenset(),
    "kd": _TEACHER | {"kd_temperature", "kd_positions"},
    "teacher_token_nll": _TEACHER,
    "features": frozenset({"teacher", "kd_positions"}),
}


class Objective:
    """A recovery loss over the ``terms`` it declares; ``version`` enters the recovery's checkpoint key."""

    name = "base"
    terms: ClassVar[frozenset[str]] = frozenset({"nll"})
    version = 1
    options: ClassVar[type | None] = None  # a dataclass of its settings (fields of RecoverConfig, paser.options.option)
    reads: ClassVar[frozenset[str]] = frozenset()  # other shared settings its loss() reads

    def declared_reads(self) -> frozenset[str]:
        """The recovery settings this objective reads: its terms', its options and ``reads``."""
        options = frozenset(f.name for f in dataclasses.fields(self.options)) if self.options else frozenset()
        return frozenset().union(*(TERM_READS[t] for t in self.terms)) | options | self.reads

    @property
    def needs_teacher(self) -> bool:
        return bool(self.terms & TEACHER_TERMS)

    @property
    def needs_live_teacher(self) -> bool:
        return bool(self.terms & LIVE_TEACHER_TERMS)

    def loss(self, terms: dict[str, torch.Tensor], config: Any) -> torch.Tensor:
        """The loss from the declared terms and the recovery settings."""
        raise NotImplementedError


class _Objectives(Registry[Objective]):
    def register(self, name: str) -> Any:
        add = super().register(name)

        def checked(obj: Any) -> Any:
            unknown = set(obj.terms) - TERMS
            if unknown:
                raise ValueError(f"objective '{name}' declares unknown terms {sorted(unknown)}; known: {sorted(TERMS)}")
            return add(obj)

        return checked


OBJECTIVES: Registry[Objective] = _Objectives("recovery objective", "paser.objectives")
