import json
import subprocess
import sys

import pandas as pd
import pytest

from paser.data import ColumnMap, PromptFormatter, Record, iter_records, load_records
from paser.errors import DataError

GOOD = {"instruction": "Add the numbers.", "input": "2 3", "output": "5"}


def write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    "bad, field, problem",
    [
        ('{"instruction": "x", "output": ', None, "malformed JSON"),
        ('[1, 2]', None, "expected a JSON object"),
        ({"instruction": "x"}, "output", "missing"),
        ({"instruction": "x", "output": 5}, "output", "expected a string, got int"),
        ({"instruction": "x", "input": ["a"], "output": "y"}, "input", "expected a string, got list"),
        ({"instruction": "   ", "output": "y"}, "instruction", "empty instruction"),
        ({"instruction": "x", "output": ""}, "output", "empty output"),
        ({"instruction": None, "output": "y"}, "instruction", "missing"),
    ],
)
def test_validation_names_file_line_and_field(tmp_path, bad, field, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD | {"input": "4 5"}, bad, GOOD])
    with pytest.raises(DataError) as info:
        load_records(path)
    err = info.value
    assert (err.line, err.field) == (3, field)
    assert problem in str(err) and str(path) in str(err) and "line 3" in str(err)
    assert "\n" not in str(err)


def test_unknown_schema_lists_fields(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "a", "a": "b"}])
    with pytest.raises(DataError, match=r"fields: a, q.*--columns"):
        load_records(path)


def test_missing_and_unsupported_files(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_records(tmp_path / "nope.jsonl")
    (tmp_path / "d.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        load_records(tmp_path / "d.txt")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no usable records"):
        load_records(tmp_path / "empty.jsonl")


def test_hub_name_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(DataError, match="no-such-org/no-such-dataset: not a local file"):
        load_records("no-such-org/no-such-dataset")


def test_formats_json_csv_parquet_and_extra_fields(tmp_path):
    rows = [GOOD | {"source": "s1"}, {"instruction": "Say hi.", "input": "", "output": "hi", "source": "s2"}]
    (tmp_path / "d.json").write_text(json.dumps(rows))
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    for name in ("d.json", "d.csv", "d.parquet"):
        records = load_records(tmp_path / name)
        assert [(r.instruction, r.input, r.output) for r in records] == [
            ("Add the numbers.", "2 3", "5"), ("Say hi.", "", "hi")]
        assert records[0].raw["source"] == "s1"


def test_json_array_error_names_record(tmp_path):
    (tmp_path / "d.json").write_text(json.dumps([GOOD, {"instruction": "x", "output": 1}]))
    with pytest.raises(DataError, match=r"record 2: field 'output'"):
        load_records(tmp_path / "d.json")


def test_csv_error_names_file_line(tmp_path):
    (tmp_path / "d.csv").write_text("instruction,input,output\nA,,b\nC,,\n")
    with pytest.raises(DataError, match=r"line 3: field 'output': empty output"):
        load_records(tmp_path / "d.csv")


def test_column_maps_and_chat_messages(tmp_path):
    qa = write_jsonl(tmp_path / "qa.jsonl", [{"question": "Q?", "answer": "A."}])
    assert load_records(qa)[0].output == "A."
    pr = write_jsonl(tmp_path / "pr.jsonl", [{"prompt": "P", "response": "R"}])
    assert load_records(pr)[0].instruction == "P"
    custom = write_jsonl(tmp_path / "c.jsonl", [{"q": "Q", "ctx": "C", "a": "A"}])
    record = load_records(custom, ColumnMap.parse("instruction=q,input=ctx,output=a"))[0]
    assert (record.instruction, record.input, record.output) == ("Q", "C", "A")
    chat = write_jsonl(tmp_path / "m.jsonl", [{"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "U"}, {"role": "assistant", "content": "A"}]}])
    record = load_records(chat)[0]
    assert (record.instruction, record.output) == ("U", "A")
    bad_chat = write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": "U"}]}])
    with pytest.raises(DataError, match="last message must be the assistant's"):
        load_records(bad_chat)
    with pytest.raises(DataError, match="expected KEY=FIELD"):
        ColumnMap.parse("question")


def test_duplicates_kept_or_dropped(tmp_path, caplog):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD | {"output": "five"}, {"instruction": "Other", "output": "x"}])
    assert len(load_records(path)) == 3
    assert "1 duplicate record(s)" in caplog.text
    kept = load_records(path, duplicates="drop")
    assert [r.output for r in kept] == ["5", "x"]


def test_streaming_reads_lazily(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [GOOD, GOOD, "not json"])
    stream = iter_records(path)
    assert next(stream).output == "5"  # the broken line 3 has not been read yet
    assert next(stream).output == "5"
    with pytest.raises(DataError, match="line 3"):
        next(stream)


def test_cli_reports_one_line_error(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, GOOD, '{"instruction": "x"']),
    result = subprocess.run([sys.executable, "-m", "paser.cli", "validate", str(path[0])],
                            capture_output=True, text=True)
    assert result.returncode == 2
    errors = [line for line in result.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "line 3" in errors[0]  # (the duplicate-record warning is logged on stderr too)
    assert "Traceback" not in result.stderr
    debug = subprocess.run([sys.executable, "-m", "paser.cli", "--debug", "validate", str(path[0])],
                           capture_output=True, text=True)
    assert debug.returncode != 0 and "Traceback" in debug.stderr


# ----------------------------------------------------------------------------------------- templating
def test_chat_split_matches_template(tiny_tokenizer):
    formatter = PromptFormatter(tiny_tokenizer, max_length=None)
    assert formatter.kind == "chat"
    record = Record("Reverse the word.", "planet", "tenalp", {})
    encoded = formatter.encode(record)
    conversation = tiny_tokenizer.apply_chat_template(
        [{"role": "user", "content": "Reverse the word.\n\nplanet"}, {"role": "assistant", "content": "tenalp"}],
        tokenize=False)
    assert encoded.input_ids == tiny_tokenizer(conversation, add_special_tokens=False)["input_ids"]
    assert tiny_tokenizer.decode(encoded.response_ids) == "tenalp<|im_end|>\n"
    assert tiny_tokenizer.decode(encoded.prompt_ids).endswith("<|im_start|>assistant\n")
    assert encoded.prompt_ids == formatter.prompt_ids(record)


def test_alpaca_split_when_no_chat_template():
    from tiny import make_tokenizer

    tok = make_tokenizer(chat=False)
    formatter = PromptFormatter(tok, max_length=None)
    assert formatter.kind == "alpaca"
    encoded = formatter.encode(Record("Say hi.", "", "hi there", {}))
    assert tok.decode(encoded.prompt_ids).endswith("### Instruction:\nSay hi.\n\n### Response:\n")
    assert encoded.response_ids[-1] == tok.eos_token_id
    assert tok.decode(encoded.response_ids[:-1]) == "hi there"
    with pytest.raises(ValueError, match="no chat template"):
        PromptFormatter(tok, template="chat")


def test_truncation_keeps_prompt_end_and_response_start(tiny_tokenizer):
    record = Record("word " * 200, "", "answer " * 100, {})
    full = PromptFormatter(tiny_tokenizer, max_length=None).encode(record)
    cut = PromptFormatter(tiny_tokenizer, max_length=64).encode(record)
    assert cut.truncated and len(cut.input_ids) == 64
    assert len(cut.response_ids) == 16  # a quarter of the window
    assert cut.prompt_ids == full.prompt_ids[-48:]
    assert cut.response_ids == full.response_ids[:16]
