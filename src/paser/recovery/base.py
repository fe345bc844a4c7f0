"""What a recovery method is, and the registry they join.

A recovery method takes a pruned model and training records and writes a recovered model to ``OUT/merged`` and
its ``OUT/train_log.json``: ``end-to-end`` (the Trainer over the whole model: masked LoRA or every weight, any
objective and targets), ``blockwise`` (each decoder block in turn toward the original block's output, one block
resident), ``blockwise+kd`` (the two in sequence). It receives the whole, validated recovery config with ``auto``
resolved (:mod:`paser.recovery.policy`: method, loss, learning rate, the original) and reads the fields it declares.

**What a method reads is declared once**: its own options (a dataclass in ``options``: ``RecoverConfig`` fields,
``paser recover`` options, keys of ``paser run``'s ``recover:`` section) and the shared ``RecoverConfig`` fields it
uses (``reads``). From that declaration come the error for an option given to a method that does not read it, the
method's resume key and ``paser run``'s stage hash (:func:`paser.recovery.config.fields_read`): a field left out of
``reads`` is refused when given and never reruns the method, so declare every field ``run`` looks at.

A new method is one module (in this package plus its import in ``__init__``, or in any package, registered through
the ``paser.recovery`` entry point: CONTRIBUTING.md)::

    @dataclass
    class MyOptions:
        my_steps: int = option(100, "my-method: optimizer steps.")        # paser recover --method my-method --my-steps 50

    @RECOVERY_METHODS.register("my-method")
    class MyMethod(RecoveryMethod):
        options = MyOptions
        reads = frozenset({"seed", "teacher"})   # the shared fields run() uses, beside its options
        def run(self, config, callbacks=()): ...   # write config.out/merged and config.out/train_log.json
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

from ..registry import Registry


def option_names(options: type | None) -> frozenset[str]:
    """The field names of an ``options`` dataclass (none for None)."""
    return frozenset(f.name for f in dataclasses.fields(options)) if options else frozenset()


class RecoveryMethod:
    """``version`` enters the recovery's stage hash; ``needs_original``: it reads the original model whatever the
    objective (``teacher``, filled in from the model ``paser prune`` recorded when not given); ``objective``: it
    trains under ``loss`` (so the objective's own reads are its reads too); ``reads``: the shared fields it uses."""

    name = "base"
    version = 1
    needs_original = False
    objective = False
    options: ClassVar[type | None] = None
    reads: ClassVar[frozenset[str]] = frozenset()

    def declared_reads(self) -> frozenset[str]:
        """Every field this method may read: its options and ``reads`` (whatever the other settings)."""
        return option_names(self.options) | self.reads

    def fields_read(self, config: Any) -> frozenset[str]:
        """The fields it reads under ``config`` (a method whose reads depend on a setting narrows them here)."""
        return self.declared_reads()

    def need(self, config: Any) -> Any:
        """What it needs in memory for ``config`` (a :class:`paser.recovery.memory.Need`), from the models' configs
        alone; None: not stated (nothing is checked before it runs)."""
        return None

    def validate(self, config: Any) -> None:
        """Checks of this method's settings beyond their declared types and bounds (before any model loads)."""

    def run(self, config: Any, callbacks: Sequence[Any] = ()) -> dict:
        """Recover ``config.model`` on ``config.data`` into ``config.out``; returns the train log."""
        raise NotImplementedError


RECOVERY_METHODS: Registry[RecoveryMethod] = Registry("recovery method", "paser.recovery")
