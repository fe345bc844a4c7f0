"""Recovery objectives as registered objects (:mod:`paser.objectives.base`): ``nll``, ``kd``, ``mix``, ``rho``,
``kd-features``."""

from . import nll  # noqa: F401  (registration, in this order)
from . import kd  # noqa: F401
from . import mix  # noqa: F401
from . import rho  # noqa: F401
from . import features  # noqa: F401
from .base import OBJECTIVES, Objective

__all__ = ["OBJECTIVES", "Objective"]
