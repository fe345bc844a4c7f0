"""Exceptions that the CLI reports as one clear line (a traceback only with ``--debug``)."""


class PaserError(Exception):
    """A user-facing error: bad input, a missing file, an unusable model spec."""


class DataError(PaserError):
    """Invalid instruction data; the message names the file, the line and the field."""

    def __init__(self, source: str, line: int | None, field: str | None, problem: str, unit: str = "line",
                 reason: str | None = None):
        self.source, self.line, self.field, self.problem, self.unit = source, line, field, problem, unit
        self.reason = reason or problem  # the category a skipped record is counted under
        where = source if line is None else f"{source}: {unit} {line}"
        what = f"field '{field}': " if field else ""
        super().__init__(f"{where}: {what}{problem}")


class ConfigError(PaserError):
    """An invalid configuration value or an unknown key."""


class ModelError(PaserError):
    """A model spec that cannot be resolved, or two models that cannot be compared."""

