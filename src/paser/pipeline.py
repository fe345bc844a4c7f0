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
from typing import Any, Iterator, Sequence

from . import distributed, faults
from .cache import file_fingerprint, stable_hash, write_json, write_text
from .errors import ConfigError, PaserError

log = logging.getLogger(__name__)

STAGES = ("data", "prune", "select", "recover", "evaluate")


# ------------------------------------------------------------------------------------------- config
def _declared(settings: dict[str, Any], versions: dict[str, Any]) -> dict[str, Any]:
    """A stage's settings as they enter its hash: every declared field with its value (defaults included, so a
    changed default redoes the stage) and the ``version`` of each registered object that reads them (so a change
    of behaviour under the same settings does too). Nothing is kept by hand."""
    return {"settings": settings, "versions": versions}


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
        "evaluate": (EvaluateConfig, {"models", "out", "labels", "dtype", "fidelity_to"},
                     {"skip_missing_task_dir": False, "skip_missing_ppl": False, "fidelity": True}),
    }


DATA_KEYS = {"source": "demo", "columns": None, "duplicates": "keep", "limit": None, "bad_records": "skip",
             "sample": None, "heldout": None, "calibration": None}
TOP_KEYS = {"model", "dtype", "threads", "out", "prune", "pruned", "data", "select", "recover", "evaluate", "arms",
            "seeds", "baseline"}
ARM_KEYS = {"name", "method", "recipe", "select", "recover", "seeds"}
HELDOUT, CALIBRATION = "@heldout", "@calibration"  # the data stage's files, usable as evaluate / prune inputs


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
    arms: list[dict[str, Any]] = field(default_factory=list)  # {name, method, select, recover, seeds}
    seeds: list[int] = field(default_factory=lambda: [0])
    # the arms every other is compared with: the first is the headline (comparison.json); each further one
    # writes comparison-vs-<arm>.json (e.g. random trained with the candidate's objective: what selection adds)
    baselines: list[str] = field(default_factory=list)

    @property
    def baseline(self) -> str | None:
        return self.baselines[0] if self.baselines else None

    def as_dict(self) -> dict[str, Any]:
        baseline = self.baselines if len(self.baselines) > 1 else self.baseline
        return {"model": self.model, "dtype": self.dtype, "threads": self.threads, "out": self.out,
                "arms": self.arms, "seeds": self.seeds, "baseline": baseline, "pruned": self.pruned,
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
    seeds = raw.get("seeds", [select["seed"]])
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds)):
        raise ConfigError(f"{where}: seeds must be a list of distinct integers, not {seeds!r}")
    arms = _parse_arms(raw.get("arms"), select, recover, seeds, spec, where)
    names = [a["name"] for a in arms]
    baseline = raw.get("baseline", "random" if "random" in names and len(arms) > 1 else None)
    baselines = [] if baseline is None else [baseline] if isinstance(baseline, str) else baseline
    if not isinstance(baselines, list) or not all(isinstance(b, str) for b in baselines) \
            or len(set(baselines)) != len(baselines) or (baseline is not None and not baselines):
        raise ConfigError(f"{where}: baseline must be an arm's name or a list of distinct arm names, not {baseline!r}")
    for name in baselines:
        if name not in names:
            raise ConfigError(f"{where}: baseline '{name}' is not an arm (arms: {', '.join(names)})")
    _check_data_sampling(data, where)
    evaluate = _check_section("evaluate", raw.get("evaluate"), *spec["evaluate"], where, {"models": ["-"]})
    config = PipelineConfig(model=model, out=str(raw.get("out") or "runs/paser"), dtype=dtype,
                            pruned=str(raw["pruned"]) if raw.get("pruned") else None, prune=prune, data=data,
                            select=select, recover=recover, evaluate=evaluate, source=where, threads=threads,
                            arms=arms, seeds=list(seeds), baselines=baselines)
    _semantic_checks(config)
    return config


def _semantic_checks(config: PipelineConfig) -> None:
    """Each library config's own validate(), so bad values fail before the first stage."""
    from .evaluate import EvaluateConfig
    from .prune import PruneConfig
    from .recover import RecoverConfig

    checks = []
    if config.prune is not None:
        checks.append(("prune", lambda: PruneConfig(model=config.model, out="-", **config.prune).validate()))
    for arm in config.arms:
        checks.append((f"arm '{arm['name']}'", lambda a=arm: _select_config(config, "-", a, a["seeds"][0], "-").validate()))
        checks.append((f"arm '{arm['name']}'", lambda a=arm: RecoverConfig(
            model="-", data="-", out="-", bad_records=config.data["bad_records"],
            **_arm_recover(config, a, a["seeds"][0])).validate()))
    checks.append(("evaluate", lambda: EvaluateConfig(**_evaluate_kwargs(config, ["-"], "-")).validate()))
    for section, check in checks:
        try:
            check()
        except ConfigError as exc:
            raise ConfigError(f"{config.source}: {section}: {exc}") from None


SHIPPED_CONFIGS = ("demo", "compare", "study", "recovery")


def shipped_config_text(name: str) -> str:
    """A config shipped with paser (``paser demo --show-config --config NAME``)."""
    if name not in SHIPPED_CONFIGS:
        raise ConfigError(f"no shipped config '{name}' (shipped: {', '.join(SHIPPED_CONFIGS)})")
    return resources.files("paser").joinpath("configs", f"{name}.yaml").read_text(encoding="utf-8")


def load_config(path: str | Path, overrides: Sequence[str] = (), task_dir: str | None = None,
                ppl: Sequence[str] = ()) -> PipelineConfig:
    """Read and validate a YAML config; a bare shipped name (``demo``, ``compare``, ``study``) reads the
    shipped one. ``overrides``: ``SECTION.KEY=VALUE`` or ``KEY=VALUE`` (VALUE read as YAML), applied first;
    then ``task_dir`` and ``ppl`` replace the evaluation data (``paser run --task-dir / --ppl``), so what is
    validated is the config that will run."""
    import yaml

    path = Path(path)
    if not path.is_file() and str(path) in SHIPPED_CONFIGS:
        raw, where = yaml.safe_load(shipped_config_text(str(path))), f"{path} (shipped config)"
    elif not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    else:
        try:
            raw, where = yaml.safe_load(path.read_text(encoding="utf-8")), str(path)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            line = f": line {mark.line + 1}" if mark else ""
            raise ConfigError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects KEY=VALUE or SECTION.KEY=VALUE, not '{item}'")
        section, _, field_name = key.rpartition(".")
        target = raw.setdefault(section, {}) if section else raw
        if not isinstance(target, dict):
            raise ConfigError(f"--set {item}: '{section}' is not a section")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {item}: the value is not valid YAML ({getattr(exc, 'problem', exc)})") from None
        # YAML 1.1 reads 2:4 as a base-60 number; an N:M pattern is meant
        target[field_name] = value if isinstance(parsed, int) and ":" in value else parsed
    if task_dir is not None or ppl:
        evaluate = raw.get("evaluate") or {}
        if not isinstance(evaluate, dict):
            raise ConfigError(f"{where}: section 'evaluate' must be a mapping")
        if task_dir is not None:
            evaluate.update(task_dir=str(task_dir), skip_missing_task_dir=False)
        if ppl:
            evaluate["ppl"] = [str(p) for p in ppl]
        raw["evaluate"] = evaluate
    return parse_config(raw, where=where + (f" with --set {' '.join(overrides)}" if overrides else ""))


def demo_config_text() -> str:
    """The shipped demo config (``paser demo --show-config``)."""
    return shipped_config_text("demo")


def with_arms(config: PipelineConfig, names: list[str]) -> PipelineConfig:
    """The config restricted to the named arms (``paser run --arms``): run the decisive arms first; a later
    run of the full config reuses every stage they finished."""
    known = [a["name"] for a in config.arms]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"{config.source}: no arm named {', '.join(unknown)} (arms: {', '.join(known)})")
    arms = [a for a in config.arms if a["name"] in names]
    return dataclasses.replace(config, arms=arms, baselines=[b for b in config.baselines if b in names])


def with_evaluation_data(config: PipelineConfig, task_dir: str | None = None, ppl: list[str] | None = None
                         ) -> PipelineConfig:
    """The config with its zero-shot task directory and perplexity texts replaced (command-line overrides),
    so one config can be rerun on other evaluation data unchanged."""
    raw = config.as_dict()
    if task_dir is not None:
        raw["evaluate"] = {**raw["evaluate"], "task_dir": task_dir, "skip_missing_task_dir": False}
    if ppl:
        raw["evaluate"] = {**raw["evaluate"], "ppl": list(ppl)}
    if config.pruned is None:
        raw.pop("pruned")
    else:
        raw.pop("prune")
    return parse_config(raw, where=config.source)


# ------------------------------------------------------------------------------------- stage wiring
def _parse_arms(raw_arms: Any, select: dict, recover: dict, seeds: list[int], spec: dict, where: str) -> list[dict]:
    """Arms from ``arms:`` (or the ``select.methods`` shorthand), each with validated overrides and seeds."""
    import re

    from .select import METHODS as SELECT_METHODS

    if raw_arms is None:
        raw_arms = [{"name": m, "method": m} for m in select["methods"]]
    if not isinstance(raw_arms, list) or not raw_arms:
        raise ConfigError(f"{where}: arms must be a non-empty list of {{name, method, select, recover, seeds}}")
    arms = []
    for i, arm in enumerate(raw_arms):
        if not isinstance(arm, dict):
            raise ConfigError(f"{where}: arms[{i}] must be a mapping")
        for key in arm:
            if key not in ARM_KEYS:
                raise ConfigError(f"{where}: arms[{i}]: unknown key '{key}' (known: {', '.join(sorted(ARM_KEYS))})")
        recipe = arm.get("recipe")
        if recipe is not None:  # a named recipe's settings, under the arm's own overrides
            from .recipes import recipe_settings

            rs, rr = recipe_settings(recipe, "select"), recipe_settings(recipe, "recover")
            arm = {**arm, "method": arm.get("method") or rs.pop("method"),
                   "select": {**{k: v for k, v in rs.items() if k != "method"}, **(arm.get("select") or {})},
                   "recover": {**rr, **(arm.get("recover") or {})}}
        name, method = str(arm.get("name") or arm.get("method") or ""), arm.get("method")
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.+-]*", name):
            raise ConfigError(f"{where}: arms[{i}]: name must be letters, digits, '_', '.', '+' or '-', not {name!r}")
        if method not in SELECT_METHODS:
            raise ConfigError(f"{where}: arms[{i}] ({name}): method must be one of {', '.join(SELECT_METHODS)}, "
                              f"not {method!r}")
        overrides = {}
        for section in ("select", "recover"):
            values = arm.get(section) or {}
            base = {k: v for k, v in (select if section == "select" else recover).items() if k != "methods"}
            if not isinstance(values, dict):
                raise ConfigError(f"{where}: arms[{i}].{section} must be a mapping")
            if "methods" in values or "seed" in values:
                raise ConfigError(f"{where}: arms[{i}].{section}: set seeds with 'seeds', methods with 'method'")
            probe = ({"original": "-", "pruned": "-", "data": "-", "budget": 0.2} if section == "select"
                     else {"model": "-", "data": "-", "out": "-"})
            cls, wired, _ = spec[section]
            checked = _check_section(f"arms[{i}].{section}", {**base, **values}, cls, wired, {}, where, probe)
            overrides[section] = {k: checked[k] for k in values}
        arm_seeds = arm.get("seeds", seeds)
        if (not isinstance(arm_seeds, list) or not arm_seeds
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in arm_seeds)):
            raise ConfigError(f"{where}: arms[{i}].seeds must be a non-empty list of integers")
        arms.append({"name": name, "method": method, "select": overrides["select"], "recover": overrides["recover"],
                     "seeds": list(arm_seeds), **({"recipe": recipe} if recipe else {})})
    names = [a["name"] for a in arms]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: arm names must be distinct, not {names}")
    return arms


def _check_data_sampling(data: dict, where: str) -> None:
    sample = data["sample"]
    if sample is not None:
        if not isinstance(sample, dict) or set(sample) - {"n", "seed", "stratify"} or not isinstance(sample.get("n"), int):
            raise ConfigError(f"{where}: data.sample must be {{n: INT, seed: INT, stratify: FIELD}}, not {sample!r}")
    for key in ("heldout", "calibration"):
        if data[key] is not None and (not isinstance(data[key], int) or data[key] < 1):
            raise ConfigError(f"{where}: data.{key} must be a positive integer, not {data[key]!r}")
        if data[key] is not None and sample is None:
            raise ConfigError(f"{where}: data.{key} needs data.sample (they are drawn from what the sample leaves)")


def _arm_key(arm: dict, seed: int) -> str:
    """The arm's folder under select/ and recover/: ``<name>/s<seed>``, whatever the number of seeds, so a
    one-seed screen extended to more seeds reuses what it finished."""
    return f"{arm['name']}/s{seed}"


def _arm_recover(config: PipelineConfig, arm: dict, seed: int) -> dict[str, Any]:
    from .objectives import OBJECTIVES
    from .targets import TARGETS

    settings = {**config.recover, **arm["recover"], "seed": seed}
    if settings["loss"] == "auto":
        settings["loss"] = "mix"  # the pipeline always knows the original model (paser.recover.resolve_loss)
    needs_original = OBJECTIVES.get(settings["loss"]).needs_teacher or TARGETS.get(settings["targets"]).needs_original
    if needs_original and not settings.get("teacher"):
        settings["teacher"] = config.model  # distillation's teacher and the targets' author: the original model
    return settings


def _select_config(config: PipelineConfig, pruned: str, arm: dict, seed: int, out: str | Path,
                   data_source: str | None = None) -> Any:
    from .select import SelectConfig

    settings = {k: v for k, v in config.select.items() if k != "methods"}
    settings.update(arm["select"], seed=seed)
    return SelectConfig(original=config.model, pruned=pruned, data=data_source or config.data["source"], out=out,
                        method=arm["method"], columns=config.data["columns"], duplicates=config.data["duplicates"],
                        limit=config.data["limit"], bad_records=config.data["bad_records"], dtype=config.dtype,
                        **settings)


def _resolve(value: Any, files: dict[str, str]) -> Any:
    """``@heldout`` / ``@calibration`` become the data stage's files."""
    if isinstance(value, str) and value.startswith("@"):
        if value not in files:
            raise ConfigError(f"'{value}' needs data.sample and data.{value[1:]} in the config")
        return files[value]
    return value


def _evaluate_kwargs(config: PipelineConfig, models: list[str], out: str | Path,
                     labels: list[str] | None = None, files: dict[str, str] | None = None) -> dict[str, Any]:
    settings = dict(config.evaluate)
    if files is not None:
        settings["response_ppl"] = [_resolve(src, files) for src in settings["response_ppl"]]
    else:  # validation before the data stage has run: a placeholder that exists
        settings["response_ppl"] = [src if not src.startswith("@") else "demo-heldout" for src in settings["response_ppl"]]
    skip_missing = settings.pop("skip_missing_task_dir")
    task_dir = settings.get("task_dir")
    if task_dir is not None and skip_missing and not Path(task_dir).is_dir():
        if settings["tasks"] and files is not None:
            log.warning("zero-shot tasks %s skipped: %s not found", ", ".join(settings["tasks"]), task_dir)
        settings["tasks"] = []  # e.g. the demo without ../shared/data/eval
    if settings.pop("skip_missing_ppl"):
        missing = [path for path in settings["ppl"] if not Path(path).is_file()]
        if missing and files is not None:
            log.warning("perplexity text(s) %s skipped: not found", ", ".join(missing))
        settings["ppl"] = [path for path in settings["ppl"] if path not in missing]
    # fidelity to the original (the config's model) on the perplexity texts' windows, unless turned off
    settings["fidelity_to"] = config.model if settings.pop("fidelity") and settings["ppl"] else None
    return {**settings, "models": models, "out": out, "labels": labels, "dtype": config.dtype}


def _data_identity(config: PipelineConfig) -> Any:
    source = config.data["source"]
    path = Path(source)
    return file_fingerprint(path) if path.is_file() else source


def _model_identity(spec: str) -> str:
    from .models import model_fingerprint

    return model_fingerprint(spec)


def sample_data(data: dict[str, Any], directory: Path) -> dict[str, Any]:
    """Write ``slice.jsonl`` (``data.sample``: n records, seeded, stratified by a field when present) and,
    from the records the slice leaves, ``heldout.jsonl`` and ``calibration.jsonl``; returns counts."""
    import json
    import random

    from .cache import write_jsonl
    from .data import ColumnMap, load_records

    columns = ColumnMap.parse(data["columns"]) if data["columns"] else None
    records = load_records(data["source"], columns, duplicates="drop", bad_records=data["bad_records"])
    sample = data["sample"]
    rng = random.Random(sample.get("seed", 0))
    field_name = sample.get("stratify")

    def draw(pool: list, n: int) -> list:
        groups: dict[Any, list] = {}
        for r in pool:
            groups.setdefault(r.raw.get(field_name) if field_name else None, []).append(r)
        n = min(n, len(pool))
        quotas = {g: n * len(m) / len(pool) for g, m in groups.items()}
        counts = {g: int(q) for g, q in quotas.items()}
        for g in sorted(groups, key=lambda g: (-(quotas[g] - counts[g]), str(g)))[: n - sum(counts.values())]:
            counts[g] += 1  # largest remainder, so the slice has exactly n records
        chosen = [r for g in sorted(groups, key=str) for r in rng.sample(groups[g], counts[g])]
        return sorted(chosen, key=lambda r: r.index)

    picked = draw(records, sample["n"])
    rest = [r for r in records if r.index not in {p.index for p in picked}]
    out: dict[str, Any] = {"slice": len(picked), "skipped_records": records.skipped.total}
    write_jsonl(directory / "slice.jsonl", (r.raw for r in picked))
    for key in ("heldout", "calibration"):
        if data[key]:
            part = draw(rest, data[key])
            taken = {r.index for r in part}
            rest = [r for r in rest if r.index not in taken]
            write_jsonl(directory / f"{key}.jsonl", (r.raw for r in part))
            out[key] = len(part)
    if field_name:
        counts: dict[str, int] = {}
        for r in picked:
            counts[str(r.raw.get(field_name))] = counts.get(str(r.raw.get(field_name)), 0) + 1
        out["slice_by_" + field_name] = counts
    (directory / "sample.json").write_text(json.dumps(out, indent=2))
    return out


def _read_cost(directory: Path) -> dict:
    import json

    try:
        return json.loads((directory / "selection.json").read_text()).get("cost", {})
    except (FileNotFoundError, ValueError):
        return {}


def _mean_cost(costs: list[dict]) -> dict:
    keys = {k for c in costs for k in c}
    return {k: sum(c.get(k) or 0 for c in costs) / max(len(costs), 1) for k in keys}


def write_comparison(directory: Path, arm_labels: dict[str, dict[int, str]], baselines: list[str],
                     references: dict[str, str], costs: dict[str, dict]) -> dict | None:
    """``comparison.json`` and ``comparison.md`` beside the evaluation results (see :mod:`paser.compare`),
    against the first baseline; ``comparison-vs-<arm>.json`` / ``.md`` against each further one. Returns the
    headline comparison. Every earlier comparison file is removed first, so none outlives its run."""
    import json

    from .compare import compare_arms, comparison_files, comparison_stem, comparison_table

    results = json.loads((directory / "results.json").read_text())
    for stale in comparison_files(directory, ".json") + comparison_files(directory, ".md"):
        stale.unlink()
    headline = None
    for i, baseline in enumerate(baselines):
        comparison = compare_arms(results, arm_labels, baseline, references)
        if not comparison["metrics"]:
            return None
        comparison["costs"] = costs
        stem = comparison_stem(baseline, headline=i == 0)
        write_json(directory / f"{stem}.json", comparison)
        write_text(directory / f"{stem}.md", comparison_table(comparison, costs))
        headline = headline or comparison
    return headline


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


def run_pipeline(config: PipelineConfig, out: str | Path | None = None, from_stage: str | None = None) -> dict:
    """Run (or resume) the pipeline; returns what ``OUT/run.json`` holds (under a launcher, on rank 0; the other
    processes take part in scoring, training and evaluation and return an empty dict)."""
    from .evaluate import EvaluateConfig, run_evaluation
    from .objectives import OBJECTIVES
    from .prune import PRUNING_METHODS, PruneConfig, run_prune
    from .targets import TARGETS
    from .recover import RecoverConfig, run_recovery
    from .report import build_report
    from .select import run_selection
    from .strategies import get_strategy

    if from_stage is not None and from_stage not in STAGES:
        raise ConfigError(f"--from must be one of {', '.join(STAGES)}, not '{from_stage}'")
    if config.threads is not None:
        from .runtime import configure_threads

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
            select_settings = {k: v for k, v in dataclasses.asdict(select_config).items()
                               if k not in ("out", "original", "pruned", "data")}
            inputs = {"model": model_id, "pruned": prune_hash, "data": data_hash,
                      "select": _declared(select_settings,
                                          {"method": get_strategy(select_config.method).cache_version(select_config)})}
            with runner.stage("select", directory, inputs) as notes:
                if notes is not None:
                    summary = run_selection(select_config).summary
                    notes.update(scores_from_cache=summary["scores_from_cache"],
                                 embeddings_from_cache=summary.get("embeddings_from_cache"),
                                 clusters_from_cache=summary.get("clusters_from_cache"))
            select_hash = runner.records[-1].hash
            costs.setdefault(arm["name"], []).append(_read_cost(directory))

            directory = out / "recover" / key
            settings = _arm_recover(config, arm, seed)
            inputs = {"pruned": prune_hash, "selection": select_hash, "dtype": config.dtype,
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
