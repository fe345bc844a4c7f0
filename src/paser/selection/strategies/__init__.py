"""Selection strategies, one module per family, each registered by name (see :mod:`.base`).

- :mod:`.baselines`: ``random``, ``full``
- :mod:`.paser`: ``paser`` and its ablations (allocation, clustering, CCG switches)
- :mod:`.model_scores`: ``perplexity``, ``loss_gap``, ``ifd``
- :mod:`.nuggets`: ``nuggets``
- :mod:`.dsir`: ``dsir``

A new method: subclass :class:`Strategy`, decorate it with ``@STRATEGIES.register("name")``, import its module here.
"""

from . import baselines, dsir, model_scores, nuggets, paser  # noqa: F401  (registers the strategies)
from .base import STRATEGIES, SelectionContext, Strategy, get_strategy

__all__ = ["STRATEGIES", "SelectionContext", "Strategy", "get_strategy"]
