"""Instruction data: the only place in paser that reads instruction files.

Records are Alpaca-style (``instruction``, ``input``, ``output``); extra fields are kept untouched in
``Record.raw``. Sources: JSON (an array), JSONL, parquet, CSV, a hub dataset name, ``demo`` (the
built-in demo set) or ``demo-heldout`` (its held-out questions). Other schemas map onto the three
fields with a :class:`ColumnMap` (``question``/``answer``, ``prompt``/``response`` and chat ``messages``
are detected automatically).

Everything is validated before any heavy work: the first bad record raises :class:`DataError` naming
the file, the line (or record/row) and the field.
"""

from __future__ import annotations

import csv
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, Sequence

import torch

from .errors import DataError

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
    def parse(cls, text: str) -> "ColumnMap":
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
def _iter_raw(source: str) -> Iterator[tuple[str, int, Any]]:
    """Yield ``(unit, number, raw_row)`` from a file or hub dataset, streaming where the format allows."""
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_file():
        if suffix in {".jsonl", ".ndjson"}:
            with open(path, encoding="utf-8") as f:
                for lineno, line in enumerate(f, start=1):
                    line = line.rstrip("\r\n")  # so a truncated line reports its own column, not "line 2"
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except json.JSONDecodeError as exc:
                        raise DataError(source, lineno, None, f"malformed JSON ({exc.msg} at column {exc.colno})")
                    yield "line", lineno, row
        elif suffix == ".json":
            try:
                with open(path, encoding="utf-8") as f:
                    rows = json.load(f)
            except json.JSONDecodeError as exc:
                raise DataError(source, exc.lineno, None, f"malformed JSON ({exc.msg} at column {exc.colno})")
            if isinstance(rows, dict) and len(rows) == 1 and isinstance(next(iter(rows.values())), list):
                rows = next(iter(rows.values()))  # {"data": [...]} wrappers
            if not isinstance(rows, list):
                raise DataError(source, None, None, "a .json file must hold an array of records (use .jsonl for one per line)")
            for i, row in enumerate(rows, start=1):
                yield "record", i, row
        elif suffix == ".csv":
            with open(path, encoding="utf-8", newline="") as f:
                # Row numbers are file lines: the header is line 1.
                for lineno, row in enumerate(csv.DictReader(f), start=2):
                    yield "line", lineno, row
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            number = 0
            for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
                for row in batch.to_pylist():
                    number += 1
                    yield "row", number, row
        else:
            raise DataError(source, None, None, f"unsupported file type '{suffix}' (use .jsonl, .json, .csv or .parquet)")
        return
    if path.exists() or source.startswith((".", "/", "~")) or suffix in {".jsonl", ".json", ".csv", ".parquet"}:
        raise DataError(source, None, None, "file not found")
    yield from _iter_hub(source)


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


def _detect_columns(source: str, row: Any) -> ColumnMap:
    if isinstance(row, dict):
        for schema in KNOWN_SCHEMAS:
            needed = [schema.messages] if schema.messages else [schema.instruction, schema.output]
            if all(name in row for name in needed):
                return schema
        fields = ", ".join(sorted(map(str, row))) or "none"
        raise DataError(source, None, None,
                        f"cannot tell which fields hold instruction and output (fields: {fields}); "
                        "pass --columns instruction=FIELD,output=FIELD[,input=FIELD]")
    raise DataError(source, None, None, "records must be JSON objects")


def _text_field(source: str, unit: str, number: int, row: dict, name: str, required: bool) -> str:
    if name not in row or row[name] is None:
        if required:
            raise DataError(source, number, name, "missing", unit=unit)
        return ""
    value = row[name]
    if not isinstance(value, str):
        raise DataError(source, number, name, f"expected a string, got {type(value).__name__}", unit=unit)
    return value


def _record_from_messages(source: str, unit: str, number: int, row: dict, column: str) -> tuple[str, str]:
    messages = row.get(column)
    if not isinstance(messages, list) or not messages:
        raise DataError(source, number, column, "expected a non-empty list of messages", unit=unit)
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str) or "role" not in m:
            raise DataError(source, number, f"{column}[{i}]", "expected {'role': ..., 'content': str}", unit=unit)
    roles = [m["role"] for m in messages]
    if roles[-1] not in {"assistant", "gpt"}:
        raise DataError(source, number, column, "the last message must be the assistant's", unit=unit)
    users = [i for i, r in enumerate(roles[:-1]) if r in {"user", "human"}]
    if not users:
        raise DataError(source, number, column, "no user message before the assistant's", unit=unit)
    return messages[users[-1]]["content"], messages[-1]["content"]


DEMO_SOURCES = {"demo": "train", "demo-heldout": "heldout"}  # the built-in demo set's splits


def iter_records(source: str | Path, columns: ColumnMap | None = None) -> Iterator[Record]:
    """Stream validated records from ``source``; the first invalid one raises :class:`DataError`."""
    source = str(source)
    if source in DEMO_SOURCES:
        from .demo_data import demo_records

        yield from iter_dict_records(demo_records()[DEMO_SOURCES[source]], source=source)
        return
    yield from iter_dict_records(_iter_raw(source), source=source, columns=columns)


def iter_dict_records(rows: Iterable[Any], source: str, columns: ColumnMap | None = None) -> Iterator[Record]:
    """Validate in-memory rows (dicts, or ``(unit, number, dict)`` triples) into records."""
    for n, item in enumerate(rows, start=1):
        unit, number, row = item if isinstance(item, tuple) else ("record", n, item)
        if not isinstance(row, dict):
            raise DataError(source, number, None, f"expected a JSON object, got {type(row).__name__}", unit=unit)
        if columns is None:
            columns = _detect_columns(source, row)
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
        yield Record(instruction, input_text, output, row, source, number)


def load_records(source: str | Path, columns: ColumnMap | None = None,
                 duplicates: Literal["keep", "drop"] = "keep", limit: int | None = None) -> list[Record]:
    """Load and validate every record of ``source`` (up to ``limit``), reporting duplicates.

    Duplicates share ``(instruction, input)``; they are logged, and kept or dropped (first kept).
    """
    if duplicates not in {"keep", "drop"}:
        raise DataError(str(source), None, None, f"duplicates must be 'keep' or 'drop', not '{duplicates}'")
    records: list[Record] = []
    first_seen: dict[tuple[str, str], int] = {}  # key -> line number; the key reuses the record's strings
    n_dup = 0
    for record in iter_records(source, columns):
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
        raise DataError(str(source), None, None, "no records")
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


def pad_right(sequences: Sequence[Sequence[int]], pad_value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``(ids, attention_mask)`` tensors for a batch of token id lists."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_value, dtype=torch.long)
    attention = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        attention[row, :len(seq)] = 1
    return ids, attention
