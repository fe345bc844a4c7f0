"""Declared options: a library config's choices and bounds live in its field types (``Literal``, ``Annotated``
with ``Field`` bounds) and its registered-name fields in ``REGISTERED`` (field -> :class:`~paser.registry.Registry`);
:func:`check_declared` validates both, so a config's ``validate()`` holds only the checks that relate fields."""

from __future__ import annotations

import dataclasses
from typing import Any

from .errors import ConfigError


def check_declared(config: Any) -> None:
    """Raise :class:`ConfigError` naming the first field whose value its declaration refuses."""
    from pydantic import TypeAdapter, ValidationError

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
