"""``paser run``: one YAML config drives prune -> select -> recover -> evaluate, resumably.

The config has the sections ``model``, ``prune`` (or ``pruned``: an already pruned model), ``data``,
``select``, ``recover`` and ``evaluate``. Each section takes the fields of the library config it feeds
(:class:`~paser.prune.PruneConfig`, :class:`~paser.select.SelectConfig`,
:class:`~paser.recover.RecoverConfig`, :class:`~paser.evaluate.EvaluateConfig`) except those the pipeline
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
import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from .. import distributed, faults
from ..cache import file_fingerprint, stable_hash, write_json, write_text
from ..data import sample_data
from ..errors import ConfigError, PaserError
from .comparison import _mean_cost, _read_cost, write_comparison
from .schema import (CALIBRATION, HELDOUT, STAGES, PipelineConfig, _arm_key, _arm_recover, _declared, _evaluate_kwargs,
                     _resolve, _select_config)

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

    def __enter__(self) -> "_PeakMemory":
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
        import json

        try:
            return json.loads((directory / "stage.json").read_text())
        except (FileNotFoundError, ValueError):
            return {}

    @contextmanager
    def stage(self, stage: str, directory: Path, inputs: dict[str, Any]) -> Iterator[dict[str, Any] | None]:
        """Yields None when the stage is up to date (skip), else a dict for cache notes; then marks it done."""
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
        resumable = marker.get("hash") == digest and marker.get("status") == "running"
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
    import json

    try:
        return json.loads((directory / "selection.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def run_pipeline(config: PipelineConfig, out: str | Path | None = None, from_stage: str | None = None) -> dict:
    """Run (or resume) the pipeline; returns what ``OUT/run.json`` holds (under a launcher, on rank 0; the other
    processes take part in scoring, training and evaluation and return an empty dict)."""
    from ..evaluate import EvaluateConfig, run_evaluation
    from ..objectives import OBJECTIVES
    from ..prune import PRUNING_METHODS, PruneConfig, run_prune
    from ..targets import TARGETS
    from ..recover import RecoverConfig, run_recovery
    from ..report import build_report
    from ..select import other_methods_options, run_selection
    from ..strategies import get_strategy

    if from_stage is not None and from_stage not in STAGES:
        raise ConfigError(f"--from must be one of {', '.join(STAGES)}, not '{from_stage}'")
    if config.threads is not None:
        from ..runtime import configure_threads

        configure_threads(config.threads)
    out = Path(out or config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runner = _Runner(config, out, from_stage)
    main = distributed.is_main()  # under a launcher: rank 0 alone prunes and writes the run's files
    if main:
        write_text(out / "config.yaml", _yaml(config.as_dict()))

    model_id = _model_identity(config.model)
    data_id = _data_identity(config)
    files: dict[str, str] = {}
    data_hash = stable_hash("source", data_id, config.data)
    if config.data["sample"] is not None:  # a fixed slice of the source, plus held-out and calibration records
        directory = out / "data"
        with runner.stage("data", directory, {"data": data_id, "settings": config.data}) as notes:
            if notes is not None and main:
                notes.update(sample_data(config.data, directory))
        data_hash = runner.records[-1].hash
        files = {"slice": str(directory / "slice.jsonl")}
        for key, token in (("heldout", HELDOUT), ("calibration", CALIBRATION)):
            if config.data[key]:
                files[token] = str(directory / f"{key}.jsonl")

    # prune (or take the given pruned model)
    if config.pruned is not None:
        pruned, prune_hash = config.pruned, stable_hash("given", _model_identity(config.pruned))
        prune_label = "pruned"
    else:
        directory = out / "prune"
        prune_settings = {**config.prune, "calib_data": _resolve(config.prune["calib_data"], files)}
        inputs = {"model": model_id,
                  "prune": _declared(config.prune, {"method": PRUNING_METHODS.get(config.prune["method"]).version}),
                  "calibration": data_hash if config.prune["calib_data"] == CALIBRATION else None}
        with runner.stage("prune", directory, inputs) as notes:
            if notes is not None and main:
                run_prune(PruneConfig(model=config.model, out=directory, **prune_settings))
        pruned, prune_hash = str(directory), runner.records[-1].hash
        prune_label = f"pruned ({config.prune['method']} {config.prune.get('pattern') or format(config.prune['sparsity'], 'g')})"

    # select and recover, per arm and seed
    recovered: dict[str, str] = {}
    recover_hashes = {}
    arm_labels: dict[str, dict[int, str]] = {}
    costs: dict[str, list[dict]] = {}
    for arm in config.arms:
        for seed in arm["seeds"]:
            key = _arm_key(arm, seed)
            directory = out / "select" / key
            select_config = _select_config(config, pruned, arm, seed, directory, files.get("slice"))
            # what the arm's method reads: another method's changed default must not redo this selection
            unread = {"out", "original", "pruned", "data"} | other_methods_options(select_config.method)
            select_settings = {k: v for k, v in dataclasses.asdict(select_config).items() if k not in unread}
            inputs = {"model": model_id, "pruned": prune_hash, "data": data_hash,
                      "select": _declared(select_settings,
                                          {"method": get_strategy(select_config.method).cache_version(select_config)})}
            with runner.stage("select", directory, inputs) as notes:
                if notes is not None:
                    summary = run_selection(select_config).summary
                    notes.update(scores_from_cache=summary["scores_from_cache"],
                                 embeddings_from_cache=summary.get("embeddings_from_cache"),
                                 clusters_from_cache=summary.get("clusters_from_cache"))
            costs.setdefault(arm["name"], []).append(_read_cost(directory))

            directory = out / "recover" / key
            settings = _arm_recover(config, arm, seed)
            if not TARGETS.get(settings["targets"]).keeps_answers and settings.get("max_train_tokens") is None:
                # the targets change the answers' lengths: keep the selection's token budget in training
                budget = (_read_selection(out / "select" / key).get("tokens") or {}).get("budget")
                settings["max_train_tokens"] = budget
            # the selected records themselves, not the selection's settings: a selection redone by a changed
            # option it does not act on (or a changed hash formula) picks the same records and keeps the recovery
            selected = file_fingerprint(out / "select" / key / "selected.jsonl")["sha256"]
            inputs = {"pruned": prune_hash, "selection": selected, "dtype": config.dtype,
                      "recover": _declared(settings, {"objective": OBJECTIVES.get(settings["loss"]).version,
                                                      "targets": TARGETS.get(settings["targets"]).version})}
            with runner.stage("recover", directory, inputs) as notes:
                if notes is not None:
                    run_recovery(RecoverConfig(model=pruned, data=str(out / "select" / key / "selected.jsonl"),
                                               out=directory, dtype=config.dtype,
                                               bad_records=config.data["bad_records"], **settings))
            recovered[key] = str(directory / "merged")
            recover_hashes[key] = runner.records[-1].hash
            shown = key if len(arm["seeds"]) > 1 else arm["name"]  # a one-seed arm's label is its name
            arm_labels.setdefault(arm["name"], {})[seed] = f"{prune_label} + {shown}"

    # evaluate everything side by side
    directory = out / "evaluate"
    models = [config.model, pruned, *recovered.values()]
    labels = ["dense", prune_label, *(label for arm in config.arms for label in arm_labels[arm["name"]].values())]
    evaluate_kwargs = _evaluate_kwargs(config, models, directory / "results.json", labels, files)
    evaluate_config = EvaluateConfig(**evaluate_kwargs)
    inputs = {"model": model_id, "pruned": prune_hash, "recovered": recover_hashes, "data": data_hash,
              "evaluate": _declared({k: v for k, v in evaluate_kwargs.items() if k not in ("models", "out")},
                                    {m.name: m.version for m in evaluate_config.measurements()})}
    with runner.stage("evaluate", directory, inputs) as notes:
        if notes is not None:
            run_evaluation(evaluate_config)
    if config.export is not None:  # each recovered model as a deployable checkpoint
        from ..export import EXPORT_FORMATS, ExportConfig, run_export

        for key, merged in recovered.items():
            export_dir = out / "export" / key
            inputs = {"recovered": recover_hashes[key],
                      "export": _declared(config.export, {"format": EXPORT_FORMATS.get(config.export["format"]).version})}
            with runner.stage("export", export_dir, inputs) as notes:
                if notes is not None and main:
                    report = run_export(ExportConfig(model=merged, out=str(export_dir / "model"), **config.export))
                    notes.update(weights_ratio=report["size_bytes"]["weights_ratio"],
                                 min_sparsity=report["sparsity"]["output_min"])
    if not main:
        return {}
    if config.baseline and len(config.arms) > 1:
        write_comparison(directory, arm_labels, config.baselines, {"dense": "dense", "pruned": prune_label},
                         {arm: _mean_cost(c) for arm, c in costs.items()})

    run = {"config": config.as_dict(), "out": str(out), "from_stage": from_stage,
           "arms": [{"name": arm["name"], "method": arm["method"], "seed": seed, "key": _arm_key(arm, seed),
                     "label": arm_labels[arm["name"]][seed]} for arm in config.arms for seed in arm["seeds"]],
           "stages": [dataclasses.asdict(r) for r in runner.records],
           "seconds": round(time.perf_counter() - started, 2)}
    write_json(out / "run.json", run)
    try:
        build_report(out)
    except PaserError as exc:  # the results stand without the report; say why it is missing
        log.warning("report not built: %s", exc)
    return run


def _yaml(data: Any) -> str:
    import yaml

    return yaml.safe_dump(data, sort_keys=False)
