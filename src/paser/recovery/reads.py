"""What a recovery reads, derived from what each registered object declares (one declaration, three uses).

A recovery method declares its options and the shared fields it uses (:class:`~paser.recovery.base.RecoveryMethod`);
so do objectives (through the terms they ask for) and training targets. :func:`fields_read` joins the declarations
that apply to one config: the method's, and, where the method reads ``loss`` / ``targets``, the objective's and the
target's. From it come

- the error for a stray option (:func:`check_options_read`): a setting given away from its default that nothing
  chosen reads (``paser recover`` and each arm of ``paser run``);
- each method's resume key (:func:`resume_key_settings`: what it reads, less where it writes);
- ``paser run``'s recovery stage hash (the same settings).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from ..errors import ConfigError
from ..objectives import OBJECTIVES
from ..targets import TARGETS
from .base import RECOVERY_METHODS
from .end_to_end import LORA_FIELDS
from .generated import GENERATED_OPTIONS

# what the recovery stage itself reads whatever the method (run_recovery, the model loaders)
STAGE_FIELDS = frozenset({"model", "out", "method", "dtype", "resume"})
# read, but where the results go or how often they are saved, not what they are: outside the resume key and hash
NOT_IN_KEY = frozenset({"out", "resume", "save_steps", "data"})
# options added after runs were finished, at the value that computes what the code did before they existed: left
# out of the resume key and stage hash at that value, so adding one does not rerun finished work (at any other value,
# including a later default, they are in the key)
NEUTRAL = {"block_window": 1}
AUTO = "auto"
# fields a method declares but reads only under another setting: what the error says to set
CONDITIONS = {**dict.fromkeys(LORA_FIELDS, "--adapter lora"), **dict.fromkeys(GENERATED_OPTIONS, "--generated-tokens > 0")}


def fields_read(config: Any) -> frozenset[str]:
    """Every field of ``config`` that its method, objective and targets read. ``method: auto`` and ``loss: auto``
    read what any of their outcomes reads (``paser run`` checks its arms so before the pruned model exists)."""
    method = config.method
    methods = ([m for name, m in RECOVERY_METHODS.items() if name != AUTO] if method == AUTO
               else [RECOVERY_METHODS.get(method)])
    fields = STAGE_FIELDS.union(*(m.fields_read(config) for m in methods))
    if "loss" in fields:
        losses = ("kd", "nll") if config.loss == AUTO else (config.loss,)
        fields = fields.union(*(OBJECTIVES.get(loss).declared_reads() for loss in losses))
    if "targets" in fields:
        fields |= TARGETS.get(config.targets).declared_reads()
    if "generated_tokens" in fields:  # the original writes them: read only when it does
        fields = fields | {"teacher", "seed"} if config.generated_tokens > 0 else fields - GENERATED_OPTIONS
    if method == AUTO:
        fields |= {"teacher", "loss", "fsdp"}  # what auto's choice is made from (paser.recovery.policy)
    return frozenset(fields)


def readers() -> dict[str, list[str]]:
    """Field -> who may read it ("method blockwise", "loss kd", "targets original"), from every declaration."""
    owners: dict[str, list[str]] = {}
    named = [*((f"method {n}", m.declared_reads()) for n, m in RECOVERY_METHODS.items() if n != AUTO),
             *((f"loss {n}", o.declared_reads()) for n, o in OBJECTIVES.items()),
             *((f"targets {n}", t.declared_reads()) for n, t in TARGETS.items())]
    for who, fields in named:
        for field in sorted(fields):
            owners.setdefault(field, []).append(who)
    return owners


def given_options(config: Any) -> list[str]:
    """The fields of ``config`` set away from their declared defaults."""
    given = []
    for f in dataclasses.fields(config):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if default is not dataclasses.MISSING and getattr(config, f.name) != default:
            given.append(f.name)
    return given


def check_options_read(given: Iterable[str], config: Any, why: str = "") -> None:
    """A field in ``given`` that ``config`` (its method, loss and targets as they will run) does not read is an
    error naming who reads it; ``why``: how the method was chosen, when ``auto`` chose it."""
    read = fields_read(config)
    stray = [name for name in given if name not in read]
    if not stray:
        return
    owners = readers()
    flags = ", ".join("--" + name.replace("_", "-") for name in stray)
    who = "; ".join(f"--{name.replace('_', '-')} is read by {', '.join(owners.get(name, ['nothing']))}"
                    + (f" (with {CONDITIONS[name]})" if name in CONDITIONS else "") for name in stray)
    running = f"method {config.method}" + (f" ({why})" if why else "")
    if "loss" in read:
        running += f", loss {config.loss}"
    if "targets" in read:
        running += f", targets {config.targets}"
    adapter = f", adapter {config.adapter}" if "adapter" in read else ""
    raise ConfigError(f"{flags}: not read by this recovery ({running}{adapter}): {who}. Drop the option or choose "
                      f"what reads it")


def resume_key_settings(config: Any) -> dict[str, Any]:
    """What a recovery's result depends on among its settings: every field it reads, but where it writes."""
    return {name: _plain(getattr(config, name)) for name in sorted(fields_read(config) - NOT_IN_KEY)
            if not (name in NEUTRAL and getattr(config, name) == NEUTRAL[name])}


def _plain(value: Any) -> Any:
    return str(value) if not isinstance(value, (str, int, float, bool, type(None), list, dict)) else value
