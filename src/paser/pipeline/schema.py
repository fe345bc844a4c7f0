"""The ``paser run`` config: its schema (sections fed to the library configs, arms, seeds, baselines), validation
before any stage runs, the shipped configs, and the wiring from a config to each stage's library config."""

from __future__ import annotations

import dataclasses
import logging
import re
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, ValidationError

from ..errors import ConfigError
from ..models import Dtype

# The stage modules are imported inside the functions that read their configs: they load torch, transformers and
# peft, and `import paser` (which imports this module) takes 1.8 s with them deferred, 5 s without.

log = logging.getLogger(__name__)


STAGES = ("data", "prune", "select", "recover", "evaluate", "export")


# ------------------------------------------------------------------------------------------- config
def declared_inputs(settings: dict[str, Any], versions: dict[str, Any]) -> dict[str, Any]:
    """A stage's settings as they enter its hash: every declared field with its value (defaults included, so a
    changed default redoes the stage) and the ``version`` of each registered object that reads them (so a change
    of behaviour under the same settings does too). Nothing is kept by hand."""
    return {"settings": settings, "versions": versions}


def _section_fields(cls: type, wired: set[str]) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls) if f.name not in wired}


def _section_spec() -> dict[str, tuple[type, set[str], dict[str, Any]]]:
    """Section -> (library config class, fields the pipeline wires, extra pipeline-only keys with defaults)."""
    from ..evaluate import MEASUREMENTS, EvaluateConfig
    from ..export import ExportConfig
    from ..prune import PruneConfig
    from ..recovery import RecoverConfig
    from ..selection import SelectConfig

    return {
        "export": (ExportConfig, {"model", "out"}, {}),
        "prune": (PruneConfig, {"model", "out"}, {}),
        "select": (SelectConfig, {"original", "pruned", "data", "out", "method", "columns", "duplicates", "limit",
                                  "cache_dir", "dtype", "bad_records"}, {"methods": ["paser", "random"]}),
        "recover": (RecoverConfig, {"model", "data", "out", "resume", "limit", "dtype", "bad_records"}, {}),
        "evaluate": (EvaluateConfig, {"models", "out", "labels", "dtype", "fidelity_to"},
                     {key: default for _, m in MEASUREMENTS.items() for key, default in m.pipeline_options.items()}),
    }


@dataclass
class DataSection:
    """``data``: where the records come from, and what the data stage cuts from them before any arm reads them."""

    source: str = "demo"  # a JSONL / JSON / Parquet / CSV file, a hub dataset id, or the embedded demo data
    columns: Any = None  # the record fields' names where they differ (paser.data.ColumnMap)
    duplicates: Literal["keep", "drop"] = "keep"
    limit: Annotated[int, Field(ge=1)] | None = None
    bad_records: Literal["skip", "error"] = "skip"
    sample: dict[str, Any] | None = None  # {n, seed, stratify}: the slice every arm selects from
    heldout: Annotated[int, Field(ge=1)] | None = None  # records set aside for evaluation (``@heldout``)
    calibration: Annotated[int, Field(ge=1)] | None = None  # records set aside for pruning (``@calibration``)


@dataclass
class ArmSpec:
    """One arm of ``arms``: a selection method (or a named recipe) with its select / recover overrides."""

    name: str | None = None
    method: str | None = None
    recipe: str | None = None
    select: dict[str, Any] | None = None
    recover: dict[str, Any] | None = None
    seeds: list[int] | None = None


DATA_KEYS = {f.name: f.default for f in dataclasses.fields(DataSection)}
ARM_KEYS = {f.name for f in dataclasses.fields(ArmSpec)}
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
    export: dict[str, Any] | None = None  # each recovered model written as a deployable checkpoint (paser.export)

    @property
    def baseline(self) -> str | None:
        return self.baselines[0] if self.baselines else None

    def as_dict(self) -> dict[str, Any]:
        baseline = self.baselines if len(self.baselines) > 1 else self.baseline
        return {"model": self.model, "dtype": self.dtype, "threads": self.threads, "out": self.out,
                "arms": self.arms, "seeds": self.seeds, "baseline": baseline, "pruned": self.pruned,
                "prune": self.prune, "data": self.data, "select": self.select, "recover": self.recover,
                "evaluate": self.evaluate, "export": self.export}


TOP_KEYS = set(PipelineConfig.__dataclass_fields__) - {"source", "baselines"} | {"baseline"}  # yaml: baseline


def _check_section(name: str, values: Any, cls: type, wired: set[str], extra: dict[str, Any], where: str,
                   probe: dict[str, Any]) -> dict[str, Any]:
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
    # type-check the values through the library dataclass, with the wired fields stubbed
    config = _validated(cls, {**probe, **own}, f"{where}: {name}")
    resolved = {k: getattr(config, k) for k in fields}
    for key, default in extra.items():
        resolved[key] = values.get(key, default)
    return resolved


def parse_config(raw: Any, where: str = "<config>") -> PipelineConfig:
    """Validate a config mapping (as read from YAML); raises :class:`ConfigError` naming the bad key."""
    from ..models import DEFAULT_MODEL
    from ..selection import METHODS as SELECT_METHODS

    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the config must be a mapping of sections")
    for key in raw:
        if key not in TOP_KEYS:
            raise ConfigError(f"{where}: unknown key '{key}' (known: {', '.join(sorted(TOP_KEYS))})")
    if raw.get("pruned") and raw.get("prune"):
        raise ConfigError(f"{where}: give either 'prune' (settings) or 'pruned' (an already pruned model), not both")
    model = str(raw.get("model") or DEFAULT_MODEL)
    dtype = str(raw.get("dtype", "auto"))
    if dtype not in typing.get_args(Dtype):
        raise ConfigError(f"{where}: dtype must be one of {', '.join(typing.get_args(Dtype))}, not '{dtype}'")
    spec = _section_spec()

    data = _check_data(raw.get("data"), where)
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
    baselines = _check_baselines(raw, [a["name"] for a in arms], where)
    _check_data_sampling(data, where)
    evaluate = _check_section("evaluate", raw.get("evaluate"), *spec["evaluate"], where, {"models": ["-"]})
    export = (_check_section("export", raw["export"], *spec["export"], where, {"model": "-", "out": "-"})
              if raw.get("export") is not None else None)
    config = PipelineConfig(model=model, out=str(raw.get("out") or "runs/paser"), dtype=dtype,
                            pruned=str(raw["pruned"]) if raw.get("pruned") else None, prune=prune, data=data,
                            select=select, recover=recover, evaluate=evaluate, source=where, threads=threads,
                            arms=arms, seeds=list(seeds), baselines=baselines, export=export)
    _semantic_checks(config)
    return config


def _check_data(data: Any, where: str) -> dict[str, Any]:
    """The ``data`` section with its defaults filled in."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: section 'data' must be a mapping")
    for key in data:
        if key not in DATA_KEYS:
            raise ConfigError(f"{where}: unknown key 'data.{key}' (known: {', '.join(DATA_KEYS)})")
    return dataclasses.asdict(_validated(DataSection, data, f"{where}: data"))


def _validated(cls: type, values: dict[str, Any], prefix: str) -> Any:
    """``cls`` built from ``values`` through pydantic; the first error names its key (``prefix.key: message``)."""
    try:
        return TypeAdapter(cls).validate_python(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        location = ".".join(str(p) for p in error["loc"])
        raise ConfigError(f"{prefix}.{location}: {error['msg']} (got {error.get('input')!r})") from None


def _check_baselines(raw: dict, names: list[str], where: str) -> list[str]:
    """The arms every other is compared with (default: random, when there is such an arm and another)."""
    baseline = raw.get("baseline", "random" if "random" in names and len(names) > 1 else None)
    baselines = [] if baseline is None else [baseline] if isinstance(baseline, str) else baseline
    if not isinstance(baselines, list) or not all(isinstance(b, str) for b in baselines) \
            or len(set(baselines)) != len(baselines) or (baseline is not None and not baselines):
        raise ConfigError(f"{where}: baseline must be an arm's name or a list of distinct arm names, not {baseline!r}")
    for name in baselines:
        if name not in names:
            raise ConfigError(f"{where}: baseline '{name}' is not an arm (arms: {', '.join(names)})")
    return baselines


def _semantic_checks(config: PipelineConfig) -> None:
    """Each library config's own validate(), so bad values fail before the first stage."""
    from ..evaluate import EvaluateConfig
    from ..prune import PruneConfig
    from ..recovery import RecoverConfig

    _check_section_read(config)
    checks = []
    if config.prune is not None:
        checks.append(("prune", lambda: PruneConfig(model=config.model, out="-", **config.prune).validate()))
    for arm in config.arms:
        checks.append((f"arm '{arm['name']}'", lambda a=arm: arm_select_config(config, "-", a, a["seeds"][0], "-").validate()))
        checks.append((f"arm '{arm['name']}'", lambda a=arm: RecoverConfig(
            model="-", data="-", out="-", bad_records=config.data["bad_records"],
            **arm_recover_settings(config, a, a["seeds"][0])).validate()))
    if config.export is not None:
        from ..export import ExportConfig

        checks.append(("export", lambda: ExportConfig(model="-", out="-", **config.export).validate()))
    checks.append(("evaluate", lambda: EvaluateConfig(**evaluate_kwargs(config, ["-"], "-")).validate()))
    for section, check in checks:
        try:
            check()
        except ConfigError as exc:
            raise ConfigError(f"{config.source}: {section}: {exc}") from None


# every YAML file in paser/configs/ is a shipped config, run by its name (the demo first: it is the one to start from)
SHIPPED_CONFIGS = tuple(sorted((f.name.removesuffix(".yaml") for f in resources.files("paser").joinpath("configs").iterdir()
                               if f.name.endswith(".yaml")), key=lambda name: (name != "demo", name)))


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

    if raw_arms is None:
        raw_arms = [{"name": m, "method": m} for m in select["methods"]]
    if not isinstance(raw_arms, list) or not raw_arms:
        raise ConfigError(f"{where}: arms must be a non-empty list of {{name, method, select, recover, seeds}}")
    arms = [_parse_arm(i, arm, select, recover, seeds, spec, where) for i, arm in enumerate(raw_arms)]
    names = [a["name"] for a in arms]
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}: arm names must be distinct, not {names}")
    return arms


def _parse_arm(i: int, arm: Any, select: dict, recover: dict, seeds: list[int], spec: dict, where: str) -> dict:
    """One arm: its name and method, its select and recover overrides checked against the sections, its seeds."""

    from ..selection import METHODS as SELECT_METHODS

    if not isinstance(arm, dict):
        raise ConfigError(f"{where}: arms[{i}] must be a mapping")
    for key in arm:
        if key not in ARM_KEYS:
            raise ConfigError(f"{where}: arms[{i}]: unknown key '{key}' (known: {', '.join(sorted(ARM_KEYS))})")
    recipe = arm.get("recipe")
    if recipe is not None:
        arm = _with_recipe(arm, recipe, recover)
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
    return {"name": name, "method": method, "select": overrides["select"], "recover": overrides["recover"],
            "seeds": list(arm_seeds), **({"recipe": recipe} if recipe else {})}


def _with_recipe(arm: dict, recipe: str, recover: dict) -> dict:
    """A named recipe's settings, under the arm's own overrides."""
    from ..recipes import recipe_settings

    rs, rr = recipe_settings(recipe, "select"), recipe_settings(recipe, "recover")
    unset = {k: v for k, v in recipe_settings(recipe, "unset").items() if recover.get(k) is None}
    return {**arm, "method": arm.get("method") or rs.pop("method"),
            "select": {**{k: v for k, v in rs.items() if k != "method"}, **(arm.get("select") or {})},
            "recover": {**rr, **unset, **(arm.get("recover") or {})}}


def _check_data_sampling(data: dict, where: str) -> None:
    sample = data["sample"]
    if sample is not None and (not isinstance(sample, dict) or set(sample) - {"n", "seed", "stratify"}
                               or not isinstance(sample.get("n"), int)):
        raise ConfigError(f"{where}: data.sample must be {{n: INT, seed: INT, stratify: FIELD}}, not {sample!r}")
    for key in ("heldout", "calibration"):
        if data[key] is not None and sample is None:
            raise ConfigError(f"{where}: data.{key} needs data.sample (they are drawn from what the sample leaves)")


def arm_key(arm: dict, seed: int) -> str:
    """The arm's folder under select/ and recover/: ``<name>/s<seed>``, whatever the number of seeds, so a
    one-seed screen extended to more seeds reuses what it finished."""
    return f"{arm['name']}/s{seed}"


def arm_recover_settings(config: PipelineConfig, arm: dict, seed: int, pruned: str | None = None) -> dict[str, Any]:
    """The arm's recovery settings: the ``recover`` section's under the arm's own, its seed, and the original model
    as ``teacher`` where what it runs reads one (the pipeline always knows the original); less every option of the
    section that what the arm runs does not read. An option of the arm's own that it does not read is an error
    naming who reads it. Before the pruned model exists ``auto`` reads what any of its outcomes reads; with
    ``pruned`` it is resolved (:func:`paser.recovery.resolve_recovery`) and what it chose decides."""
    from ..recovery import RecoverConfig, check_options_read, fields_read, resolve_recovery

    settings = {**config.recover, **arm["recover"], "seed": seed}
    probe = RecoverConfig(model=pruned or "-", data="-", out="-", **settings)
    if not settings.get("teacher") and "teacher" in fields_read(probe):
        settings["teacher"] = config.model
        probe = dataclasses.replace(probe, teacher=config.model)
    why = ""
    if pruned is not None:
        resolution = resolve_recovery(probe, announce=False)
        probe, why = resolution.config, resolution.why("method")
    try:
        check_options_read([k for k in arm["recover"] if k in settings], probe, why)
    except ConfigError as exc:
        raise ConfigError(f"arm '{arm['name']}': {exc}") from None
    read = fields_read(probe)
    return {k: v for k, v in settings.items() if k in read}


def recover_stage_inputs(recover_config: Any) -> dict[str, Any]:
    """What the recovery stage's hash holds of its settings: every setting the resolved recovery reads (its
    resume key, less the pruned model's path: the prune stage's hash stands for it) and the version of each
    registered object that reads them. The same declarations decide the resume key, so a changed option reruns
    the stage exactly when it reruns the method."""
    from ..objectives import OBJECTIVES
    from ..recovery import RECOVERY_METHODS, fields_read, resolve_recovery
    from ..recovery.reads import resume_key_settings
    from ..targets import TARGETS

    resolved = resolve_recovery(recover_config, announce=False).config
    read = fields_read(resolved)
    versions = {"method": RECOVERY_METHODS.get(resolved.method).version}
    if "loss" in read:
        versions["objective"] = OBJECTIVES.get(resolved.loss).version
    if "targets" in read:
        versions["targets"] = TARGETS.get(resolved.targets).version
    settings = {k: v for k, v in resume_key_settings(resolved).items() if k != "model"}
    return declared_inputs(settings, versions)


def _check_section_read(config: PipelineConfig) -> None:
    """An option of the ``recover`` section given away from its default that no arm reads is an error (arms of
    different methods share the section, so each arm reads its own part of it)."""
    from ..recovery import RecoverConfig, fields_read, readers
    from ..recovery.reads import given_options

    section = RecoverConfig(model="-", data="-", out="-", **config.recover)
    read = set().union(*(fields_read(RecoverConfig(model="-", data="-", out="-", **{**config.recover, **a["recover"]}))
                         for a in config.arms))
    stray = [name for name in given_options(section) if name not in read]
    if stray:
        owners = readers()
        raise ConfigError(f"{config.source}: recover: " + "; ".join(
            f"{name} is read by {', '.join(owners.get(name, ['nothing']))}" for name in stray)
            + ", and no arm runs one of them")


def arm_select_config(config: PipelineConfig, pruned: str, arm: dict, seed: int, out: str | Path,
                   data_source: str | None = None) -> Any:
    from ..selection import SelectConfig

    settings = {k: v for k, v in config.select.items() if k != "methods"}
    settings.update(arm["select"], seed=seed)
    return SelectConfig(original=config.model, pruned=pruned, data=data_source or config.data["source"], out=out,
                        method=arm["method"], columns=config.data["columns"], duplicates=config.data["duplicates"],
                        limit=config.data["limit"], bad_records=config.data["bad_records"], dtype=config.dtype,
                        **settings)


def resolve_data_file(value: Any, files: dict[str, str]) -> Any:
    """``@heldout`` / ``@calibration`` become the data stage's files."""
    if isinstance(value, str) and value.startswith("@"):
        if value not in files:
            raise ConfigError(f"'{value}' needs data.sample and data.{value[1:]} in the config")
        return files[value]
    return value


def evaluate_kwargs(config: PipelineConfig, models: list[str], out: str | Path,
                     labels: list[str] | None = None, files: dict[str, str] | None = None) -> dict[str, Any]:
    from ..evaluate import MEASUREMENTS

    settings = dict(config.evaluate)
    measurements = [measurement for _, measurement in MEASUREMENTS.items()]
    for key in (key for measurement in measurements for key in measurement.data_sources):
        if files is not None:
            settings[key] = [resolve_data_file(src, files) for src in settings[key]]
        else:  # validation before the data stage has run: a placeholder that exists
            settings[key] = [src if not src.startswith("@") else "demo-heldout" for src in settings[key]]
    for measurement in measurements:  # each turns its pipeline-only keys into its own fields
        measurement.pipeline_settings(settings, config.model, final=files is not None)
    return {**settings, "models": models, "out": out, "labels": labels, "dtype": config.dtype}


