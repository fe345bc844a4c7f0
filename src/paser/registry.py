"""One registry shape for every extension point (in the spirit of lm-eval's ``api/registry.py``).

Selection strategies, allocation rules, scorers, cluster methods, pruning methods, recovery objectives,
training targets and evaluation measurements are each a :class:`Registry`; adding one is a decorator on
the new object in its own file::

    from paser.evaluate.base import MEASUREMENTS, Measurement

    @MEASUREMENTS.register("fidelity")
    class Fidelity(Measurement): ...

A registered class is instantiated once (its options are arguments of the calls that use it); a registered
function is stored as it is. Unknown names fail with a :class:`~paser.errors.ConfigError` listing the choices.

**Plugins.** Another installed package adds an entry to a registry through the registry's entry-point group
(``paser.recovery``, ``paser.objectives``, ``paser.targets``, ``paser.measurements``, ``paser.selection``, ...: each
registry's ``group``), found the first time the registry is read. The entry point names either the object itself
(registered under the entry point's name) or a module whose decorators register it::

    # the plugin's pyproject.toml
    [project.entry-points."paser.recovery"]
    my-method = "my_package.recovery:MyMethod"
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from .errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")


class Registry(Generic[T]):
    """Named objects of one kind, in registration order."""

    def __init__(self, kind: str, group: str | None = None):
        self.kind = kind  # what the error messages call an entry: "selection method", "measurement", ...
        self.group = group  # the entry-point group other packages register plugins under
        self._entries: dict[str, T] = {}
        self._plugins_loaded = group is None

    def load_plugins(self) -> None:
        """Register every entry point of ``group`` not registered yet. One that fails to load is a WARNING naming
        it and its package (paser still runs; asking for it then fails as an unknown name)."""
        self._plugins_loaded = True
        for point in entry_points(group=self.group) if self.group else ():
            if point.name in self._entries:
                continue
            where = f"{self.kind} plugin '{point.name}' ({point.value}" + (
                f", package {point.dist.name})" if point.dist else ")")
            try:
                obj = point.load()
            except Exception as error:  # a broken third-party package must not stop paser
                log.warning("%s could not be loaded: %s: %s", where, type(error).__name__, error)
                continue
            if point.name in self._entries:  # a module whose decorator registered it
                continue
            if inspect.ismodule(obj):
                log.warning("%s: the module registered no %s named '%s'", where, self.kind, point.name)
                continue
            self.register(point.name)(obj)

    def _entries_with_plugins(self) -> dict[str, T]:
        if not self._plugins_loaded:
            self.load_plugins()
        return self._entries

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
        entries = self._entries_with_plugins()
        try:
            return entries[name]
        except KeyError:
            raise ConfigError(f"unknown {self.kind} '{name}'; choose one of {', '.join(entries)}") from None

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
        return tuple(self._entries_with_plugins())

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(list(self._entries_with_plugins().items()))

    def __contains__(self, name: object) -> bool:
        return name in self._entries_with_plugins()

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries_with_plugins()))

    def __len__(self) -> int:
        return len(self._entries_with_plugins())

    def __getitem__(self, name: str) -> T:
        return self.get(name)
