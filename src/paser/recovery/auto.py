"""``auto`` (the default): ``blockwise+kd`` wherever it applies, else ``end-to-end`` with a WARNING that says why
and what would allow it; the choice and its reason are written to the train log (``resolved``).

Block-wise reconstruction against the original, then the end-to-end KD, removed 1.3-1.7x the KL pruning added that
end-to-end KD alone did, at equal tokens, on every testbed and seed measured (Wanda 50% at 20% and 5% of the
tokens, 2:4 at 20%; seeds 0-2), in 2.3-3.1x its time (docs/recovery.md). It needs what
end-to-end does not: the original model (``--teacher``, or the one ``paser prune`` recorded) and an objective that
distils from it (``loss`` kd, mix, kd-features, rho: NLL on the records' answers stays end-to-end), a decoder family
whose block-by-block forward is tested (:data:`paser.recovery.layers.PARITY_TESTED`) with pruned blocks of the
original's shapes (unstructured or N:M pruning, not structured), and no ``--fsdp`` (under ``accelerate launch`` /
``torchrun`` block-wise runs data-parallel inside each block, the KD stage under the launcher). The choice is made by
:func:`paser.recovery.policy.resolve_recovery`, the one place the policy lives.

Recipe::

    paser recover PRUNED --data selected.jsonl --out runs/rec          # --method auto
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from .base import RECOVERY_METHODS, RecoveryMethod


@RECOVERY_METHODS.register("auto")
class Auto(RecoveryMethod):
    """Blockwise+kd where the original is known, the loss distils from it and the blocks keep its shapes; else
    end-to-end (the choice and its reason logged and in the train log)."""
    description = ("blockwise+kd where the original is known, the loss distils from it and the blocks keep its "
                   "shapes; else end-to-end, with a warning that says why")
    needs_original = True  # the recorded original is filled in where known: what decides between the two
    objective = True

    def declared_reads(self) -> frozenset[str]:
        return frozenset().union(*(m.declared_reads() for name, m in RECOVERY_METHODS.items() if name != self.name))

    def run(self, config: Any, callbacks: Sequence[Any] = ()) -> dict:
        from .policy import resolve_recovery  # the policy reads the methods registered beside this one

        resolved = resolve_recovery(config).config
        return RECOVERY_METHODS.get(resolved.method).run(resolved, callbacks)
