"""What every evaluation measurement is, and the registry they join.

A measurement (zero-shot tasks, text perplexity, response perplexity, demo skills, fidelity to the original)
owns everything about one kind of figure:

- ``enabled(config)`` / ``validate(config)``: whether :class:`~paser.evaluate.EvaluateConfig` asks for it,
  and its settings checked before any model loads;
- ``prepare(ctx)``: its inputs read once for all models (task documents, texts, records), returning the
  names of its items (one per task, text file or data source);
- ``settings(ctx, item)``: everything that decides the figure besides the model (the finished-parts cache key);
- ``measure(ctx, model, item)``: the value for one loaded model, a JSON dict whose ``"items"`` hold the
  per-item parts (per question, window or record) that the paired bootstrap resamples;
- ``columns(results)`` / ``cells(results, entry)``: its columns of the side-by-side table;
- ``metrics(results)``: its comparable figures (:class:`Metric`), each with its aggregation and whether
  higher is better, read by :mod:`paser.compare`;
- ``options``: a dataclass of its settings, declared with their types, bounds and help (:func:`option`): they
  become fields of :class:`~paser.evaluate.EvaluateConfig` (YAML ``evaluate:`` keys) and ``paser evaluate``
  options, validated by :func:`paser.options.check_declared`.

Values live in a model's entry of ``results.json`` under ``entry[measurement.key][item]``.

A new measurement is one module in this package, decorated ``@MEASUREMENTS.register("name")``, and its
import in ``paser/evaluate/__init__.py``::

    @dataclass
    class MyMetricOptions:
        my_metric: bool = option(False, "Measure my metric.")          # paser evaluate --my-metric

    @MEASUREMENTS.register("my_metric")
    class MyMetric(Measurement):
        key = "my_metric"
        options = MyMetricOptions
        def enabled(self, config): return config.my_metric
        def prepare(self, ctx): return ["all"]
        def measure(self, ctx, model, item): return {"value": ..., "items": {"num": [...], "den": [...]}}
        def metrics(self, results): return [Metric("my metric", (("my_metric", "all", "num", "den"),), True)]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from ..options import option  # noqa: F401  (measurements declare their settings with it)
from ..registry import Registry


@dataclass(frozen=True)
class Metric:
    """One comparable figure computed from per-item parts.

    ``parts``: (entry key, item name, numerator key, denominator key or None for ones) of each component;
    a component's ratio is sum(numerator) / sum(denominator) over its (resampled) items. ``figure`` turns
    the list of component ratios into the figure (arrays broadcast over bootstrap replicates).
    ``share_of_gap``: the figure is reported as the share of the pruned model's distance to the dense one
    that the model closed, ``(pruned - x) / (pruned - dense)`` (needs the dense and pruned references).
    """

    name: str
    parts: tuple[tuple[str, str, str, str | None], ...]
    higher_is_better: bool
    figure: Callable[[list[np.ndarray]], np.ndarray] = field(default=lambda ratios: np.mean(ratios, axis=0))
    share_of_gap: bool = False


def exp_of_first(ratios: list[np.ndarray]) -> np.ndarray:
    """Perplexity: exp of the mean NLL per token."""
    return np.exp(ratios[0])


def first(ratios: list[np.ndarray]) -> np.ndarray:
    """A per-token mean as it is (mean KL, agreement)."""
    return ratios[0]


def short_name(path: str) -> str:
    return str(path).replace("\\", "/").rsplit("/", 1)[-1]


@dataclass
class EvalContext:
    """What the measurements share during one evaluation: the config, the dtype, and caches of inputs
    built once for all models (each measurement keeps its own under its name)."""

    config: Any  # paser.evaluate.EvaluateConfig
    dtype: str
    inputs: dict[str, Any] = field(default_factory=dict)  # measurement name -> whatever prepare() built
    caches: dict[Any, Any] = field(default_factory=dict)  # tokenised texts and records, keyed by tokenizer


@dataclass
class LoadedModel:
    """The model being evaluated, its tokenizer, and helpers built lazily for it (lm-eval's wrapper)."""

    model: Any
    tokenizer: Any
    extras: dict[str, Any] = field(default_factory=dict)


class Measurement:
    """A kind of evaluation figure (see the module docstring). ``key``: its place in a model's results entry;
    ``cache_kind``: its prefix in the finished-parts cache; ``version``: bumped when its values change."""

    name = "base"
    key = "base"
    cache_kind = ""
    version = 1
    options: ClassVar[type | None] = None  # a dataclass of its settings (fields of EvaluateConfig), or None
    # ``paser run`` only: keys of the evaluate section this measurement reads besides its options (with defaults),
    # and its fields that name data sources (where ``@heldout`` resolves to the data stage's file)
    pipeline_options: ClassVar[dict[str, Any]] = {}
    data_sources: ClassVar[tuple[str, ...]] = ()

    def enabled(self, config: Any) -> bool:
        raise NotImplementedError

    def validate(self, config: Any) -> None:
        """Check this measurement's settings (no model loaded)."""

    def pipeline_settings(self, settings: dict[str, Any], original: str, final: bool) -> None:
        """Turn a ``paser run`` evaluate section into this measurement's :class:`EvaluateConfig` fields, in place:
        pop its :attr:`pipeline_options`. ``original``: the run's model; ``final``: the data stage has run (warn
        about what is skipped only then, not while the config is validated)."""

    def prepare(self, ctx: EvalContext) -> list[str]:
        """Read this measurement's inputs once; return its item names."""
        raise NotImplementedError

    def settings(self, ctx: EvalContext, item: str) -> dict[str, Any]:
        return {}

    def measure(self, ctx: EvalContext, model: LoadedModel, item: str) -> dict[str, Any]:
        raise NotImplementedError

    def store(self, entry: dict[str, Any], item: str, value: dict[str, Any]) -> None:
        entry.setdefault(self.key, {})[item] = value

    def summary(self, value: dict[str, Any]) -> Any:
        """What the log shows of a value (per-item parts stay in results.json)."""
        return {k: v for k, v in value.items() if k != "items"}

    def results_info(self, ctx: EvalContext, items: list[str]) -> dict[str, Any]:
        """Top-level fields of results.json describing this measurement."""
        return {}

    def columns(self, results: dict) -> list[str]:
        return []

    def cells(self, results: dict, entry: dict) -> list[str]:
        return []

    def metrics(self, results: dict) -> list[Metric]:
        return []


MEASUREMENTS: Registry[Measurement] = Registry("measurement", "paser.measurements")


def measured_items(results: dict, key: str) -> dict[str, Any]:
    """The first model's values of a measurement that carry per-item parts."""
    first_entry = next(iter(results["models"].values()), {})
    return {name: value for name, value in first_entry.get(key, {}).items()
            if isinstance(value, dict) and value.get("items")}
