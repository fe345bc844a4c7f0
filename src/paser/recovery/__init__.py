"""Recovery methods as registered objects (:mod:`paser.recovery.base`): ``end-to-end``, ``blockwise``,
``blockwise+kd``, and ``auto`` (the default), which picks one of them."""

from . import end_to_end  # noqa: F401  (registration, in this order)
from . import blockwise  # noqa: F401
from . import stacked  # noqa: F401
from . import auto  # noqa: F401
from .auto import choose_method
from .base import RECOVERY_METHODS, RecoveryMethod

__all__ = ["RECOVERY_METHODS", "RecoveryMethod", "choose_method"]
