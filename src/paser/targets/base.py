"""What a training target is, and the registry they join.

A target decides what recovery trains each selected prompt toward: ``reference`` (the data set's own answer)
or ``original`` (the original model's own answer to the prompt, generated once and cached). ``build`` returns
the records with their ``output`` replaced and a JSON summary of what it did and cost (``train_log.json``).

A new target is one module in this package plus its import in ``__init__`` (or, from another package, the
``paser.targets`` entry point); what ``build`` reads is declared once (``options`` and ``reads``); its settings, if any, are a
dataclass in ``options`` (``RecoverConfig`` fields and ``paser recover`` options, as ``original``'s are)::

    @TARGETS.register("my_target")
    class MyTarget(Target):
        def build(self, records, settings, tokenizer, dtype): return records, {"targets": "my_target"}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, ClassVar

from ..data import Record
from ..registry import Registry


class Target:
    """Training targets for selected prompts. ``needs_original``: it reads the original model (``teacher`` in
    the recovery settings, or the model ``paser prune`` recorded); ``version`` enters the recovery's cache key."""

    name = "base"
    needs_original = False
    keeps_answers = True  # False: the answers (and so the training tokens) differ from the selected records'
    version = 1
    options: ClassVar[type | None] = None  # a dataclass of its settings (fields of RecoverConfig, paser.options.option)
    reads: ClassVar[frozenset[str]] = frozenset()  # other shared recovery settings build() reads

    def declared_reads(self) -> frozenset[str]:
        """The recovery settings this target reads: its options and ``reads``."""
        options = frozenset(f.name for f in dataclasses.fields(self.options)) if self.options else frozenset()
        return options | self.reads

    def build(self, records: Sequence[Record], settings: Any, tokenizer: Any, dtype: str
              ) -> tuple[list[Record], dict[str, Any]]:
        raise NotImplementedError


TARGETS: Registry[Target] = Registry("training target", "paser.targets")
