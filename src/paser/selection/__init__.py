"""Selection: which records recover a pruned model best, within a budget of records or training tokens.

- the stage (:mod:`.select`: :class:`SelectConfig`, :func:`run_selection`, the token budget);
- the methods, registered peers (:mod:`.strategies`: PASER and its ablations, the paper's baselines, plus any a
  package registers through the ``paser.selection`` entry point);
- what they are built from: embeddings (:mod:`.embed`), clusters (:mod:`.cluster`), the two-model degradation scores
  (:mod:`.score`), the budget per cluster and the order inside it (:mod:`.allocate`), the concept-consistency graph
  (:mod:`.ccg`).
"""

from .select import (
    METHODS,
    SelectBase,
    SelectConfig,
    SelectionResult,
    check_options_belong,
    other_methods_options,
    run_selection,
)
from .strategies import STRATEGIES, SelectionContext, Strategy, get_strategy

__all__ = ["METHODS", "STRATEGIES", "SelectBase", "SelectConfig", "SelectionContext", "SelectionResult", "Strategy",
           "check_options_belong", "get_strategy", "other_methods_options", "run_selection"]
