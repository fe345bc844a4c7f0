"""One registry shape for every extension point (in the spirit of lm-eval's ``api/registry.py``).

Selection strategies, allocation rules, scorers, cluster methods, pruning methods, recovery objectives,
training targets and evaluation measurements are each a :class:`Registry`; adding one is a decorator on
the new object in its own file::

    from paser.evaluate.base import MEASUREMENTS, Measurement

    @MEASUREMENTS.register("fidelity")
    class Fidelity(Measurement): ...

A registered class is instantiated once (its options are arguments of the calls that use it); a registered
function is stored as it is. Unknown names fail with a :class:`~paser.errors.ConfigError` listing the choices.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from .errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Named objects of one kind, in registration order."""

    def __init__(self, kind: str):
        self.kind = kind  # what the error messages call an entry: "selection method", "measurement", ...
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[Any], Any]:
        """Decorator: register a class (stored as one instance, its ``name`` set) or a function under ``name``."""

        def add(obj: Any) -> Any:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            if isinstance(obj, type):
                obj.name = name
                self._entries[name] = obj()
            else:
                self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        try:
            return self._entries[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} '{name}'; choose one of {', '.join(self._entries)}") from None

    def unregister(self, name: str) -> None:
        """Remove an entry (tests that register a throw-away one)."""
        del self._entries[name]

    def summary(self, name: str) -> str:
        """One line on an entry, for ``--help``: its ``description``, else the first line of its own docstring
        (a function's, or the registered class's: not one inherited from the base)."""
        entry = self.get(name)
        text = getattr(entry, "description", None)
        if not text:
            text = entry.__doc__ if inspect.isfunction(entry) else type(entry).__dict__.get("__doc__")
            text = (text or "").strip().split("\n")[0]
        return text.rstrip(".")

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, name: str) -> T:
        return self.get(name)
