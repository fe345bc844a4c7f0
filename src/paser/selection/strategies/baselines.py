"""Baselines that look at no model: ``random`` (seeded) and ``full`` (every record)."""

from __future__ import annotations

import numpy as np

from .base import STRATEGIES, SelectionContext, Strategy


@STRATEGIES.register("random")
class Random(Strategy):
    description = "a seeded uniform sample of the budget; loads no model"

    def select(self, ctx: SelectionContext) -> tuple[list[int], dict]:
        rng = np.random.default_rng(ctx.config.seed)
        return [int(i) for i in rng.choice(len(ctx.records), size=ctx.budget, replace=False)], {}


@STRATEGIES.register("full")
class Full(Strategy):
    description = "every record (the reference the paper trains on)"

    def select(self, ctx: SelectionContext) -> tuple[list[int], dict]:
        return list(range(len(ctx.records))), {}
