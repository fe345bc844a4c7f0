"""Declared options: a library config's choices and bounds live in its field types (``Literal``, ``Annotated``
with ``Field`` bounds) and its registered-name fields in ``REGISTERED`` (field -> :class:`~paser.registry.Registry`);
:func:`check_declared` validates both, so a config's ``validate()`` holds only the checks that relate fields.

Options that belong to one registered object (a measurement, a training target, a recovery objective) are declared
on it, as a dataclass in its ``options`` attribute built with :func:`option`; :func:`joined_config` adds them to
the library config they configure, and the CLI builds its options from the same fields."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Iterable
from typing import Any

from pydantic import TypeAdapter, ValidationError

from .errors import ConfigError


def check_declared(config: Any) -> None:
    """Raise :class:`ConfigError` naming the first field whose value its declaration refuses."""

    values = {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}
    try:
        TypeAdapter(type(config)).validate_python(values)
    except ValidationError as exc:
        error = exc.errors()[0]
        name = ".".join(str(p) for p in error["loc"])
        expected = (error.get("ctx") or {}).get("expected")
        what = (f"must be {expected}" if error["type"] == "literal_error" and expected
                else error["msg"].replace("Input should be", "must be"))
        raise ConfigError(f"{name} {what}, not {error.get('input')!r}") from None
    for name, registry in getattr(type(config), "REGISTERED", {}).items():
        if values[name] not in registry:
            raise ConfigError(f"{name} must be one of {', '.join(registry)}, not '{values[name]}'")


def option(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
           cli: str | None = None) -> Any:
    """A declared setting: a dataclass field whose ``help`` is its CLI option's help. No default: a required option.
    ``cli``: ``"argument"`` (positional) or the option's flag when it is not the field's name (``"--label"``)."""
    metadata = {"help": help, **({"cli": cli} if cli else {})}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def cli_fields(base: type, owners: Iterable[tuple[str, Any]] = ()) -> list[tuple[dataclasses.Field, Any]]:
    """Every field a command offers: the config's own (but its ``CONFIG_ONLY`` ones) and each owner's declared
    options, as (field, resolved type), in declaration order."""
    hints = typing.get_type_hints(base, include_extras=True)
    config_only = getattr(base, "CONFIG_ONLY", frozenset())
    own = [(f, hints[f.name]) for f in dataclasses.fields(base) if f.name not in config_only]
    return own + declared_fields(base, owners)


def choices(base: type, name: str, declared: Any) -> tuple[str, ...]:
    """The values a field accepts when they are a closed set: a ``Literal``'s or its registry's names."""
    registry = getattr(base, "REGISTERED", {}).get(name)
    if registry is not None:
        return tuple(registry.names())
    while typing.get_origin(declared) is typing.Annotated:
        declared = typing.get_args(declared)[0]
    if typing.get_origin(declared) is typing.Literal:
        return tuple(str(a) for a in typing.get_args(declared))
    return ()


def choices_help(base: type, name: str, declared: Any) -> str:
    """The closing sentence of a field's ``--help``: its choices, each registered one with its own summary (so a
    new plugin is described where it is written, and no help string lists the names by hand)."""
    registry = getattr(base, "REGISTERED", {}).get(name)
    if registry is not None:
        described = ((n, registry.summary(n)) for n in registry.names())
        return " Choices: " + " | ".join(f"{n}: {text}" if text else n for n, text in described) + "."
    accepted = choices(base, name, declared)
    return f" Choices: {', '.join(accepted)}." if accepted else ""


def declared_fields(base: type, owners: Iterable[tuple[str, Any]]) -> list[tuple[dataclasses.Field, Any]]:
    """The fields each owner declares in its ``options`` dataclass, as (field, resolved type), in order; a name
    declared twice (or already on ``base``) is an error."""
    fields: list[tuple[dataclasses.Field, Any]] = []
    seen = {f.name for f in dataclasses.fields(base)}
    for name, owner in owners:
        options = getattr(owner, "options", None)
        if options is None:
            continue
        hints = typing.get_type_hints(options, include_extras=True)
        for f in dataclasses.fields(options):
            if f.name in seen:
                raise TypeError(f"{name!r} declares option {f.name!r}, which is declared already")
            seen.add(f.name)
            fields.append((f, hints[f.name]))
    return fields


def joined_config(name: str, base: type, owners: Iterable[tuple[str, Any]], module: str, doc: str) -> type:
    """``base`` (a dataclass) with every owner's declared options added as fields: one config, one validator."""
    specs = [(f.name, tp, dataclasses.field(default=f.default, default_factory=f.default_factory, metadata=f.metadata))
             for f, tp in declared_fields(base, owners)]
    cls = dataclasses.make_dataclass(name, specs, bases=(base,))
    cls.__module__, cls.__doc__ = module, doc
    return cls
