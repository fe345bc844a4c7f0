"""Training targets as registered objects (:mod:`paser.targets.base`): ``reference``, ``original``."""

from . import reference  # noqa: F401  (registration, in this order)
from . import original  # noqa: F401
from .base import TARGETS, Target

__all__ = ["TARGETS", "Target"]
