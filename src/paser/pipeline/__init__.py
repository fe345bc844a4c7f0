"""``paser run``: one YAML config drives prune -> select -> recover -> evaluate, resumably.

- :mod:`.schema`: the config (sections, arms, seeds, baselines), its validation and the shipped configs;
- :mod:`.runner`: the stages, each keyed by a hash of its declared inputs, skipped when unchanged;
- :mod:`.comparison`: every arm against each baseline, with paired intervals.
"""

from .comparison import write_comparison
from .runner import StageRecord, run_pipeline
from .schema import (SHIPPED_CONFIGS, STAGES, PipelineConfig, arm_recover_settings, declared_inputs, arm_select_config,
                     demo_config_text, load_config, parse_config, shipped_config_text, with_arms,
                     with_evaluation_data)

__all__ = ["SHIPPED_CONFIGS", "STAGES", "PipelineConfig", "StageRecord", "demo_config_text", "load_config",
           "parse_config", "run_pipeline", "shipped_config_text", "with_arms", "with_evaluation_data",
           "write_comparison", "arm_recover_settings", "declared_inputs", "arm_select_config"]
