"""Zero-shot multiple choice through lm-evaluation-harness (``boolq piqa hellaswag winogrande arc_easy
arc_challenge openbookqa``).

With ``task_dir``, the package's task configs (``paser/tasks/<task>.yaml``) read ``<task_dir>/<task>.jsonl``
offline as lm-eval tasks named ``paser_<task>``; without it, lm-eval's own hub tasks of the same names.
Metrics: acc and acc_norm with their standard errors, and n; per-question scores for the paired bootstrap.
The table shows each task's conventional metric (:data:`TABLE_METRIC`, LLM-Pruner/Wanda) and their mean.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import torch
import yaml
from pydantic import Field

from .. import distributed
from ..cache import file_fingerprint
from ..errors import ConfigError, DataError
from .base import MEASUREMENTS, EvalContext, LoadedModel, Measurement, Metric, option

# lm-eval and accelerate are imported when zero-shot tasks run: lm-eval takes seconds to load.

LOCAL_TASK_PREFIX = "paser_"


@dataclass(frozen=True)
class ZeroShotTask:
    """A task paser runs from a local JSONL: the fields each record needs and the metric the table shows
    (the LLM-Pruner / Wanda convention; results.json keeps both acc and acc_norm)."""

    table_metric: Literal["acc", "acc_norm"]
    fields: tuple[str, ...] = ("question", "choices", "label")


TASKS = {
    "boolq": ZeroShotTask("acc", ("question", "choices", "label", "context")),
    "piqa": ZeroShotTask("acc"),
    "hellaswag": ZeroShotTask("acc_norm"),
    "winogrande": ZeroShotTask("acc", ("choices", "label", "context_options", "continuation")),
    "arc_easy": ZeroShotTask("acc"),
    "arc_challenge": ZeroShotTask("acc_norm"),
    "openbookqa": ZeroShotTask("acc_norm"),
}
ZERO_SHOT_TASKS = tuple(TASKS)
REQUIRED_FIELDS = {name: task.fields for name, task in TASKS.items()}
TABLE_METRIC = {name: task.table_metric for name, task in TASKS.items()}

log = logging.getLogger(__name__)


def check_task_file(path: Path, task: str) -> int:
    """Validate a local task file; the first bad record is named by line and field. Returns the row count."""
    if not path.is_file():
        raise ConfigError(f"task '{task}': {path} not found (task_dir needs one <task>.jsonl per task)")
    rows = 0
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(path, number, None, f"malformed JSON ({exc.msg})") from None
            for name in REQUIRED_FIELDS[task]:
                if name not in doc:
                    raise DataError(path, number, name, "missing")
            choices = doc["choices"]
            if not isinstance(choices, list) or len(choices) < 2:
                raise DataError(path, number, "choices", "must be a list of at least 2 strings")
            label = doc["label"]
            if not isinstance(label, int) or not 0 <= label < len(choices):
                raise DataError(path, number, "label", f"must be an index into choices, not {label!r}")
            if task == "winogrande" and len(doc["context_options"]) != len(choices):
                raise DataError(path, number, "context_options", "needs one context per choice")
            rows += 1
    if not rows:
        raise ConfigError(f"task '{task}': {path} has no records")
    return rows


def write_task_configs(task_dir: str | Path, tasks: Sequence[str], dest: str | Path) -> dict[str, str]:
    """Write lm-eval task configs ``paser_<task>.yaml`` reading ``task_dir/<task>.jsonl`` into ``dest``.

    ``lm_eval --include_path DEST --tasks paser_arc_easy ...`` runs the same tasks. Returns task -> name.
    """

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    names = {}
    for task in tasks:
        config = yaml.safe_load(resources.files("paser").joinpath("tasks", f"{task}.yaml").read_text())
        name = LOCAL_TASK_PREFIX + task
        config.update(task=name, dataset_path="json", test_split="test",
                      dataset_kwargs={"data_files": {"test": str((Path(task_dir) / f"{task}.jsonl").resolve())}})
        (dest / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        names[task] = name
    return names


def load_tasks(tasks: Sequence[str], task_dir: str | Path | None) -> dict[str, Any]:
    """Build lm-eval Task objects once (datasets read, documents prepared); returns task -> Task."""
    from lm_eval.tasks import TaskManager

    if not tasks:
        return {}
    if task_dir is None:
        names = {t: t for t in tasks}
        manager = TaskManager()
    else:
        include = tempfile.mkdtemp(prefix="paser-tasks-")
        names = write_task_configs(task_dir, tasks, include)
        manager = TaskManager(include_path=include, include_defaults=False)  # indexing lm-eval's own tasks takes ~20 s
    loaded = manager.load(list(names.values()))["tasks"]
    by_name = {getattr(t, "task_name", None) or t.config.task: t for t in loaded.values()}
    return {task: by_name[names[task]] for task in tasks}


def run_task(lm: Any, task: Any, limit: int | None) -> dict:
    """One lm-eval task on a wrapped model: acc, acc_norm (with stderr), n and seconds."""
    from lm_eval.evaluator import evaluate

    name = task.config.task
    t0 = time.perf_counter()
    results = evaluate(lm=lm, task_dict={"tasks": {name: task}, "groups": {}}, limit=limit, log_samples=True,
                       bootstrap_iters=1000, verbosity="WARNING")
    seconds = time.perf_counter() - t0
    if results is None:  # a rank other than 0 under a launcher: rank 0 holds the gathered results
        return {}
    metrics = results["results"][name]
    row = {}
    for metric in ("acc", "acc_norm"):
        if f"{metric},none" in metrics:
            row[metric] = metrics[f"{metric},none"]
            stderr = metrics.get(f"{metric}_stderr,none")
            row[f"{metric}_stderr"] = stderr if isinstance(stderr, float) else None
    samples = results.get("n-samples", {}).get(name, {})
    row["n"] = samples.get("effective", samples.get("original"))
    row["seconds"] = round(seconds, 2)
    logged = sorted(results.get("samples", {}).get(name, []), key=lambda s: s["doc_id"])
    # per-question scores, in document order: what paired comparisons between models resample
    row["items"] = {metric: [float(s[metric]) for s in logged] for metric in ("acc", "acc_norm")
                    if logged and metric in logged[0]}
    return row


def _data_parallel(lm: Any) -> None:
    """Under a launcher, make lm-eval's evaluator split each task's requests across the processes and gather
    the per-question results on rank 0 (what it does for a model it loads itself; paser passes its own)."""

    if distributed.launched():
        from accelerate import Accelerator

        lm._rank, lm._world_size = distributed.rank(), distributed.world_size()
        lm.accelerator = Accelerator(cpu=not torch.cuda.is_available())


@dataclass
class ZeroShotOptions:
    tasks: list[str] = option(factory=lambda: list(ZERO_SHOT_TASKS), help=
        "Zero-shot tasks, comma-separated or repeated ('' for none).")
    task_dir: str | Path | None = option(None,
        "Directory with one <task>.jsonl per task (local, offline); without it, lm-eval's hub tasks.")
    limit: Annotated[int, Field(ge=1)] | None = option(None, "At most N examples per task.")


@MEASUREMENTS.register("tasks")
class ZeroShotTasks(Measurement):
    """Zero-shot accuracy on lm-eval tasks (``tasks``, ``task_dir``, ``limit``, ``batch_size``)."""

    key = "tasks"
    cache_kind = "task"
    options = ZeroShotOptions
    pipeline_options: ClassVar[dict[str, Any]] = {"skip_missing_task_dir": False}

    def pipeline_settings(self, settings: dict[str, Any], original: str, final: bool) -> None:
        task_dir = settings.get("task_dir")
        if settings.pop("skip_missing_task_dir") and task_dir is not None and not Path(task_dir).is_dir():
            if settings["tasks"] and final:
                log.warning("zero-shot tasks %s skipped: %s not found", ", ".join(settings["tasks"]), task_dir)
            settings["tasks"] = []  # e.g. the demo without ../shared/data/eval

    def enabled(self, config: Any) -> bool:
        return bool(config.tasks)

    def validate(self, config: Any) -> None:
        unknown = [t for t in config.tasks if t not in ZERO_SHOT_TASKS]
        if unknown:
            raise ConfigError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(ZERO_SHOT_TASKS)}")
        if config.task_dir is not None:
            for task in config.tasks:
                check_task_file(Path(config.task_dir) / f"{task}.jsonl", task)

    def prepare(self, ctx: EvalContext) -> list[str]:
        t0 = time.perf_counter()
        ctx.inputs[self.name] = load_tasks(ctx.config.tasks, ctx.config.task_dir)
        ctx.inputs["task_build_seconds"] = round(time.perf_counter() - t0, 2)
        return list(ctx.config.tasks)

    def settings(self, ctx: EvalContext, item: str) -> dict[str, Any]:
        config = ctx.config
        return {"limit": config.limit, "batch_size": config.batch_size, "task_dir": str(config.task_dir),
                "file": file_fingerprint(Path(config.task_dir) / f"{item}.jsonl") if config.task_dir else None}

    def measure(self, ctx: EvalContext, model: LoadedModel, item: str) -> dict[str, Any]:
        if "lm" not in model.extras:
            from lm_eval.models.huggingface import HFLM

            model.extras["lm"] = HFLM(pretrained=model.model, tokenizer=model.tokenizer,
                                      batch_size=ctx.config.batch_size)
            _data_parallel(model.extras["lm"])
        return run_task(model.extras["lm"], ctx.inputs[self.name][item], ctx.config.limit)

    def results_info(self, ctx: EvalContext, items: list[str]) -> dict[str, Any]:
        return {"limit": ctx.config.limit, "tasks": items,
                "task_source": str(ctx.config.task_dir) if ctx.config.task_dir else "lm-eval hub tasks",
                "task_build_seconds": ctx.inputs.get("task_build_seconds", 0.0)}

    def columns(self, results: dict) -> list[str]:
        tasks = results.get("tasks") or []
        return [f"{t} ({TABLE_METRIC[t]})" for t in tasks] + (["mean acc"] if tasks else [])

    def cells(self, results: dict, entry: dict) -> list[str]:
        tasks = results.get("tasks") or []
        accs = [entry["tasks"][task].get(TABLE_METRIC[task]) for task in tasks]
        cells = [f"{100 * value:.2f}" if value is not None else "-" for value in accs]
        if tasks:
            cells.append(f"{100 * sum(accs) / len(accs):.2f}" if None not in accs else "-")
        return cells

    def metrics(self, results: dict) -> list[Metric]:
        first_entry = next(iter(results["models"].values()), {})
        tasks = [t for t, v in first_entry.get("tasks", {}).items() if v.get("items")]
        out = [Metric(f"{t} ({TABLE_METRIC.get(t, 'acc')})", (("tasks", t, TABLE_METRIC.get(t, "acc"), None),), True)
               for t in tasks]
        if len(tasks) > 1:
            out.append(Metric("mean acc", tuple(("tasks", t, TABLE_METRIC.get(t, "acc"), None) for t in tasks), True))
        return out
