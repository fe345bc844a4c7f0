"""``run_recovery``: validate the settings, resolve the policy once (:mod:`paser.recovery.policy`), refuse an
option nothing chosen reads (:mod:`paser.recovery.reads`), run the method, record what was resolved.

Every method writes ``OUT/merged`` (a plain model directory that keeps every pruned zero) and
``OUT/train_log.json``; this adds ``resolved`` to the latter (each ``auto`` choice with its reason, and the
warnings a default that could not apply raised).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .. import distributed
from ..cache import write_json
from .base import RECOVERY_METHODS
from .policy import resolve_recovery
from .reads import check_options_read, given_options


def run_recovery(config: Any, callbacks: Sequence[Any] = ()) -> dict:
    """Recover ``config.model`` on ``config.data`` into ``config.out``; returns the train log."""
    config.validate()
    resolution = resolve_recovery(config)
    check_options_read(given_options(config), resolution.config, resolution.why("method"))
    method = RECOVERY_METHODS.get(resolution.config.method)
    method.validate(resolution.config)
    train_log = {**method.run(resolution.config, callbacks), "resolved": resolution.record()}
    if distributed.is_main():
        write_json(Path(config.out) / "train_log.json", train_log)
    return train_log
