"""paser: post-training data selection for efficient recovery of pruned LLMs (PASER)."""

from .data import ColumnMap, Encoded, PromptFormatter, Record, iter_records, load_records
from .errors import ConfigError, DataError, ModelError, PaserError
from .models import DEFAULT_MODEL, check_compatible, load_model, load_tokenizer, resolve_spec
from .select import SelectConfig, SelectionResult, run_selection

__version__ = "0.1.0"

__all__ = [
    "ColumnMap", "ConfigError", "DEFAULT_MODEL", "DataError", "Encoded", "ModelError", "PaserError",
    "PromptFormatter", "Record", "check_compatible", "iter_records", "load_model", "load_records",
    "load_tokenizer", "resolve_spec", "run_selection", "SelectConfig", "SelectionResult", "__version__",
]
