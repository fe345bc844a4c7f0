"""``blockwise+kd``: blockwise reconstruction (:mod:`paser.recovery.blockwise`), then end-to-end training of its
result under the objective (``loss``; ``auto`` is KD from the original) with the adapter and rate of
``end-to-end``. Each stage resumes on its own: the blocks from ``OUT/stage-blockwise/blockwise`` (whose
``merged`` is the second stage's model), the Trainer from ``OUT/checkpoints``.

Recipe::

    paser recover PRUNED --data selected.jsonl --out runs/bw-kd --method blockwise+kd
    # paser run:  recover: {method: blockwise+kd}
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..cache import write_json
from .base import RECOVERY_METHODS, RecoveryMethod
from .blockwise import Blockwise
from .end_to_end import EndToEnd


@RECOVERY_METHODS.register("blockwise+kd")
class BlockwiseThenKD(RecoveryMethod):
    """Blockwise, then end-to-end training on its result (both stages resumable)."""
    needs_original = True
    objective = True  # the second stage trains under ``loss``

    def declared_reads(self) -> frozenset[str]:
        return Blockwise().declared_reads() | EndToEnd().declared_reads()

    def fields_read(self, config: Any) -> frozenset[str]:
        return Blockwise().fields_read(config) | EndToEnd().fields_read(config)

    def need(self, config: Any) -> Any:
        """The larger of its two stages' (they run one after the other)."""
        blocks, kd = Blockwise().need(config), EndToEnd().need(config)
        larger = max(blocks, kd, key=lambda n: n.total)
        return type(larger)("blockwise+kd", larger.parts, stage=larger.method)

    def run(self, config: Any, callbacks: Sequence[Any] = ()) -> dict:
        out = Path(config.out)
        first = Blockwise().run(replace(config, out=out / "stage-blockwise"), callbacks)
        second = EndToEnd().run(replace(config, model=str(out / "stage-blockwise" / "merged")), callbacks)
        train_log = {**second, "method": "blockwise+kd", "blockwise": first,
                     "targets": first["targets"],  # both steps train on them; the first generated them
                     "seconds": round(first["seconds"] + second["seconds"], 2),
                     "trained_tokens": first["trained_tokens"] + second["trained_tokens"],
                     "peak_memory_gb": max(first["peak_memory_gb"], second["peak_memory_gb"])}
        write_json(out / "train_log.json", train_log)
        return train_log
