"""The recovery policy, resolved once: ``auto`` (method, loss), the learning rate and the original model made
concrete, each with the reason for the choice. ``paser recover`` (:func:`paser.recovery.run.run_recovery`) and
``paser run`` (its stage hash and its recovery) both call :func:`resolve_recovery`; each train log records its
choices under ``resolved``.

A default that cannot apply says so: when ``auto`` cannot run block-wise + KD it logs a WARNING with the reason and
what would let it (``--teacher``, a supported architecture, no ``--fsdp``), and the train log keeps the warning; a
``prune_report.json`` that cannot be read is an error naming the file, never a silent "no original".
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from ..errors import ConfigError, PaserError
from ..objectives import OBJECTIVES
from ..targets import TARGETS
from .base import RECOVERY_METHODS
from .blockwise import blockwise_unsupported
from .memory import available_memory, gb
from .reads import fields_read

log = logging.getLogger(__name__)

AUTO = "auto"

# The peak learning rate when none is given, per adapter, for recovery slices of a few hundred records (tens of
# optimizer steps): at LoRA's usual 2e-4 such a run removed a tenth of the KL pruning added, at 1e-3 about twice
# that, on NLL and KD alike (docs/fidelity.md, table 5; distillation's target is the original, so the larger step
# does not pull the model away from it). Full-parameter: 2e-5, the usual full fine-tuning rate, barely moved in 50
# steps; 1e-4 recovered (docs/recovery.md).
DEFAULT_LR = {"lora": 1e-3, "full": 1e-4}


@dataclass
class Resolution:
    """A recovery config with nothing left on ``auto``, the choices made and the warnings they raised."""

    config: Any
    choices: dict[str, dict[str, Any]] = field(default_factory=dict)  # field -> {asked, chosen, reason}
    warnings: list[str] = field(default_factory=list)
    memory: dict[str, Any] = field(default_factory=dict)  # the chosen method's need and what the machine has

    def why(self, name: str) -> str:
        choice = self.choices.get(name)
        return f"auto chose it: {choice['reason']}" if choice and choice["asked"] == AUTO else ""

    def record(self) -> dict[str, Any]:
        return {"choices": self.choices, "warnings": self.warnings, "memory": self.memory}


def recorded_original(model: str | Path) -> str | None:
    """The model ``paser prune`` started from, as recorded in ``MODEL/prune_report.json``; None when the folder
    has no report (a model pruned elsewhere) or the recorded model is a path that no longer exists (a WARNING).
    A report that is there but cannot be read is an error naming it."""
    report = Path(str(model)).expanduser() / "prune_report.json"
    if not report.is_file():
        return None
    try:
        original = json.loads(report.read_text())["config"]["model"]
    except (OSError, ValueError) as error:  # unreadable, or not JSON
        raise ConfigError(f"{report}: cannot be read as JSON ({error}); fix or remove it, or give --teacher") from None
    except (KeyError, TypeError):  # JSON without config.model
        raise ConfigError(f"{report}: has no config.model (the original model paser prune started from); fix or "
                          "remove it, or give --teacher") from None
    if not isinstance(original, str) or not original:
        raise ConfigError(f"{report}: config.model must name the original model, not {original!r}")
    if original.startswith((".", "/", "~")) and not Path(original).expanduser().exists():
        log.warning("%s names the original model %s, which is not there: no original known (give --teacher)",
                    report, original)
        return None
    return original


_ADVICE = {
    "original": "give --teacher ORIGINAL (the dense model this one was pruned from)",
    "loss": "use --loss kd (or auto) to distil from the original",
    "processes": "run without --fsdp (block-wise holds one block per process and shares the batches across "
                 "processes; its KD stage then runs under the launcher)",
    "architecture": "--method blockwise+kd runs it on any decoder (a WARNING says it is not parity-tested)",
    "shapes": "block-wise needs blocks of the original's shapes (unstructured or N:M pruning)",
}


def choose_method(model: str, original: str | None, loss: str, fsdp: bool = False) -> tuple[str, str]:
    """``(method, reason)``: ``blockwise+kd`` where it applies to this pruned model, original and objective, else
    ``end-to-end``."""
    method, reason, _ = _choose_method(model, original, loss, fsdp)
    return method, reason


def _choose_method(model: str, original: str | None, loss: str, fsdp: bool) -> tuple[str, str, str]:
    """``(method, reason, what would allow block-wise + KD)``."""
    if original is None:
        return "end-to-end", "no original model known (--teacher), nothing to reconstruct toward", _ADVICE["original"]
    if not OBJECTIVES.get(loss).needs_teacher:
        return "end-to-end", f"loss {loss} trains on the records' answers, not toward the original", _ADVICE["loss"]
    if fsdp:
        return "end-to-end", "--fsdp: block-wise + KD under FSDP is not tested", _ADVICE["processes"]
    unsupported = blockwise_unsupported(model, original)
    if unsupported:
        kind = "shapes" if unsupported.startswith("pruning changed") else "architecture"
        return "end-to-end", unsupported, _ADVICE[kind]
    return "blockwise+kd", "the original is known and the blocks keep its shapes", ""


def _needs_original(config: Any) -> bool:
    """Whether anything this config may run reads the original model."""
    if AUTO in (config.method, config.loss) or config.generated_tokens > 0:
        return True
    return (RECOVERY_METHODS.get(config.method).needs_original or OBJECTIVES.get(config.loss).needs_teacher
            or TARGETS.get(config.targets).needs_original)


def resolve_recovery(config: Any, announce: bool = True) -> Resolution:
    """``config`` with ``teacher`` (where needed and not given: the original ``paser prune`` recorded), ``loss``,
    ``method`` and ``lr`` made concrete, and why. ``announce``: log the choices (INFO) and warnings (WARNING)."""
    resolution = Resolution(config)
    teacher = config.teacher
    if not teacher and _needs_original(config):
        teacher = recorded_original(config.model)
        if teacher:
            resolution.choices["teacher"] = {"asked": None, "chosen": teacher,
                                             "reason": f"recorded by paser prune in {config.model}/prune_report.json"}
    loss, method, lr = config.loss, config.method, config.lr
    if loss == AUTO and "loss" in fields_read(config):  # a method that trains under no objective leaves it
        loss = "kd" if teacher else "nll"
        reason = "the original is known: distil from it" if teacher else "no original model known (--teacher)"
        resolution.choices["loss"] = {"asked": AUTO, "chosen": loss, "reason": reason}
        if not teacher:
            resolution.warnings.append(f"loss auto: nll on the records' answers, not kd: {reason}; "
                                       f"{_ADVICE['original']}")
    if method == AUTO:
        method, reason, advice = _choose_method(config.model, teacher, loss, config.fsdp)
        resolution.choices["method"] = {"asked": AUTO, "chosen": method, "reason": reason}
        if method != "blockwise+kd":
            resolution.warnings.append(f"method auto: {method}, not block-wise + KD: {reason}; {advice}")
    resolution.config = replace(config, teacher=teacher, loss=loss, method=method)
    if lr is None and "lr" in fields_read(resolution.config):
        lr = DEFAULT_LR[config.adapter]
        resolution.choices["lr"] = {"asked": None, "chosen": lr, "reason": f"the default of adapter {config.adapter}"}
        resolution.config = replace(resolution.config, lr=lr)
    _check_original(resolution.config)
    _fit_memory(resolution)
    if announce:
        if resolution.memory:
            log.info("memory: %s needs %s; %s %s", resolution.config.method, resolution.memory["need"],
                     resolution.memory["available"], resolution.memory["where"])
        for name, choice in resolution.choices.items():
            log.info("%s: %s (%s)", name, choice["chosen"], choice["reason"])
        for warning in resolution.warnings:
            log.warning(warning)
    return resolution


def _fit_memory(resolution: Resolution) -> None:
    """The chosen method's memory need (:mod:`paser.recovery.memory`) against what this machine has, before any
    weight loads. ``auto`` steps down to what fits, saying so: the original's stored top-k instead of the original
    beside the student, then block-wise alone. An explicit method that cannot fit is an error with the figures and
    what would fit."""
    config = resolution.config
    try:
        need = RECOVERY_METHODS.get(config.method).need(config)
        described = need.describe() if need is not None else None
    except (PaserError, OSError, ValueError, KeyError, AttributeError, TypeError) as error:
        # the model's config cannot be read or built (or a setting is no number): what runs says why
        log.debug("memory plan skipped: %s", error)
        return
    if need is None:
        return
    available, where = available_memory()
    resolution.memory = {"need": described, "need_bytes": need.total, "available": gb(available), "where": where}
    if need.total <= available:
        return
    steps = []  # (the option, the config under it, the field auto may change)
    if (config.teacher_cache != "topk" and "teacher_cache" in fields_read(config) and config.kd_positions == "response"
            and config.kd_temperature == 1.0 and OBJECTIVES.get(config.loss).needs_teacher):
        steps.append(("--teacher-cache topk", replace(config, teacher_cache="topk"), "teacher_cache"))
    if config.method == "blockwise+kd":
        steps.append(("--method blockwise", replace(config, method="blockwise"), "method"))
    if config.adapter == "full" and "adapter" in fields_read(config):
        steps.append(("--adapter lora", replace(config, adapter="lora"), None))
    fitting = [(flag, c, name, n) for flag, c, name in steps
               if (n := RECOVERY_METHODS.get(c.method).need(c)).total <= available]
    automatic = [f for f in fitting if f[2] is not None]
    if resolution.choices.get("method", {}).get("asked") == AUTO and automatic:
        flag, chosen, name, chosen_need = automatic[0]
        reason = (f"{config.method} as it was needs {need.describe()}; {gb(available)} {where}; with {flag}: "
                  f"{gb(chosen_need.total)}")
        resolution.choices[name] = {"asked": getattr(config, name) if name != "method" else AUTO,
                                    "chosen": getattr(chosen, name), "reason": reason}
        resolution.warnings.append(f"method auto: {flag}: {reason}")
        resolution.memory.update(need=chosen_need.describe(), need_bytes=chosen_need.total)
        resolution.config = chosen
        return
    would = ("; ".join(f"{flag} needs {gb(n.total)}" for flag, _, _, n in fitting) + " (fits)" if fitting
             else "nothing paser would change fits: a machine or GPU with more memory")
    raise ConfigError(f"method {config.method} needs {need.describe()}; {gb(available)} {where}. {would}. "
                      "PASER_MEMORY_GB=N plans for N GB instead")


def _check_original(config: Any) -> None:
    """What reads the original has one, after resolution."""
    if config.teacher:
        return
    for what, needs in (("generated_tokens", config.generated_tokens > 0),
                        (f"targets '{config.targets}'", TARGETS.get(config.targets).needs_original),
                        (f"loss '{config.loss}'", config.loss != AUTO and OBJECTIVES.get(config.loss).needs_teacher),
                        (f"method '{config.method}'", RECOVERY_METHODS.get(config.method).needs_original)):
        if needs:
            raise ConfigError(f"{what} needs the original model: give --teacher (or prune with paser prune, which "
                              "records it in prune_report.json)")
