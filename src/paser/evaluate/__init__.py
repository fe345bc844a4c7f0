"""Evaluation: registered measurements over models side by side (see :mod:`paser.evaluate.base`).

- ``tasks``: zero-shot multiple choice through lm-evaluation-harness (:mod:`.zero_shot`);
- ``perplexity``: text perplexity, the WikiText-2 protocol of Wanda/SparseGPT (:mod:`.text_perplexity`);
- ``response_perplexity``: NLL of reference answers given their prompts (:mod:`.response`);
- ``demo_skills``: exact match on the held-out demo questions (:mod:`.demo_skills`);
- ``fidelity``: KL to the original model and top-1 agreement (:mod:`.fidelity`).

A new measurement is one module here plus its import below.
"""

# Registration order is the order of the table's columns and the comparison's metrics.
from . import zero_shot  # noqa: F401
from . import text_perplexity  # noqa: F401
from . import response  # noqa: F401
from . import demo_skills  # noqa: F401
from . import fidelity  # noqa: F401
from ..generate import generate_answers
from ..passes import perplexity, sequence_nll
from .base import MEASUREMENTS, EvalContext, LoadedModel, Measurement, Metric
from .demo_skills import demo_heldout, skill_accuracy
from .text_perplexity import text_windows
from .response import response_nll, response_perplexity
from .runner import EvaluateConfig, results_table, run_evaluation, table_rows
from .zero_shot import (LOCAL_TASK_PREFIX, REQUIRED_FIELDS, TABLE_METRIC, ZERO_SHOT_TASKS, check_task_file, load_tasks,
                        run_task, write_task_configs)

__all__ = ["MEASUREMENTS", "EvalContext", "EvaluateConfig", "LOCAL_TASK_PREFIX", "LoadedModel", "Measurement", "Metric",
           "REQUIRED_FIELDS", "TABLE_METRIC", "ZERO_SHOT_TASKS", "check_task_file", "demo_heldout", "generate_answers",
           "load_tasks", "perplexity", "response_nll", "response_perplexity", "results_table", "run_evaluation",
           "run_task", "sequence_nll", "skill_accuracy", "table_rows", "text_windows", "write_task_configs"]
