"""The evaluation loop: every model, every enabled measurement, each finished part kept.

Measurements are registered objects (:mod:`paser.evaluate.base`): zero-shot tasks, text perplexity,
response perplexity, demo skills and fidelity to the original. Inputs (task documents, texts, records)
are read and validated once before any model loads; each model is loaded once, and only when one of its
measurements is not finished already.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import Field

from .. import distributed, faults
from ..cache import package_versions, stable_hash, write_json, write_text
from ..errors import ConfigError
from ..models import DTYPE_HELP, Dtype, load_model, model_fingerprint, resolve_dtype_name
from ..options import check_declared, declared_fields, joined_config, option
from .base import MEASUREMENTS, EvalContext, LoadedModel, Measurement

log = logging.getLogger(__name__)


@dataclass
class EvaluateBase:
    """The settings every evaluation has; each measurement's own are declared on it (``Measurement.options``)
    and joined into :class:`EvaluateConfig` below. Defaults are the CLI's."""

    CONFIG_ONLY: ClassVar[frozenset[str]] = frozenset()  # every field is a ``paser evaluate`` option (labels: --label)

    models: list[str] = option(help="One or more model specs, compared side by side.", cli='argument')
    out: str | Path = option('results.json', "Results file; a markdown table is written beside it (.md).")
    batch_size: Annotated[int, Field(ge=1)] = option(8, "Batch size.")
    dtype: Dtype = option("auto", DTYPE_HELP)
    labels: list[str] | None = option(None, "Display name per model, in order (default: the model specs).", cli='--label')

    def validate(self) -> None:
        """Check everything that does not need a model: the declared bounds and choices, then each enabled
        measurement its own settings."""
        if not self.models:
            raise ConfigError("name at least one model to evaluate")
        check_declared(self)
        if self.labels is not None and len(self.labels) != len(self.models):
            raise ConfigError(f"{len(self.labels)} labels for {len(self.models)} models")
        measurements = self.measurements()
        if not measurements:
            raise ConfigError("nothing to evaluate: give tasks, --ppl, --response-ppl or --demo-skills")
        for measurement in measurements:
            measurement.validate(self)

    def measurements(self) -> list[Measurement]:
        """The registered measurements this config asks for, in registration order."""
        return [m for _, m in MEASUREMENTS.items() if m.enabled(self)]


def measurement_fields() -> list[tuple[dataclasses.Field, Any]]:
    """Every registered measurement's declared settings as (field, resolved type), in registration order."""
    return declared_fields(EvaluateBase, MEASUREMENTS.items())


EvaluateConfig = joined_config("EvaluateConfig", EvaluateBase, MEASUREMENTS.items(), __name__,
                               "What to measure: EvaluateBase's settings and every registered measurement's (its "
                               "``options``). Defaults are the CLI's.")


class _PartsCache:
    """One JSON file per finished (model, measurement), beside the results file, keyed by the model's
    weights and everything that decides the figure: a killed or repeated evaluation redoes only what
    is missing, and a model whose every measurement is there is not even loaded."""

    def __init__(self, out: Path, dtype: str):
        self.dir = out.parent / f".{out.stem}-parts"
        self.dtype = dtype

    def path(self, model_key: str, kind: str, name: str, settings: dict[str, Any]) -> Path:
        return self.dir / f"{kind}-{stable_hash(model_key, kind, name, settings, self.dtype)}.json"

    def get(self, path: Path) -> dict | None:
        try:
            return json.loads(path.read_text(encoding="utf-8"))["value"]
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def put(self, path: Path, value: Any) -> None:
        if distributed.is_main():
            write_json(path, {"value": value})
            faults.reached("evaluate.saved")


def _evaluate_model(spec: str, label: str, ctx: EvalContext, parts: _PartsCache,
                    plan: list[tuple[Measurement, str]]) -> dict[str, Any]:
    """Every measurement of one model, each taken from ``parts`` when it was finished before."""

    t_model = time.perf_counter()
    model_key = model_fingerprint(spec)
    paths = [parts.path(model_key, m.cache_kind or m.name, item, {**m.settings(ctx, item),
                                                                  **({"version": m.version} if m.version > 1 else {})})
             for m, item in plan]
    entry: dict[str, Any] = {"spec": spec, "tasks": {}, "perplexity": {}, "response_perplexity": {}}
    done = {path: value for path in paths if (value := parts.get(path)) is not None}
    if done:
        log.info("%s: %d of %d measurements already finished (%s)", label, len(done), len(plan), parts.dir)
    loaded: LoadedModel | None = None
    for (measurement, item), path in zip(plan, paths):
        value = done.get(path)
        if value is None:
            if loaded is None:
                log.info("evaluating %s", label)
                model, tokenizer = load_model(spec, dtype=ctx.dtype, device=distributed.device())
                loaded = LoadedModel(model.eval(), tokenizer)
            value = measurement.measure(ctx, loaded, item)
            parts.put(path, value)
        measurement.store(entry, item, value)
        log.info("%s %s %s: %s", label, measurement.name, item, measurement.summary(value))
    entry["seconds"] = round(time.perf_counter() - t_model, 2)
    entry["from_earlier_run"] = len(done)
    return entry


def run_evaluation(config: Any) -> dict:
    """Evaluate every model; writes ``config.out`` (JSON) and a markdown table beside it; returns the results."""

    config.validate()
    started = time.perf_counter()
    ctx = EvalContext(config, resolve_dtype_name(config.dtype))
    measurements = config.measurements()
    # every input read (and validated) before any model loads
    plan = [(m, item) for m in measurements for item in m.prepare(ctx)]
    labels = config.labels or list(config.models)
    results: dict[str, Any] = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "versions": package_versions("paser", "torch", "transformers", "lm-eval", "peft"),
        "dtype": ctx.dtype, "limit": config.limit, "tasks": [], "task_source": None, "ppl_files": [],
        "ppl_seqlen": config.ppl_seqlen, "ppl_windows": config.ppl_windows, "response_ppl_files": [],
        "demo_skills": False, "task_build_seconds": 0.0, "processes": distributed.world_size(),
        "measurements": [m.name for m in measurements], "models": {},
    }
    for measurement in measurements:
        results.update(measurement.results_info(ctx, [item for m, item in plan if m is measurement]))
    parts = _PartsCache(Path(config.out), ctx.dtype)
    for spec, label in zip(config.models, labels):
        results["models"][label] = _evaluate_model(spec, label, ctx, parts, plan)
    results["seconds"] = round(time.perf_counter() - started, 2)
    results["table"] = results_table(results) if distributed.is_main() else ""
    out = Path(config.out)
    if distributed.is_main():
        write_json(out, results)
        write_text(out.with_suffix(".md"), results["table"])
    distributed.barrier()
    return results


# ------------------------------------------------------------------------------------------ the table
def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """The side-by-side table: models as rows, every measurement's columns (in registration order).
    Returns ``(header, rows)`` of formatted cells."""
    measurements = [m for _, m in MEASUREMENTS.items()]
    columns = [c for m in measurements for c in m.columns(results)]
    rows = [[label, *[c for m in measurements for c in m.cells(results, entry)]]
            for label, entry in results["models"].items()]
    return ["model", *columns], rows


def results_table(results: dict) -> str:
    """:func:`table_rows` as markdown."""
    header, rows = table_rows(results)
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"
