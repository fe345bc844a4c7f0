"""``reference``: the data set's own answers (what paser trained on before self-distilled targets)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..data import Record
from .base import TARGETS, Target


@TARGETS.register("reference")
class Reference(Target):
    """The data's answers."""
    def build(self, records: Sequence[Record], settings: Any, tokenizer: Any, dtype: str
              ) -> tuple[list[Record], dict[str, Any]]:
        return list(records), {"targets": "reference"}
