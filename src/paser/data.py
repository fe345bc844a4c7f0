"""Instruction data: the only place in paser that reads instruction files.

Records are Alpaca-style (``instruction``, ``input``, ``output``); extra fields are kept untouched in
``Record.raw``. Sources: JSON (an array), JSONL, parquet, CSV, a hub dataset name, ``demo`` (the
built-in demo set) or ``demo-heldout`` (its held-out questions). Other schemas map onto the three
fields with a :class:`ColumnMap` (``question``/``answer``, ``prompt``/``response`` and chat ``messages``
are detected automatically).

Everything is validated before any heavy work. A record that cannot be used (malformed JSON, bytes
that are not UTF-8, a missing, empty or non-string field, a chat record without an assistant turn) is
either an error (``bad_records="error"``: :class:`DataError` naming the file, the line or record, and the
field) or left out and counted by reason (``"skip"``, :class:`SkippedRecords`). A file that cannot be
read at all, or that holds no usable record, is an error either way.
"""

from __future__ import annotations

import csv
import json
import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .cache import write_jsonl
from .demo_data import demo_records
from .errors import DataError

# pyarrow and datasets are imported only for Parquet files and hub datasets.

log = logging.getLogger(__name__)

ALPACA_PROMPT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the "
    "request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
    "### Input:\n{input}\n\n### Response:\n"
)


@dataclass(frozen=True)
class ColumnMap:
    """Which source fields hold the instruction, the optional input and the output.

    ``messages`` names a chat column (a list of ``{"role", "content"}``) instead: the last assistant
    turn is the output, the user turn before it the instruction; a system turn is ignored.
    """

    instruction: str = "instruction"
    input: str | None = "input"
    output: str = "output"
    messages: str | None = None

    @classmethod
    def parse(cls, text: str) -> ColumnMap:
        """Parse ``instruction=question,output=answer[,input=context]`` or ``messages=conversations``."""
        values: dict[str, Any] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key not in {"instruction", "input", "output", "messages"}:
                raise DataError("--columns", None, None,
                                f"expected KEY=FIELD with KEY in instruction,input,output,messages; got '{part}'")
            values[key] = value or None
        if "messages" in values:
            return cls(messages=values["messages"])
        if "instruction" in values or "output" in values:
            values.setdefault("input", None)
        return cls(**values)


# Schemas recognised without --columns, tried in order against the first record's fields.
KNOWN_SCHEMAS = (
    ColumnMap(),
    ColumnMap(instruction="question", input=None, output="answer"),
    ColumnMap(instruction="prompt", input=None, output="response"),
    ColumnMap(instruction="prompt", input=None, output="completion"),
    ColumnMap(messages="messages"),
    ColumnMap(messages="conversations"),
)


@dataclass(slots=True)
class Record:
    """One instruction example; ``raw`` is the record exactly as given (extra fields included)."""

    instruction: str
    input: str
    output: str
    raw: dict = field(repr=False)
    source: str = ""  # shared by all records of a file (not copied per record)
    number: int = 0  # line (JSONL, CSV), record (JSON) or row (parquet, hub) number
    index: int = 0  # 0-based position of the row in its source, skipped rows counted: outputs join on it

    @property
    def where(self) -> str:
        """``source:number``, for messages about this record."""
        return f"{self.source}:{self.number}"

    @property
    def key(self) -> tuple[str, str]:
        return (self.instruction, self.input)

    @property
    def user_text(self) -> str:
        return f"{self.instruction}\n\n{self.input}" if self.input else self.instruction


# --------------------------------------------------------------------------------------------- reading
BadRecords = Literal["skip", "error"]
BAD_RECORD_POLICIES = ("skip", "error")


@dataclass
class SkippedRecords:
    """Records left out under ``bad_records="skip"``: a count per reason and the first few of each.

    ``examples_per_reason=None`` keeps every one (``paser validate --report``).
    """

    examples_per_reason: int | None = 3
    counts: dict[str, int] = field(default_factory=dict)
    examples: list[dict[str, Any]] = field(default_factory=list)

    def add(self, error: DataError) -> None:
        seen = self.counts.get(error.reason, 0)
        self.counts[error.reason] = seen + 1
        if self.examples_per_reason is None or seen < self.examples_per_reason:
            where = error.source if error.line is None else f"{error.source}:{error.line}"
            self.examples.append({"where": where, "unit": error.unit, "line": error.line, "field": error.field,
                                  "reason": error.reason, "message": str(error)})

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def merge(self, other: SkippedRecords) -> None:
        for reason, n in other.counts.items():
            self.counts[reason] = self.counts.get(reason, 0) + n
        self.examples.extend(other.examples)

    def summary(self) -> dict[str, Any]:
        """What ``selection.json`` and ``train_log.json`` record under ``skipped_records``."""
        return {"total": self.total, "by_reason": dict(self.counts), "examples": list(self.examples)}

    def describe(self) -> str:
        reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(self.counts.items(), key=lambda kv: -kv[1]))
        first = self.examples[0]["where"] if self.examples else ""
        return f"{self.total} bad record(s) skipped ({reasons}; first at {first})"


class Records(list):
    """A list of :class:`Record` that also says which input records were skipped, and why."""

    def __init__(self, records: Iterable[Record] = (), skipped: SkippedRecords | None = None):
        super().__init__(records)
        self.skipped = skipped if skipped is not None else SkippedRecords()


def _bad(source: str, number: int, problem: str, reason: str, field: str | None = None,
         unit: str = "line") -> DataError:
    return DataError(source, number, field, problem, unit=unit, reason=reason)


def _not_utf8(source: str, number: int, unit: str) -> DataError:
    return _bad(source, number, "not UTF-8", "not UTF-8", unit=unit)


def _has_undecodable(value: Any) -> bool:
    """True where text read with ``surrogateescape`` hides bytes that are not UTF-8."""
    if isinstance(value, str):
        return any("\udc80" <= ch <= "\udcff" for ch in value) if not value.isascii() else False
    if isinstance(value, dict):
        return any(_has_undecodable(k) or _has_undecodable(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_undecodable(v) for v in value)
    return False


def _iter_raw(source: str) -> Iterator[tuple[str, int, Any]]:
    """Yield ``(unit, number, raw_row)`` from a file or hub dataset, streaming where the format allows.

    A row that cannot be read (malformed JSON, bytes that are not UTF-8, a broken CSV line) is yielded
    as a :class:`DataError` in place of the row, so the caller's bad-record policy decides; a file that
    cannot be read at all raises.
    """
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix in {".jsonl", ".ndjson"}:
            yield from _iter_jsonl(source, path)
        elif suffix == ".json":
            raw = path.read_bytes()
            if raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            text = raw.decode("utf-8", errors="surrogateescape")
            try:
                rows = json.loads(text)
            except (json.JSONDecodeError, RecursionError) as exc:
                where = getattr(exc, "lineno", None)
                detail = f"{exc.msg} at column {exc.colno}" if isinstance(exc, json.JSONDecodeError) else "nested too deeply"
                raise DataError(source, where, None, f"malformed JSON ({detail})") from None
            if isinstance(rows, dict) and len(rows) == 1 and isinstance(next(iter(rows.values())), list):
                rows = next(iter(rows.values()))  # {"data": [...]} wrappers
            if not isinstance(rows, list):
                raise DataError(source, None, None, "a .json file must hold an array of records (use .jsonl for one per line)")
            for i, row in enumerate(rows, start=1):
                yield "record", i, (_not_utf8(source, i, "record") if _has_undecodable(row) else row)
        elif suffix == ".csv":
            yield from _iter_csv(source, path)
        elif suffix == ".parquet":
            yield from _iter_parquet(source, path)
        else:
            raise DataError(source, None, None, f"unsupported file type '{suffix}' (use .jsonl, .json, .csv or .parquet)")
        return
    if path.exists() or source.startswith((".", "/", "~")) or suffix in {".jsonl", ".json", ".csv", ".parquet"}:
        raise DataError(source, None, None, "file not found")
    yield from _iter_hub(source)


def _iter_jsonl(source: str, path: Path) -> Iterator[tuple[str, int, Any]]:
    with open(path, "rb") as f:  # bytes, so one undecodable line cannot stop the file
        for lineno, line in enumerate(f, start=1):
            if lineno == 1 and line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            try:
                text = line.decode("utf-8").rstrip("\r\n")  # a truncated line reports its own column
            except UnicodeDecodeError as exc:
                yield "line", lineno, _bad(source, lineno, f"not UTF-8 (byte 0x{line[exc.start]:02x} at byte "
                                                            f"{exc.start + 1})", "not UTF-8")
                continue
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                row = _bad(source, lineno, f"malformed JSON ({exc.msg} at column {exc.colno})", "malformed JSON")
            except RecursionError:
                row = _bad(source, lineno, "malformed JSON (nested too deeply)", "malformed JSON")
            yield "line", lineno, row


def _iter_csv(source: str, path: Path) -> Iterator[tuple[str, int, Any]]:
    with open(path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
        reader = csv.DictReader(f)
        while True:
            line = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:  # e.g. a field over the csv module's size limit; the reader moves on
                yield "line", line, _bad(source, line, f"unreadable CSV ({exc})", "unreadable CSV")
                continue
            # Row numbers are file lines (the header is line 1); a quoted field may span several.
            line = reader.line_num
            if _has_undecodable(row):
                yield "line", line, _not_utf8(source, line, "line")
            elif None in row:  # more values than header columns
                yield "line", line, _bad(source, line, f"{len(row[None])} value(s) beyond the header's columns",
                                         "malformed CSV")
            else:
                yield "line", line, row


def _iter_parquet(source: str, path: Path) -> Iterator[tuple[str, int, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
        number = 0
        for batch in batches:
            for row in batch.to_pylist():
                number += 1
                yield "row", number, row
    except (pa.ArrowException, OSError) as exc:
        raise DataError(source, None, None, f"not a readable parquet file ({type(exc).__name__}: "
                                            f"{str(exc).splitlines()[0] if str(exc) else ''})") from None


def _iter_hub(name: str) -> Iterator[tuple[str, int, Any]]:
    """Rows of a hub dataset ``name`` or ``name:split`` (default split: train)."""
    import datasets

    repo, _, split = name.partition(":")
    try:
        dataset = datasets.load_dataset(repo, split=split or "train", streaming=True)
    except Exception as exc:  # datasets raises many types for "not found" / offline
        raise DataError(name, None, None,
                        f"not a local file, and the hub dataset could not be loaded ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    for i, row in enumerate(dataset, start=1):
        yield "row", i, row


def _schema_of(row: Any) -> ColumnMap | None:
    if isinstance(row, dict):
        for schema in KNOWN_SCHEMAS:
            needed = [schema.messages] if schema.messages else [schema.instruction, schema.output]
            if all(name in row for name in needed):
                return schema
    return None


SCHEMA_LOOKAHEAD = 1000  # rows read while looking for one whose fields name a known schema


def _text_field(source: str, unit: str, number: int, row: dict, name: str, required: bool) -> str:
    if name not in row or row[name] is None:
        if required:
            raise DataError(source, number, name, "missing", unit=unit, reason="missing field")
        return ""
    value = row[name]
    if not isinstance(value, str):
        raise DataError(source, number, name, f"expected a string, got {type(value).__name__}", unit=unit,
                        reason="not a string")
    return value


def _record_from_messages(source: str, unit: str, number: int, row: dict, column: str) -> tuple[str, str]:
    def bad(field: str, problem: str) -> DataError:
        return DataError(source, number, field, problem, unit=unit, reason="unusable chat record")

    messages = row.get(column)
    if not isinstance(messages, list) or not messages:
        raise bad(column, "expected a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise bad(f"{column}[{i}]", "expected {'role': ..., 'content': str}")
    roles = [m["role"] for m in messages]
    if roles[-1] not in {"assistant", "gpt"}:
        raise bad(column, "the last message must be the assistant's")
    users = [i for i, r in enumerate(roles[:-1]) if r in {"user", "human"}]
    if not users:
        raise bad(column, "no user message before the assistant's")
    return messages[users[-1]]["content"], messages[-1]["content"]


DEMO_SOURCES = {"demo": "train", "demo-heldout": "heldout"}  # the built-in demo set's splits


def iter_records(source: str | Path, columns: ColumnMap | None = None, bad_records: BadRecords = "error",
                 skipped: SkippedRecords | None = None) -> Iterator[Record]:
    """Stream validated records from ``source``.

    ``bad_records="error"``: the first unusable record raises :class:`DataError` (file, line, field).
    ``"skip"``: it is left out and counted in ``skipped``. A file that cannot be read at all raises
    either way.
    """
    source = str(source)
    if source in DEMO_SOURCES:
        yield from iter_dict_records(demo_records()[DEMO_SOURCES[source]], source=source)
        return
    yield from iter_dict_records(_iter_raw(source), source=source, columns=columns, bad_records=bad_records,
                                 skipped=skipped)


def _detect_schema(items: Iterator[tuple[int, Any]], source: str) -> tuple[ColumnMap | None, list[tuple[int, Any]]]:
    """The column map of the first row that has one, within ``SCHEMA_LOOKAHEAD`` rows, and the rows read to find
    it; (None, []) when there are no rows; a clear error when the rows hold no usable schema."""
    pending: list[tuple[int, Any]] = []
    for index, item in items:
        pending.append((index, item))
        columns = _schema_of(item[2] if isinstance(item, tuple) else item)
        if columns is not None:
            return columns, pending
        if len(pending) >= SCHEMA_LOOKAHEAD:
            break
    first = next((i[2] if isinstance(i, tuple) else i for _, i in pending
                  if isinstance(i[2] if isinstance(i, tuple) else i, dict)), None)
    if first is None and not pending:
        return None, []
    if first is None:
        _, item = pending[0]
        unit, number, row = item if isinstance(item, tuple) else ("record", 1, item)
        if isinstance(row, DataError):
            raise row
        raise DataError(source, number, None, f"expected a JSON object, got {type(row).__name__}", unit=unit)
    fields = ", ".join(sorted(map(str, first))) or "none"
    raise DataError(source, None, None, f"cannot tell which fields hold instruction and output (fields: {fields}); "
                    "pass --columns instruction=FIELD,output=FIELD[,input=FIELD]")


def iter_dict_records(rows: Iterable[Any], source: str, columns: ColumnMap | None = None,
                      bad_records: BadRecords = "error", skipped: SkippedRecords | None = None) -> Iterator[Record]:
    """Validate in-memory rows (dicts, or ``(unit, number, dict)`` triples) into records.

    ``Record.index`` is the row's 0-based position in ``rows``, bad rows included, so outputs join back
    to the input whatever was skipped.
    """
    if bad_records not in BAD_RECORD_POLICIES:
        raise DataError(source, None, None, f"bad_records must be 'skip' or 'error', not '{bad_records}'")
    skipped = skipped if skipped is not None else SkippedRecords()
    items = enumerate(iter(rows))
    pending: list[tuple[int, Any]] = []
    if columns is None:  # detect the schema from the first row that has one (bad rows before it are judged by it)
        columns, pending = _detect_schema(items, source)
        if columns is None:  # no rows at all
            return

    def chained() -> Iterator[tuple[int, Any]]:
        yield from pending
        yield from items

    for index, item in chained():
        unit, number, row = item if isinstance(item, tuple) else ("record", index + 1, item)
        try:
            yield _validate_row(source, unit, number, row, columns, index)
        except DataError as error:
            if bad_records == "error":
                raise
            skipped.add(error)


def _validate_row(source: str, unit: str, number: int, row: Any, columns: ColumnMap, index: int) -> Record:
    if isinstance(row, DataError):
        raise row
    if not isinstance(row, dict):
        raise DataError(source, number, None, f"expected a JSON object, got {type(row).__name__}", unit=unit,
                        reason="not an object")
    if columns.messages:
        instruction, output = _record_from_messages(source, unit, number, row, columns.messages)
        input_text = ""
    else:
        instruction = _text_field(source, unit, number, row, columns.instruction, required=True)
        input_text = _text_field(source, unit, number, row, columns.input, required=False) if columns.input else ""
        output = _text_field(source, unit, number, row, columns.output, required=True)
    if not instruction.strip():
        raise DataError(source, number, columns.messages or columns.instruction, "empty instruction", unit=unit)
    if not output.strip():
        raise DataError(source, number, columns.messages or columns.output, "empty output", unit=unit)
    return Record(instruction, input_text, output, row, source, number, index)


def load_records(source: str | Path, columns: ColumnMap | None = None,
                 duplicates: Literal["keep", "drop"] = "keep", limit: int | None = None,
                 bad_records: BadRecords = "error") -> Records:
    """Load and validate every record of ``source`` (up to ``limit`` usable ones), reporting duplicates.

    ``bad_records``: ``error`` raises on the first unusable record; ``skip`` leaves it out, logs one
    warning, and lists it in the result's ``skipped``. A source with no usable record is an error either
    way. Duplicates share ``(instruction, input)``; they are logged, and kept or dropped (first kept).
    """
    if duplicates not in {"keep", "drop"}:
        raise DataError(str(source), None, None, f"duplicates must be 'keep' or 'drop', not '{duplicates}'")
    records = Records()
    first_seen: dict[tuple[str, str], int] = {}  # key -> line number; the key reuses the record's strings
    n_dup = 0
    for record in iter_records(source, columns, bad_records=bad_records, skipped=records.skipped):
        if limit is not None and len(records) >= limit:
            break
        first = first_seen.setdefault(record.key, record.number)
        if first != record.number:
            n_dup += 1
            if n_dup <= 3:
                log.warning("duplicate instruction at %s (first at %s:%d)", record.where, record.source, first)
            if duplicates == "drop":
                continue
        records.append(record)
    if not records:
        bad = f" ({records.skipped.describe()})" if records.skipped.total else ""
        raise DataError(str(source), None, None, f"no usable records{bad}")
    if records.skipped.total:
        log.warning("%s: %s", source, records.skipped.describe())
    if n_dup:
        log.warning("%d duplicate record(s) in %s: %s", n_dup, source, "dropped" if duplicates == "drop" else "kept")
    return records


# ------------------------------------------------------------------------------------------ templating
@dataclass(frozen=True)
class Encoded:
    """Token ids of one record: the formatted prompt, then the response (ends with end-of-turn/EOS)."""

    prompt_ids: list[int]
    response_ids: list[int]
    truncated: bool = False

    @property
    def input_ids(self) -> list[int]:
        return self.prompt_ids + self.response_ids

    def first_response_tokens(self, n: int) -> Encoded:
        """The same prompt with only the first ``n`` response tokens (a cheaper, approximate score)."""
        return Encoded(self.prompt_ids, self.response_ids[:n], self.truncated)


class PromptFormatter:
    """Formats records into prompt and response token ids with one template for every stage.

    ``template``: ``auto`` (the tokenizer's chat template when it has one, else Alpaca), ``chat`` or
    ``alpaca``. Selection scores only response tokens and recovery masks prompt tokens, so both
    stages rely on :meth:`encode` for the split.

    Truncation to ``max_length``: the response keeps at least a quarter of the window (or all of
    itself if shorter); the prompt keeps its *end* (where the task and the assistant header are) and
    the response its beginning.
    """

    def __init__(self, tokenizer: Any, template: Literal["auto", "chat", "alpaca"] = "auto",
                 max_length: int | None = 256):
        if template not in {"auto", "chat", "alpaca"}:
            raise ValueError(f"template must be auto, chat or alpaca, not '{template}'")
        has_chat = bool(getattr(tokenizer, "chat_template", None))
        if template == "chat" and not has_chat:
            raise ValueError("template 'chat' requested but the tokenizer has no chat template")
        self.tokenizer = tokenizer
        self.kind = "chat" if (template == "chat" or (template == "auto" and has_chat)) else "alpaca"
        self.max_length = max_length

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What determines the token ids: for cache keys."""
        template = self.tokenizer.chat_template if self.kind == "chat" else ALPACA_PROMPT + ALPACA_PROMPT_WITH_INPUT
        return {"kind": self.kind, "template": template, "max_length": self.max_length}

    def prompt_text(self, record: Record) -> str:
        if self.kind == "chat":
            return self.tokenizer.apply_chat_template(
                [{"role": "user", "content": record.user_text}], tokenize=False, add_generation_prompt=True)
        template = ALPACA_PROMPT_WITH_INPUT if record.input else ALPACA_PROMPT
        return template.format(instruction=record.instruction, input=record.input)

    def prompt_ids(self, record: Record) -> list[int]:
        """Prompt ids alone (for generation)."""
        text = self.prompt_text(record)
        return self.tokenizer(text, add_special_tokens=self.kind == "alpaca")["input_ids"]

    def encode(self, record: Record) -> Encoded:
        tok = self.tokenizer
        prompt_text = self.prompt_text(record)
        if self.kind == "chat":
            full_text = tok.apply_chat_template(
                [{"role": "user", "content": record.user_text}, {"role": "assistant", "content": record.output}],
                tokenize=False)
            prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
            full_ids = tok(full_text, add_special_tokens=False)["input_ids"]
            if full_text.startswith(prompt_text) and full_ids[: len(prompt_ids)] == prompt_ids:
                response_ids = full_ids[len(prompt_ids):]
            else:  # a template whose prompt is not a prefix of the conversation: encode the rest alone
                response_ids = tok(full_text[len(prompt_text):] if full_text.startswith(prompt_text)
                                   else record.output + (tok.eos_token or ""), add_special_tokens=False)["input_ids"]
        else:
            prompt_ids = tok(prompt_text, add_special_tokens=True)["input_ids"]
            response_ids = tok(record.output, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return self._truncate(prompt_ids, response_ids)

    def _truncate(self, prompt_ids: list[int], response_ids: list[int]) -> Encoded:
        limit = self.max_length
        if limit is None or len(prompt_ids) + len(response_ids) <= limit:
            return Encoded(prompt_ids, response_ids)
        keep_response = min(len(response_ids), max(limit - len(prompt_ids), limit // 4))
        keep_prompt = limit - keep_response
        return Encoded(prompt_ids[len(prompt_ids) - keep_prompt:], response_ids[:keep_response], truncated=True)

    def encode_all(self, records: Sequence[Record]) -> list[Encoded]:
        return [self.encode(r) for r in records]


def encode_records(formatter: PromptFormatter, records: Sequence[Record], bad_records: BadRecords = "error",
                   skipped: SkippedRecords | None = None) -> tuple[list[Record], list[Encoded]]:
    """Encode records, leaving out (``skip``) or refusing (``error``) those with no response token to
    train on or score within ``formatter.max_length``. Returns the kept records and their encodings."""
    kept: list[Record] = []
    encoded: list[Encoded] = []
    for record in records:
        e = formatter.encode(record)
        if not e.response_ids:
            error = DataError(record.source, record.number, "output",
                              f"no response token within max_length {formatter.max_length}",
                              reason="no response token")
            if bad_records == "error":
                raise error
            if skipped is not None:
                skipped.add(error)
            continue
        kept.append(record)
        encoded.append(e)
    return kept, encoded


def pad_right(sequences: Sequence[Sequence[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(ids, attention_mask)`` tensors for a batch of token id lists."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[row, :len(seq)] = 1
    return ids, attention


def sample_data(data: dict[str, Any], directory: Path) -> dict[str, Any]:
    """Write ``slice.jsonl`` (``data.sample``: n records, seeded, stratified by a field when present) and,
    from the records the slice leaves, ``heldout.jsonl`` and ``calibration.jsonl``; returns counts."""

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
