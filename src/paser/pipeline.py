"""``paser run``: one YAML config drives prune -> select -> recover -> evaluate, resumably.

The config has the sections ``model``, ``prune`` (or ``pruned``: an already pruned model), ``data``,
``select``, ``recover`` and ``evaluate``. Each section takes the fields of the library config it feeds
(:class:`~paser.prune.PruneConfig`, :class:`~paser.select.SelectConfig`,
:class:`~paser.recover.RecoverConfig`, :class:`~paser.evaluate.EvaluateConfig`) except those the pipeline
wires itself (models, data and output paths); everything is validated before any stage runs, and an
unknown key or a bad value is named with its section.

Every stage writes into ``OUT/<stage>/`` (``select`` and ``recover`` one folder per method) and records
the hash of its inputs (its own settings plus the hashes of the stages it reads) in ``stage.json``. A
rerun skips stages whose hash is unchanged and redoes the ones downstream of a change; ``from_stage``
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
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from . import faults
from .cache import file_fingerprint, stable_hash, write_json, write_text
from .errors import ConfigError, PaserError

log = logging.getLogger(__name__)

STAGES = ("prune", "select", "recover", "evaluate")
DEMO_CONFIG = "demo.yaml"


# ------------------------------------------------------------------------------------------- config
def _section_fields(cls: type, wired: set[str]) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.name not in wired}


def _section_spec() -> dict[str, tuple[type, set[str], dict[str, Any]]]:
    """Section -> (library config class, fields the pipeline wires, extra pipeline-only keys with defaults)."""
    from .evaluate import EvaluateConfig
    from .prune import PruneConfig
    from .recover import RecoverConfig
    from .select import SelectConfig

    return {
        "prune": (PruneConfig, {"model", "out"}, {}),
        "select": (SelectConfig, {"original", "pruned", "data", "out", "method", "columns", "duplicates", "limit",
                                  "cache_dir", "dtype", "bad_records"}, {"methods": ["paser", "random"]}),
        "recover": (RecoverConfig, {"model", "data", "out", "resume", "limit", "dtype", "bad_records"}, {}),
        "evaluate": (EvaluateConfig, {"models", "out", "labels", "dtype"}, {"skip_missing_task_dir": False}),
    }


DATA_KEYS = {"source": "demo", "columns": None, "duplicates": "keep", "limit": None, "bad_records": "skip"}
TOP_KEYS = {"model", "dtype", "threads", "out", "prune", "pruned", "data", "select", "recover", "evaluate"}


@dataclass
class PipelineConfig:
    """A validated pipeline config: section dicts hold only known keys, with defaults filled in."""

    model: str
    out: str
    dtype: str
    pruned: str | None
    prune: dict[str, Any] | None
    data: dict[str, Any]
    select: dict[str, Any]
    recover: dict[str, Any]
    evaluate: dict[str, Any]
    source: str = "<dict>"  # where the config came from, for messages
    threads: int | None = None  # torch CPU threads (None: the CPUs this process may use)

    def as_dict(self) -> dict[str, Any]:
        return {"model": self.model, "dtype": self.dtype, "threads": self.threads, "out": self.out, "pruned": self.pruned,
                "prune": self.prune, "data": self.data, "select": self.select, "recover": self.recover,
                "evaluate": self.evaluate}


def _check_section(name: str, values: Any, cls: type, wired: set[str], extra: dict[str, Any], where: str,
                   probe: dict[str, Any]) -> dict[str, Any]:
    from pydantic import TypeAdapter, ValidationError

    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: section '{name}' must be a mapping, not {type(values).__name__}")
    fields = _section_fields(cls, wired)
    known = set(fields) | set(extra)
    for key in values:
        if key not in known:
            raise ConfigError(f"{where}: unknown key '{name}.{key}' (known: {', '.join(sorted(known))})")
    own = {k: v for k, v in values.items() if k in fields}
    try:  # type-check the values through the library dataclass, with the wired fields stubbed
        config = TypeAdapter(cls).validate_python({**probe, **own})
    except ValidationError as exc:
        error = exc.errors()[0]
        location = ".".join(str(p) for p in error["loc"])
        raise ConfigError(f"{where}: {name}.{location}: {error['msg']} (got {error.get('input')!r})") from None
    resolved = {k: getattr(config, k) for k in fields}
    for key, default in extra.items():
        resolved[key] = values.get(key, default)
    return resolved


def parse_config(raw: Any, where: str = "<config>") -> PipelineConfig:
    """Validate a config mapping (as read from YAML); raises :class:`ConfigError` naming the bad key."""
    from .models import DEFAULT_MODEL
    from .select import METHODS as SELECT_METHODS

    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the config must be a mapping of sections")
    for key in raw:
        if key not in TOP_KEYS:
            raise ConfigError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(TOP_KEYS))})")
    if raw.get("pruned") and raw.get("prune"):
        raise ConfigError(f"{where}: give either 'prune' (settings) or 'pruned' (an already pruned model), not both")
    model = str(raw.get("model") or DEFAULT_MODEL)
    dtype = str(raw.get("dtype", "auto"))
    if dtype not in {"auto", "bf16", "fp32"}:
        raise ConfigError(f"{where}: dtype must be auto, bf16 or fp32, not '{dtype}'")
    spec = _section_spec()

    data = raw.get("data") or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: section 'data' must be a mapping")
    for key in data:
        if key not in DATA_KEYS:
            raise ConfigError(f"{where}: unknown key 'data.{key}' (known: {', '.join(DATA_KEYS)})")
    data = {**DATA_KEYS, **data}
    if data["limit"] is not None and (not isinstance(data["limit"], int) or data["limit"] < 1):
        raise ConfigError(f"{where}: data.limit must be a positive integer, not {data['limit']!r}")
    if data["bad_records"] not in ("skip", "error"):
        raise ConfigError(f"{where}: data.bad_records must be skip or error, not {data['bad_records']!r}")
    threads = raw.get("threads")
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool) or threads < 1):
        raise ConfigError(f"{where}: threads must be a positive integer, not {threads!r}")

    prune = None
    if not raw.get("pruned"):
        prune = _check_section("prune", raw.get("prune"), *spec["prune"], where, {"model": model, "out": "-"})
    select = _check_section("select", raw.get("select"), *spec["select"], where,
                            {"original": model, "pruned": "-", "data": "-", "budget": 0.2})
    methods = select["methods"]
    if isinstance(methods, str):
        methods = [methods]
    if not methods or any(m not in SELECT_METHODS for m in methods) or len(set(methods)) != len(methods):
        raise ConfigError(f"{where}: select.methods must list distinct methods from {', '.join(SELECT_METHODS)}, "
                          f"not {select['methods']!r}")
    select["methods"] = list(methods)
    recover = _check_section("recover", raw.get("recover"), *spec["recover"], where,
                             {"model": "-", "data": "-", "out": "-"})
    evaluate = _check_section("evaluate", raw.get("evaluate"), *spec["evaluate"], where, {"models": ["-"]})
    config = PipelineConfig(model=model, out=str(raw.get("out") or "runs/paser"), dtype=dtype,
                            pruned=str(raw["pruned"]) if raw.get("pruned") else None, prune=prune, data=data,
                            select=select, recover=recover, evaluate=evaluate, source=where, threads=threads)
    _semantic_checks(config)
    return config


def _semantic_checks(config: PipelineConfig) -> None:
    """Each library config's own validate(), so bad values fail before the first stage."""
    from .evaluate import EvaluateConfig
    from .prune import PruneConfig
    from .recover import RecoverConfig
    from .select import SelectConfig

    checks = []
    if config.prune is not None:
        checks.append(("prune", lambda: PruneConfig(model=config.model, out="-", **config.prune).validate()))
    for method in config.select["methods"]:
        checks.append(("select", lambda m=method: _select_config(config, "-", m, "-").validate()))
    checks.append(("recover", lambda: RecoverConfig(model="-", data="-", out="-", bad_records=config.data["bad_records"],
                                                    **config.recover).validate()))
    checks.append(("evaluate", lambda: EvaluateConfig(**_evaluate_kwargs(config, ["-"], "-")).validate()))
    for section, check in checks:
        try:
            check()
        except ConfigError as exc:
            raise ConfigError(f"{config.source}: {section}: {exc}") from None


def load_config(path: str | Path) -> PipelineConfig:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f": line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    return parse_config(raw, where=str(path))


def demo_config_text() -> str:
    """The shipped demo config (``paser demo --show-config``)."""
    return resources.files("paser").joinpath("configs", DEMO_CONFIG).read_text(encoding="utf-8")


# ------------------------------------------------------------------------------------- stage wiring
def _select_config(config: PipelineConfig, pruned: str, method: str, out: str | Path) -> Any:
    from .select import SelectConfig

    settings = {k: v for k, v in config.select.items() if k != "methods"}
    return SelectConfig(original=config.model, pruned=pruned, data=config.data["source"], out=out, method=method,
                        columns=config.data["columns"], duplicates=config.data["duplicates"],
                        limit=config.data["limit"], bad_records=config.data["bad_records"], dtype=config.dtype,
                        **settings)


def _evaluate_kwargs(config: PipelineConfig, models: list[str], out: str | Path,
                     labels: list[str] | None = None) -> dict[str, Any]:
    settings = dict(config.evaluate)
    skip_missing = settings.pop("skip_missing_task_dir")
    task_dir = settings.get("task_dir")
    if task_dir is not None and skip_missing and not Path(task_dir).is_dir():
        settings["tasks"] = []  # e.g. the demo without ../shared/data/eval
    return {**settings, "models": models, "out": out, "labels": labels, "dtype": config.dtype}


def _data_identity(config: PipelineConfig) -> Any:
    source = config.data["source"]
    path = Path(source)
    return file_fingerprint(path) if path.is_file() else source


def _model_identity(spec: str) -> str:
    from .models import model_fingerprint

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
        marker = self._marker(directory)
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
        write_json(directory / "stage.json", {"hash": digest, "status": "running", "inputs": inputs})
        log.info("%s: running", name)
        notes: dict[str, Any] = {"stage": "miss", "resumed": resumable}
        t0 = time.perf_counter()
        with _PeakMemory() as memory:
            yield notes
        seconds, peak = round(time.perf_counter() - t0, 2), round(memory.peak / 1024**3, 3)
        write_json(directory / "stage.json", {"hash": digest, "status": "done", "inputs": inputs, "seconds": seconds,
                                              "peak_rss_gb": peak, "finished": time.strftime("%Y-%m-%dT%H:%M:%S")})
        self.records.append(StageRecord(name, str(directory), digest, False, seconds, peak, notes))
        faults.reached("run.stage_done")


def run_pipeline(config: PipelineConfig, out: str | Path | None = None, from_stage: str | None = None) -> dict:
    """Run (or resume) the pipeline; returns what ``OUT/run.json`` holds."""
    from .evaluate import EvaluateConfig, run_evaluation
    from .prune import PruneConfig, run_prune
    from .recover import RecoverConfig, run_recovery
    from .report import build_report
    from .select import run_selection

    if from_stage is not None and from_stage not in STAGES:
        raise ConfigError(f"--from must be one of {', '.join(STAGES)}, not '{from_stage}'")
    if config.threads is not None:
        from .runtime import configure_threads

        configure_threads(config.threads)
    out = Path(out or config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    runner = _Runner(config, out, from_stage)
    write_text(out / "config.yaml", _yaml(config.as_dict()))

    # prune (or take the given pruned model)
    model_id = _model_identity(config.model)
    if config.pruned is not None:
        pruned, prune_hash = config.pruned, stable_hash("given", _model_identity(config.pruned))
        prune_label = "pruned"
    else:
        directory = out / "prune"
        inputs = {"model": model_id, "prune": config.prune}
        with runner.stage("prune", directory, inputs) as notes:
            if notes is not None:
                run_prune(PruneConfig(model=config.model, out=directory, **config.prune))
        pruned, prune_hash = str(directory), runner.records[-1].hash
        prune_label = f"pruned ({config.prune['method']} {config.prune['sparsity']:g})"

    # select and recover, per method
    data_id = _data_identity(config)
    recovered: dict[str, str] = {}
    recover_hashes = {}
    for method in config.select["methods"]:
        directory = out / "select" / method
        inputs = {"model": model_id, "pruned": prune_hash, "data": data_id, "data_settings": config.data,
                  "select": {k: v for k, v in config.select.items() if k != "methods"}, "method": method,
                  "dtype": config.dtype}
        with runner.stage("select", directory, inputs) as notes:
            if notes is not None:
                summary = run_selection(_select_config(config, pruned, method, directory)).summary
                notes.update(scores_from_cache=summary["scores_from_cache"],
                             embeddings_from_cache=summary.get("embeddings_from_cache"),
                             clusters_from_cache=summary.get("clusters_from_cache"))
        select_hash = runner.records[-1].hash

        directory = out / "recover" / method
        inputs = {"pruned": prune_hash, "selection": select_hash, "recover": config.recover, "dtype": config.dtype}
        with runner.stage("recover", directory, inputs) as notes:
            if notes is not None:
                run_recovery(RecoverConfig(model=pruned, data=str(out / "select" / method / "selected.jsonl"),
                                           out=directory, dtype=config.dtype,
                                           bad_records=config.data["bad_records"], **config.recover))
        recovered[method] = str(directory / "merged")
        recover_hashes[method] = runner.records[-1].hash

    # evaluate everything side by side
    directory = out / "evaluate"
    models = [config.model, pruned, *recovered.values()]
    labels = ["dense", prune_label, *(f"{prune_label} + {m}" for m in recovered)]
    evaluate_kwargs = _evaluate_kwargs(config, models, directory / "results.json", labels)
    inputs = {"model": model_id, "pruned": prune_hash, "recovered": recover_hashes,
              "evaluate": {k: v for k, v in evaluate_kwargs.items() if k not in ("models", "out")}}
    with runner.stage("evaluate", directory, inputs) as notes:
        if notes is not None:
            run_evaluation(EvaluateConfig(**evaluate_kwargs))

    run = {"config": config.as_dict(), "out": str(out), "from_stage": from_stage,
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
