"""paser: post-training data selection for efficient recovery of pruned LLMs (PASER)."""

from .data import ColumnMap, Encoded, PromptFormatter, Record, iter_records, load_records
from .errors import ConfigError, DataError, ModelError, PaserError
from .evaluate import EvaluateConfig, run_evaluation
from .models import DEFAULT_MODEL, check_compatible, load_model, load_tokenizer, resolve_spec
from .pipeline import load_config, parse_config, run_pipeline
from .prune import PruneConfig, run_prune
from .recovery import RecoverConfig, run_recovery
from .report import build_report
from .selection import SelectConfig, SelectionResult, run_selection

__version__ = "0.1.0"

__all__ = [
    "ColumnMap", "ConfigError", "DEFAULT_MODEL", "DataError", "Encoded", "EvaluateConfig", "ModelError",
    "PaserError", "PromptFormatter", "PruneConfig", "Record", "RecoverConfig", "SelectConfig", "SelectionResult",
    "__version__", "build_report", "check_compatible", "iter_records", "load_config", "load_model",
    "load_records", "load_tokenizer", "parse_config", "resolve_spec", "run_evaluation", "run_pipeline",
    "run_prune", "run_recovery", "run_selection",
]
