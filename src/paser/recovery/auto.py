"""``auto`` (the default): ``blockwise+kd`` wherever it applies, else ``end-to-end``, the choice and its reason
logged and written to the train log.

Block-wise reconstruction against the original, then the end-to-end KD, removed 1.3-1.7x the KL pruning added that
end-to-end KD alone did, at equal tokens, on every testbed and seed measured (Wanda 50% at 20% and 5% of the
tokens, 2:4 at 20%; seeds 0-2), in 2.3-3.1x its time (docs/recovery.md). It needs what
end-to-end does not: the original model (``--teacher``, or the one ``paser prune`` recorded) and an objective that
distils from it (``loss`` kd, mix, kd-features, rho: NLL on the records' answers stays end-to-end), a Llama-family
decoder (:data:`paser.recovery.blockwise.SUPPORTED`) whose pruned blocks keep the original's shapes (unstructured
or N:M pruning, not structured), and one process (block-wise training is sequential; under ``accelerate launch``
/ ``torchrun`` the processes share end-to-end's batches).

Recipe::

    paser recover PRUNED --data selected.jsonl --out runs/rec          # --method auto
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from .. import distributed
from ..cache import write_json
from ..objectives import OBJECTIVES
from .base import RECOVERY_METHODS, RecoveryMethod
from .blockwise import blockwise_unsupported

log = logging.getLogger(__name__)


def choose_method(model: str, original: str | None, loss: str, fsdp: bool = False) -> tuple[str, str]:
    """``(method, reason)``: ``blockwise+kd`` where it applies to this pruned model, original and objective, else
    ``end-to-end``."""
    if original is None:
        return "end-to-end", "no original model known (--teacher), nothing to reconstruct toward"
    if not OBJECTIVES.get(loss).needs_teacher:
        return "end-to-end", f"loss {loss} trains on the records' answers, not toward the original"
    if fsdp or distributed.world_size() > 1:
        return "end-to-end", "several processes: block-wise training runs in one"
    unsupported = blockwise_unsupported(model, original)
    if unsupported:
        return "end-to-end", unsupported
    return "blockwise+kd", "the original is known and the blocks keep its shapes"


@RECOVERY_METHODS.register("auto")
class Auto(RecoveryMethod):
    """Blockwise+kd where the original is known, the loss distils from it and the blocks keep its shapes; else
    end-to-end (the choice and its reason logged and in the train log)."""
    description = ("blockwise+kd where the original is known, the loss distils from it and the blocks keep its "
                   "shapes; else end-to-end")
    needs_original = True  # the recorded original is filled in where known: what decides between the two

    def option_fields(self) -> frozenset[str]:
        return frozenset().union(*(method.option_fields() for name, method in RECOVERY_METHODS.items() if name != "auto"))

    def run(self, config: Any, callbacks: Sequence[Any] = ()) -> dict:
        method, reason = choose_method(config.model, config.teacher, config.loss, config.fsdp)
        log.info("method auto: %s (%s)", method, reason)
        train_log = RECOVERY_METHODS.get(method).run(replace(config, method=method), callbacks)
        train_log = {**train_log, "method_auto": {"chosen": method, "reason": reason}}
        write_json(Path(config.out) / "train_log.json", train_log)
        return train_log
