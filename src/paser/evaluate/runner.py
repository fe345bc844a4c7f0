"""The evaluation loop: every model, every enabled measurement, each finished part kept.

Measurements are registered objects (:mod:`paser.evaluate.base`): zero-shot tasks, text perplexity,
response perplexity, demo skills and fidelity to the original. Inputs (task documents, texts, records)
are read and validated once before any model loads; each model is loaded once, and only when one of its
measurements is not finished already.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from .. import faults
from ..cache import package_versions, stable_hash, write_json, write_text
from ..errors import ConfigError
from ..options import check_declared
from .base import MEASUREMENTS, EvalContext, LoadedModel, Measurement
from .zero_shot import ZERO_SHOT_TASKS

log = logging.getLogger(__name__)


@dataclass
class EvaluateConfig:
    """What to measure; defaults are the CLI's."""

    CONFIG_ONLY: ClassVar[frozenset[str]] = frozenset()  # every field is a ``paser evaluate`` option (labels: --label)

    models: list[str]
    out: str | Path = "results.json"
    tasks: list[str] = field(default_factory=lambda: list(ZERO_SHOT_TASKS))
    task_dir: str | Path | None = None  # one <task>.jsonl per task; None: lm-eval's hub tasks
    limit: Annotated[int, Field(ge=1)] | None = None  # examples per task
    ppl: list[str] = field(default_factory=list)  # plain text files
    ppl_seqlen: Annotated[int, Field(ge=2)] = 1024
    ppl_windows: Annotated[int, Field(ge=1)] | None = None  # the first N windows of each perplexity text (None: all)
    response_ppl: list[str] = field(default_factory=list)  # instruction data sources
    response_ppl_limit: Annotated[int, Field(ge=1)] | None = None  # the first N records of each source (None: all)
    response_max_length: Annotated[int, Field(ge=2)] = 512
    demo_skills: bool = False
    demo_questions: Annotated[int, Field(ge=1)] | None = None  # held-out questions per skill (None: all)
    batch_size: Annotated[int, Field(ge=1)] = 8
    dtype: Literal["auto", "bf16", "fp32", "fp16"] = "auto"
    labels: list[str] | None = None  # display names for the table (default: the model specs)
    bad_records: Literal["skip", "error"] = "skip"  # unusable records in --response-ppl sources: skip (reported) | error
    fidelity_to: str | None = None  # the original model: KL to it and top-1 agreement (paser.evaluate.fidelity)
    fidelity_prompts: list[str] = field(default_factory=list)  # held-out prompts the original answers (sources)
    # the first N records of each fidelity_prompts source (None: all)
    fidelity_prompts_limit: Annotated[int, Field(ge=1)] | None = None
    fidelity_max_new_tokens: Annotated[int, Field(ge=1)] = 128  # the original's answers to fidelity_prompts: new tokens at most
    # the original's top-k stored once, each model measured alone (KL a lower bound; None: exact, both resident)
    fidelity_topk: Annotated[int, Field(ge=1)] | None = None

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
        from .. import distributed

        if distributed.is_main():
            write_json(path, {"value": value})
            faults.reached("evaluate.saved")


def _evaluate_model(spec: str, label: str, ctx: EvalContext, parts: _PartsCache,
                    plan: list[tuple[Measurement, str]]) -> dict[str, Any]:
    """Every measurement of one model, each taken from ``parts`` when it was finished before."""
    from .. import distributed
    from ..models import load_model, model_fingerprint

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


def run_evaluation(config: EvaluateConfig) -> dict:
    """Evaluate every model; writes ``config.out`` (JSON) and a markdown table beside it; returns the results."""
    from .. import distributed
    from ..models import resolve_dtype_name

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
