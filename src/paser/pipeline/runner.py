"""``paser run``: one YAML config drives prune -> select -> recover -> evaluate, resumably.

The config has the sections ``model``, ``prune`` (or ``pruned``: an already pruned model), ``data``,
``select``, ``recover`` and ``evaluate``. Each section takes the fields of the library config it feeds
(:class:`~paser.prune.PruneConfig`, :class:`~paser.selection.select.SelectConfig`,
:class:`~paser.recovery.RecoverConfig`, :class:`~paser.evaluate.EvaluateConfig`) except those the pipeline
wires itself (models, data and output paths); everything is validated before any stage runs, and an
unknown key or a bad value is named with its section.

Every stage writes into ``OUT/<stage>/`` (``select`` and ``recover`` one folder per method) and records
the hash of its inputs (its own settings plus the hashes of the stages it reads; for a recovery, the
selected records' content) in ``stage.json``. A rerun skips stages whose hash is unchanged and redoes the
ones downstream of a change (a selection redone that picks the same records keeps its recovery); ``from_stage``
forces a stage and everything after it. An interrupted recovery resumes from its last checkpoint.
``OUT/run.json`` records per-stage wall time, peak memory and cache hits; ``OUT/report.html`` is rebuilt
at the end.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import distributed, faults
from ..cache import file_fingerprint, stable_hash, write_json, write_text
from ..data import sample_data
from ..errors import ConfigError, PaserError
from .comparison import mean_cost, read_cost, write_comparison
from .schema import (
    CALIBRATION,
    HELDOUT,
    STAGES,
    PipelineConfig,
    arm_key,
    arm_recover_settings,
    arm_select_config,
    declared_inputs,
    evaluate_kwargs,
    recover_stage_inputs,
    resolve_data_file,
)

# The stage modules are imported where their stage runs: they load torch, transformers and peft, and `import
# paser` (which imports this module) takes 1.8 s with them deferred, 5 s without.

log = logging.getLogger(__name__)


def _data_identity(config: PipelineConfig) -> Any:
    source = config.data["source"]
    path = Path(source)
    return file_fingerprint(path) if path.is_file() else source


def _model_identity(spec: str) -> str:
    from ..models import model_fingerprint

    return model_fingerprint(spec)


class _PeakMemory:
    """Peak resident memory of this process while a stage runs (sampled every 0.2 s)."""

    def __init__(self) -> None:
        import psutil

        self._process = psutil.Process()
        self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self._process.memory_info().rss)

    def __enter__(self) -> _PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


@dataclass
class StageRecord:
    stage: str
    dir: str
    hash: str
    skipped: bool
    seconds: float = 0.0
    peak_rss_gb: float | None = None
    cache: dict[str, Any] = field(default_factory=dict)
    earlier_run: dict[str, Any] | None = None  # for a skipped stage: the run that made its outputs


class _Runner:
    def __init__(self, config: PipelineConfig, out: Path, from_stage: str | None):
        self.config = config
        self.out = out
        self.forced = STAGES[STAGES.index(from_stage):] if from_stage else ()
        self.records: list[StageRecord] = []

    def _marker(self, directory: Path) -> dict[str, Any]:
        try:
            return json.loads((directory / "stage.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    @contextmanager
    def stage(self, stage: str, directory: Path, inputs: dict[str, Any], clean: bool = True
              ) -> Iterator[dict[str, Any] | None]:
        """Yields None when the stage is up to date (skip), else a dict for cache notes; then marks it done. A stage
        run anew (other inputs, or forced) starts from an empty folder, so nothing of an earlier run can come back
        as its result; one interrupted with the same inputs keeps its folder and resumes. ``clean=False``: the
        stage's folder holds only content-keyed parts (evaluation's), which stay valid across inputs."""
        digest = stable_hash(inputs)
        marker = distributed.all_gather(self._marker(directory))[0]  # rank 0's view decides for every process
        name = directory.relative_to(self.out).as_posix()
        if stage not in self.forced and marker.get("hash") == digest and marker.get("status") == "done":
            log.info("%s: up to date, skipped", name)
            earlier = {k: marker.get(k) for k in ("seconds", "peak_rss_gb", "finished")}
            self.records.append(StageRecord(name, str(directory), digest, True, cache={"stage": "hit"},
                                            earlier_run=earlier))
            yield None
            return
        resumable = marker.get("hash") == digest and marker.get("status") == "running" and stage not in self.forced
        if clean and not resumable and directory.exists() and distributed.is_main():
            log.info("%s: starting from an empty folder (%s)", name, "forced" if stage in self.forced
                     else "other inputs" if marker else "no record of an earlier run")
            shutil.rmtree(directory)
        distributed.barrier()
        directory.mkdir(parents=True, exist_ok=True)
        if distributed.is_main():
            write_json(directory / "stage.json", {"hash": digest, "status": "running", "inputs": inputs})
        log.info("%s: running", name)
        notes: dict[str, Any] = {"stage": "miss", "resumed": resumable}
        t0 = time.perf_counter()
        with _PeakMemory() as memory:
            yield notes
        seconds, peak = round(time.perf_counter() - t0, 2), round(memory.peak / 1024**3, 3)
        if distributed.is_main():
            write_json(directory / "stage.json", {"hash": digest, "status": "done", "inputs": inputs,
                                                  "seconds": seconds, "peak_rss_gb": peak,
                                                  "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        distributed.barrier()  # the stage's outputs exist for every process
        self.records.append(StageRecord(name, str(directory), digest, False, seconds, peak, notes))
        faults.reached("run.stage_done")


def _read_selection(directory: Path) -> dict:
    try:
        return json.loads((directory / "selection.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def run_pipeline(config: PipelineConfig, out: str | Path | None = None, from_stage: str | None = None) -> dict:
    """Run (or resume) the pipeline; returns what ``OUT/run.json`` holds (under a launcher, on rank 0; the other
    processes take part in scoring, training and evaluation and return an empty dict)."""
    if from_stage is not None and from_stage not in STAGES:
        raise ConfigError(f"--from must be one of {', '.join(STAGES)}, not '{from_stage}'")
    if config.threads is not None:
        from ..runtime import configure_threads

        configure_threads(config.threads)
    run = PipelineRun(config, Path(out or config.out), from_stage)
    run.data()
    run.prune()
    for arm in config.arms:
        for seed in arm["seeds"]:
            run.select(arm, seed)
            run.recover(arm, seed)
    run.evaluate()
    run.export()
    return run.finish()


class PipelineRun:
    """The stages of one ``paser run`` in order, each skipped when its inputs' hash is unchanged; what a stage
    produces (paths and hashes) is kept here for the stages after it."""

    def __init__(self, config: PipelineConfig, out: Path, from_stage: str | None):
        self.config, self.out, self.from_stage = config, out, from_stage
        out.mkdir(parents=True, exist_ok=True)
        self.started = time.perf_counter()
        self.runner = _Runner(config, out, from_stage)
        self.main = distributed.is_main()  # under a launcher: rank 0 alone prunes and writes the run's files
        if self.main:
            write_text(out / "config.yaml", _yaml(config.as_dict()))
        self.model_id = _model_identity(config.model)
        self.data_id = _data_identity(config)
        self.files: dict[str, str] = {}
        self.data_hash = stable_hash("source", self.data_id, config.data)
        self.recovered: dict[str, str] = {}
        self.recover_hashes: dict[str, str] = {}
        self.arm_labels: dict[str, dict[int, str]] = {}
        self.costs: dict[str, list[dict]] = {}

    def data(self) -> None:
        """A fixed slice of the source, plus held-out and calibration records (when the config samples one)."""
        if self.config.data["sample"] is None:
            return
        directory = self.out / "data"
        with self.runner.stage("data", directory, {"data": self.data_id, "settings": self.config.data}) as notes:
            if notes is not None and self.main:
                notes.update(sample_data(self.config.data, directory))
        self.data_hash = self.runner.records[-1].hash
        self.files = {"slice": str(directory / "slice.jsonl")}
        for key, token in (("heldout", HELDOUT), ("calibration", CALIBRATION)):
            if self.config.data[key]:
                self.files[token] = str(directory / f"{key}.jsonl")

    def prune(self) -> None:
        """Prune the model (or take the given pruned one)."""
        from ..prune import PRUNING_METHODS, PruneConfig, run_prune

        config = self.config
        if config.pruned is not None:
            self.pruned, self.prune_hash = config.pruned, stable_hash("given", _model_identity(config.pruned))
            self.prune_label = "pruned"
            return
        directory = self.out / "prune"
        settings = {**config.prune, "calib_data": resolve_data_file(config.prune["calib_data"], self.files)}
        inputs = {"model": self.model_id,
                  "prune": declared_inputs(config.prune, {"method": PRUNING_METHODS.get(config.prune["method"]).version}),
                  "calibration": self.data_hash if config.prune["calib_data"] == CALIBRATION else None}
        with self.runner.stage("prune", directory, inputs) as notes:
            if notes is not None and self.main:
                run_prune(PruneConfig(model=config.model, out=directory, **settings))
        self.pruned, self.prune_hash = str(directory), self.runner.records[-1].hash
        amount = config.prune.get("pattern") or format(config.prune["sparsity"], "g")
        self.prune_label = f"pruned ({config.prune['method']} {amount})"

    def select(self, arm: dict, seed: int) -> None:
        from ..selection import get_strategy, other_methods_options, run_selection

        key = arm_key(arm, seed)
        directory = self.out / "select" / key
        select_config = arm_select_config(self.config, self.pruned, arm, seed, directory, self.files.get("slice"))
        # what the arm's method reads: another method's changed default must not redo this selection
        unread = {"out", "original", "pruned", "data"} | other_methods_options(select_config.method)
        settings = {k: v for k, v in dataclasses.asdict(select_config).items() if k not in unread}
        version = get_strategy(select_config.method).cache_version(select_config)
        inputs = {"model": self.model_id, "pruned": self.prune_hash, "data": self.data_hash,
                  "select": declared_inputs(settings, {"method": version})}
        with self.runner.stage("select", directory, inputs) as notes:
            if notes is not None:
                summary = run_selection(select_config).summary
                notes.update(scores_from_cache=summary["scores_from_cache"],
                             embeddings_from_cache=summary.get("embeddings_from_cache"),
                             clusters_from_cache=summary.get("clusters_from_cache"))
        self.costs.setdefault(arm["name"], []).append(read_cost(directory))

    def recover(self, arm: dict, seed: int) -> None:
        from ..recovery import RecoverConfig, run_recovery
        from ..targets import TARGETS

        key = arm_key(arm, seed)
        directory, selected = self.out / "recover" / key, self.out / "select" / key / "selected.jsonl"
        settings = arm_recover_settings(self.config, arm, seed, self.pruned)
        targets = settings.get("targets", "reference")
        if not TARGETS.get(targets).keeps_answers and settings.get("max_train_tokens") is None:
            # the targets change the answers' lengths: keep the selection's token budget in training
            settings["max_train_tokens"] = (_read_selection(selected.parent).get("tokens") or {}).get("budget")
        recover_config = RecoverConfig(model=self.pruned, data=str(selected), out=directory, dtype=self.config.dtype,
                                       bad_records=self.config.data["bad_records"], **settings)
        # the selected records themselves, not the selection's settings: a selection redone by a changed
        # option it does not act on (or a changed hash formula) picks the same records and keeps the recovery
        inputs = {"pruned": self.prune_hash, "selection": file_fingerprint(selected)["sha256"],
                  "dtype": self.config.dtype, "recover": recover_stage_inputs(recover_config)}
        with self.runner.stage("recover", directory, inputs) as notes:
            if notes is not None:
                run_recovery(recover_config)
        self.recovered[key] = str(directory / "merged")
        self.recover_hashes[key] = self.runner.records[-1].hash
        shown = key if len(arm["seeds"]) > 1 else arm["name"]  # a one-seed arm's label is its name
        self.arm_labels.setdefault(arm["name"], {})[seed] = f"{self.prune_label} + {shown}"

    def evaluate(self) -> None:
        """Every model side by side: the original, the pruned one and each recovery."""
        from ..evaluate import EvaluateConfig, run_evaluation

        directory = self.out / "evaluate"
        models = [self.config.model, self.pruned, *self.recovered.values()]
        labels = ["dense", self.prune_label,
                  *(label for arm in self.config.arms for label in self.arm_labels[arm["name"]].values())]
        kwargs = evaluate_kwargs(self.config, models, directory / "results.json", labels, self.files)
        evaluate_config = EvaluateConfig(**kwargs)
        inputs = {"model": self.model_id, "pruned": self.prune_hash, "recovered": self.recover_hashes,
                  "data": self.data_hash,
                  "evaluate": declared_inputs({k: v for k, v in kwargs.items() if k not in ("models", "out")},
                                        {m.name: m.version for m in evaluate_config.measurements()})}
        with self.runner.stage("evaluate", directory, inputs, clean=False) as notes:
            if notes is not None:
                run_evaluation(evaluate_config)

    def export(self) -> None:
        """Each recovered model as a deployable checkpoint (when the config has an ``export`` section)."""
        if self.config.export is None:
            return
        from ..export import EXPORT_FORMATS, ExportConfig, run_export

        version = EXPORT_FORMATS.get(self.config.export["format"]).version
        for key, merged in self.recovered.items():
            directory = self.out / "export" / key
            inputs = {"recovered": self.recover_hashes[key], "export": declared_inputs(self.config.export, {"format": version})}
            with self.runner.stage("export", directory, inputs) as notes:
                if notes is not None and self.main:
                    report = run_export(ExportConfig(model=merged, out=str(directory / "model"), **self.config.export))
                    notes.update(weights_ratio=report["size_bytes"]["weights_ratio"],
                                 min_sparsity=report["sparsity"]["output_min"])

    def finish(self) -> dict:
        """The comparison, ``run.json`` and the report (rank 0)."""
        from ..report import build_report

        config = self.config
        if not self.main:
            return {}
        if config.baseline and len(config.arms) > 1:
            write_comparison(self.out / "evaluate", self.arm_labels, config.baselines,
                             {"dense": "dense", "pruned": self.prune_label},
                             {arm: mean_cost(c) for arm, c in self.costs.items()})
        run = {"config": config.as_dict(), "out": str(self.out), "from_stage": self.from_stage,
               "arms": [{"name": arm["name"], "method": arm["method"], "seed": seed, "key": arm_key(arm, seed),
                         "label": self.arm_labels[arm["name"]][seed]} for arm in config.arms for seed in arm["seeds"]],
               "stages": [dataclasses.asdict(r) for r in self.runner.records],
               "seconds": round(time.perf_counter() - self.started, 2)}
        write_json(self.out / "run.json", run)
        try:
            build_report(self.out)
        except PaserError as exc:  # the results stand without the report; say why it is missing
            log.warning("report not built: %s", exc)
        return run


def _yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
