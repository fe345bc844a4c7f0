"""Recovery: every module that turns a pruned model back toward its original.

- methods, registered peers (:mod:`.base`): ``end-to-end`` (:mod:`.end_to_end`), ``blockwise`` (:mod:`.blockwise`),
  ``blockwise+kd`` (:mod:`.blockwise_kd`) and ``auto`` (:mod:`.auto`), plus any a package registers through the
  ``paser.recovery`` entry point;
- what they train on (:mod:`.data`), the Trainer of every objective (:mod:`.trainer`), masked LoRA (:mod:`.adapters`);
- the settings (:mod:`.config`), what each recovery reads (:mod:`.reads`), the ``auto`` policy (:mod:`.policy`) and
  the stage's entry point (:func:`run_recovery`).
"""

from .base import RECOVERY_METHODS, RecoveryMethod
from . import end_to_end  # noqa: F401  (registration, in this order)
from . import blockwise  # noqa: F401
from . import blockwise_kd  # noqa: F401
from . import auto  # noqa: F401

RECOVERY_METHODS.load_plugins()  # before RecoverConfig joins every method's options

from .config import RecoverBase, RecoverConfig, recover_options_owners  # noqa: E402
from .policy import DEFAULT_LR, Resolution, choose_method, recorded_original, resolve_recovery  # noqa: E402
from .reads import check_options_read, fields_read, readers  # noqa: E402
from .run import run_recovery  # noqa: E402

__all__ = ["DEFAULT_LR", "RECOVERY_METHODS", "RecoverBase", "RecoverConfig", "RecoveryMethod", "Resolution",
           "check_options_read", "choose_method", "fields_read", "readers", "recorded_original",
           "recover_options_owners", "resolve_recovery", "run_recovery"]
