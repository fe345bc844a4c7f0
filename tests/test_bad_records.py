"""Real-world data never stops a run: the bad-record policy, undecodable bytes, validate --report, fuzzing."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from paser.data import PromptFormatter, Record, Records, SkippedRecords, encode_records, iter_records, load_records
from paser.errors import DataError

GOOD = {"instruction": "Add the numbers.", "input": "2 3", "output": "5"}
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "300"}


def write_lines(path, lines):
    path.write_bytes(b"".join((line if isinstance(line, bytes) else (line if isinstance(line, str) else json.dumps(line))
                               .encode()) + b"\n" for line in lines))
    return path


def mixed_file(tmp_path):
    return write_lines(tmp_path / "mixed.jsonl", [
        GOOD,                                                  # line 1
        {"instruction": "Convert 20 inches.", "output": ""},   # line 2: empty output
        '{"instruction": "x", "output": ',                     # line 3: malformed JSON
        b'{"instruction": "caf\xe9", "output": "y"}',          # line 4: Latin-1 byte, not UTF-8
        {"instruction": "x", "output": 7},                     # line 5: not a string
        {"instruction": "Say hi.", "output": "hi"},            # line 6
        [1, 2],                                                # line 7: not an object
        {"output": "no instruction"},                          # line 8: missing field
    ])


def test_skip_counts_every_reason_and_keeps_input_indices(tmp_path, caplog):
    path = mixed_file(tmp_path)
    records = load_records(path, bad_records="skip")
    assert isinstance(records, Records)
    assert [r.instruction for r in records] == ["Add the numbers.", "Say hi."]
    assert [(r.index, r.number) for r in records] == [(0, 1), (5, 6)]  # positions in the input file
    summary = records.skipped.summary()
    assert summary["total"] == 6
    assert summary["by_reason"] == {"empty output": 1, "malformed JSON": 1, "not UTF-8": 1, "not a string": 1,
                                    "not an object": 1, "missing field": 1}
    assert sorted(e["line"] for e in summary["examples"]) == [2, 3, 4, 5, 7, 8]
    assert any(e["where"] == f"{path}:4" and e["reason"] == "not UTF-8" for e in summary["examples"])
    warnings = [r for r in caplog.records if "bad record(s) skipped" in r.getMessage()]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()


def test_error_policy_names_the_first_bad_line(tmp_path):
    with pytest.raises(DataError, match=r"line 2: field 'output': empty output"):
        load_records(mixed_file(tmp_path), bad_records="error")
    utf = write_lines(tmp_path / "u.jsonl", [GOOD, b'{"instruction": "\xff", "output": "y"}'])
    with pytest.raises(DataError, match=r"u.jsonl: line 2: not UTF-8"):
        load_records(utf)


def test_all_bad_or_empty_is_still_an_error(tmp_path):
    bad = write_lines(tmp_path / "bad.jsonl", [{"instruction": "x", "output": ""}, "{oops"])
    with pytest.raises(DataError, match=r"no usable records \(2 bad record\(s\) skipped"):
        load_records(bad, bad_records="skip")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(DataError, match="no usable records"):
        load_records(tmp_path / "empty.jsonl", bad_records="skip")


def test_undecodable_bytes_in_json_and_csv(tmp_path):
    (tmp_path / "d.json").write_bytes(b'[{"instruction": "a", "output": "b"}, {"instruction": "\xe9", "output": "c"}]')
    records = load_records(tmp_path / "d.json", bad_records="skip")
    assert len(records) == 1 and records.skipped.counts == {"not UTF-8": 1}
    with pytest.raises(DataError, match="record 2: not UTF-8"):
        load_records(tmp_path / "d.json")
    (tmp_path / "d.csv").write_bytes(b"instruction,input,output\na,,b\n\xe9,,c\nd,,e\n")
    records = load_records(tmp_path / "d.csv", bad_records="skip")
    assert [r.instruction for r in records] == ["a", "d"] and records.skipped.examples[0]["line"] == 3


def test_chat_record_without_assistant_turn_is_skipped(tmp_path):
    path = write_lines(tmp_path / "m.jsonl", [
        {"messages": [{"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]},
        {"messages": [{"role": "user", "content": "U only"}]}])
    records = load_records(path, bad_records="skip")
    assert len(records) == 1 and records.skipped.counts == {"unusable chat record": 1}


def test_schema_is_found_past_leading_bad_lines(tmp_path):
    path = write_lines(tmp_path / "d.jsonl", ["{broken", [1], GOOD, GOOD | {"input": "4"}])
    records = load_records(path, bad_records="skip")
    assert [r.index for r in records] == [2, 3] and records.skipped.total == 2


def test_records_without_a_response_token_are_skipped(tiny_tokenizer):
    class EmptyResponse(PromptFormatter):  # a template that leaves no response token, e.g. a broken one
        def encode(self, record):
            encoded = super().encode(record)
            return type(encoded)(encoded.prompt_ids, [] if record.output == "drop" else encoded.response_ids)

    formatter = EmptyResponse(tiny_tokenizer, max_length=64)
    records = [Record("a", "", "b", {}, "s", 1, 0), Record("c", "", "drop", {}, "s", 2, 1)]
    skipped = SkippedRecords()
    kept, encoded = encode_records(formatter, records, "skip", skipped)
    assert [r.index for r in kept] == [0] and len(encoded) == 1 and skipped.counts == {"no response token": 1}
    with pytest.raises(DataError, match="s: line 2: field 'output': no response token"):
        encode_records(formatter, records, "error")


def test_validate_report_lists_every_bad_line(tmp_path):
    path = mixed_file(tmp_path)
    result = subprocess.run([sys.executable, "-m", "paser.cli", "validate", str(path), "--report"],
                            capture_output=True, text=True, env=ENV)
    assert result.returncode == 1, result.stderr
    lines = result.stdout.strip().splitlines()
    assert [line.split(": line ")[1].split(":")[0] for line in lines[:-1]] == ["2", "3", "4", "5", "7", "8"]
    assert lines[-1].startswith(f"{path}: 2 valid records, 6 bad")
    strict = subprocess.run([sys.executable, "-m", "paser.cli", "validate", str(path)], capture_output=True,
                            text=True, env=ENV)
    assert strict.returncode == 2 and "line 2" in strict.stderr and "Traceback" not in strict.stderr
    utf = write_lines(tmp_path / "u.jsonl", [b'{"instruction": "\xff", "output": "y"}'])
    strict = subprocess.run([sys.executable, "-m", "paser.cli", "validate", str(utf)], capture_output=True,
                            text=True, env=ENV)
    assert strict.returncode == 2 and strict.stderr.strip() == f"error: {utf}: line 1: not UTF-8 (byte 0xff at byte 18)"


def test_real_pool_validate_report():
    from conftest import shared_path

    pool = shared_path("instruct", "pool.jsonl")
    skipped = SkippedRecords(examples_per_reason=None)
    good = sum(1 for _ in iter_records(pool, bad_records="skip", skipped=skipped))
    assert good == 30531 and skipped.counts == {"empty output": 4}
    assert [e["line"] for e in skipped.examples][0] == 1039


# ------------------------------------------------------------------------------------------------ fuzz
text = st.text(max_size=40)
value = st.one_of(text, st.integers(), st.none(), st.booleans(), st.lists(text, max_size=3),
                  st.integers(1, 4).map(lambda n: "x" * 150_000 * n))  # huge fields
alpaca = st.fixed_dictionaries({"instruction": value, "output": value}, optional={"input": value, "extra": value})
qa = st.fixed_dictionaries({"question": value, "answer": value})
chat = st.fixed_dictionaries({"messages": st.one_of(value, st.lists(st.one_of(value, st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "assistant", "system", "gpt", "x"]), "content": value})), max_size=4))})
row = st.one_of(alpaca, qa, chat, st.dictionaries(text, value, max_size=3), value)


def _outcome(path, policy):
    try:
        records = load_records(path, bad_records=policy)
    except DataError as exc:
        assert str(path) in str(exc) and "\n" not in str(exc)
        return "error"
    assert len(records) >= 1 and all(isinstance(r, Record) for r in records)
    assert all(r.instruction.strip() and r.output.strip() for r in records)
    if policy == "error":
        assert records.skipped.total == 0
    return "records"


def _line(r, cut):
    line = json.dumps(r, ensure_ascii=False).encode()
    return line[:cut] if cut else line


FUZZ = settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow, HealthCheck.data_too_large])


@FUZZ
@given(rows=st.lists(st.tuples(row, st.one_of(st.none(), st.integers(1, 30))), max_size=8),
       noise=st.lists(st.binary(max_size=30), max_size=3))
def test_fuzz_jsonl(tmp_path_factory, rows, noise):
    path = tmp_path_factory.mktemp("fz") / "d.jsonl"
    path.write_bytes(b"\n".join([_line(r, cut) for r, cut in rows] + noise))
    for policy in ("skip", "error"):
        _outcome(path, policy)


@FUZZ
@given(rows=st.one_of(st.lists(row, max_size=8), row), raw=st.one_of(st.none(), st.binary(max_size=60)))
def test_fuzz_json_array(tmp_path_factory, rows, raw):
    path = tmp_path_factory.mktemp("fz") / "d.json"
    path.write_bytes(raw if raw is not None else json.dumps(rows).encode())
    for policy in ("skip", "error"):
        _outcome(path, policy)


@FUZZ
@given(header=st.lists(st.sampled_from(["instruction", "input", "output", "question", "answer", "x"]), max_size=4),
       body=st.lists(st.lists(st.one_of(text, st.binary(max_size=8).map(lambda b: b.decode("latin-1")),
                                        st.just("a" * 140_000), st.just('"unclosed')), max_size=5), max_size=6))
def test_fuzz_csv(tmp_path_factory, header, body):
    path = tmp_path_factory.mktemp("fz") / "d.csv"
    lines = [",".join(header)] + [",".join(cells) for cells in body]
    path.write_bytes("\n".join(lines).encode("utf-8", errors="surrogateescape").replace(b"\xc3\xa9", b"\xe9"))
    for policy in ("skip", "error"):
        _outcome(path, policy)


@FUZZ
@given(rows=st.lists(st.fixed_dictionaries({"instruction": st.one_of(text, st.none()),
                                            "output": st.one_of(text, st.none())}), max_size=6),
       raw=st.one_of(st.none(), st.binary(max_size=60)))
def test_fuzz_parquet(tmp_path_factory, rows, raw):
    path = tmp_path_factory.mktemp("fz") / "d.parquet"
    if raw is not None:
        path.write_bytes(raw)
    else:
        pd.DataFrame(rows, columns=["instruction", "output"]).to_parquet(path)
    for policy in ("skip", "error"):
        _outcome(path, policy)
