"""What a recovery method is, and the registry they join.

A recovery method takes a pruned model and training records and writes a recovered model to ``OUT/merged`` and
its ``OUT/train_log.json``: ``end-to-end`` (the Trainer over the whole model: masked LoRA or every weight, any
objective and targets), ``blockwise`` (each decoder block in turn toward the original block's output, one block
resident), ``blockwise+kd`` (the two in sequence). It receives the whole, validated recovery config with the
original filled in and ``loss: auto`` resolved, and reads the fields it needs.

A new method is one module in this package plus its import in ``__init__``; its settings are a dataclass in
``options`` (``RecoverConfig`` fields and ``paser recover`` options; ``paser run``'s ``recover:`` section)::

    @dataclass
    class MyOptions:
        my_steps: int = option(100, "my-method: optimizer steps.")        # paser recover --method my-method --my-steps 50

    @RECOVERY_METHODS.register("my-method")
    class MyMethod(RecoveryMethod):
        options = MyOptions
        def run(self, config, callbacks=()): ...   # write config.out/merged and config.out/train_log.json
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

from ..registry import Registry


class RecoveryMethod:
    """``version`` enters the recovery's stage hash; ``needs_original``: it reads the original model whatever the
    objective (``teacher``, filled in from the model ``paser prune`` recorded when not given)."""

    name = "base"
    version = 1
    needs_original = False
    options: ClassVar[type | None] = None

    def option_fields(self) -> frozenset[str]:
        """The declared options this method reads (its stage hash holds these and no other method's)."""
        return frozenset(f.name for f in dataclasses.fields(self.options)) if self.options else frozenset()

    def validate(self, config: Any) -> None:
        """Checks of this method's settings beyond their declared types and bounds (before any model loads)."""

    def run(self, config: Any, callbacks: Sequence[Any] = ()) -> dict:
        """Recover ``config.model`` on ``config.data`` into ``config.out``; returns the train log."""
        raise NotImplementedError


RECOVERY_METHODS: Registry[RecoveryMethod] = Registry("recovery method")
