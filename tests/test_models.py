import json
import time
from pathlib import Path

import pytest
import torch

from paser.errors import ModelError
from paser.models import check_compatible, load_model, load_tokenizer, model_fingerprint, resolve_spec


def test_local_directory_loads_with_pad_token(tiny_model_dir):
    from paser.models import parse_dtype

    model, tok = load_model(str(tiny_model_dir))
    assert model.dtype == parse_dtype("auto") and not model.training  # bf16 only where the CPU has it natively
    assert load_model(str(tiny_model_dir), dtype="fp32", tokenizer=False)[0].dtype == torch.float32
    assert tok.pad_token is not None and model.config.pad_token_id == tok.pad_token_id
    model16, _ = load_model(str(tiny_model_dir), dtype="bf16", tokenizer=False)
    assert model16.dtype == torch.bfloat16


def test_pad_token_falls_back_to_eos(tmp_path, tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir))
    tok.pad_token = None
    tok.save_pretrained(tmp_path / "m")
    model.save_pretrained(tmp_path / "m")
    assert load_tokenizer(str(tmp_path / "m")).pad_token == tok.eos_token


def test_bad_specs_are_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="unknown dtype 'int3'"):
        load_model("whatever", dtype="int3")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        resolve_spec(str(tmp_path / "empty"))
    with pytest.raises(ModelError, match="GGUF file not found"):
        resolve_spec(str(tmp_path / "x.gguf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match="model 'no-such-org/no-such-model' could not be loaded"):
        load_model("no-such-org/no-such-model")


def test_fingerprint_changes_with_weights(tmp_path, tiny_model_dir):
    import shutil

    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy")
    before = model_fingerprint(str(copy))
    time.sleep(0.01)
    model, tok = load_model(str(copy))
    with torch.no_grad():
        model.lm_head.weight.zero_()
    model.save_pretrained(copy)
    assert model_fingerprint(str(copy)) != before


def test_compatibility_check(tiny_tokenizer):
    from tiny import make_tokenizer

    check_compatible(tiny_tokenizer, tiny_tokenizer)
    other = make_tokenizer(vocab_size=300)
    with pytest.raises(ModelError, match="tokenizers differ"):
        check_compatible(tiny_tokenizer, other)


@pytest.mark.slow
def test_embedded_model_converts_once_and_answers(embedded):
    from paser.data import PromptFormatter, Record
    from paser.evaluate import generate_answers
    from paser.models import DEFAULT_MODEL

    model, tok = embedded
    location = resolve_spec(DEFAULT_MODEL).location
    config = json.loads(Path(location, "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    assert tok.eos_token == "<|im_end|>" and tok.pad_token is not None
    assert PromptFormatter(tok).kind == "chat"
    stamp = (Path(location) / "model.safetensors").stat().st_mtime_ns
    load_model(DEFAULT_MODEL, tokenizer=False)
    assert (Path(location) / "model.safetensors").stat().st_mtime_ns == stamp  # reused, not converted again
    answer = generate_answers(model, tok, [Record("What is the capital of France?", "", "Paris", {})],
                              max_new_tokens=16, progress=False)[0]
    assert "Paris" in answer


def test_fingerprint_follows_content_not_path_or_mtime(tmp_path, monkeypatch):
    """A model copied elsewhere, or a data file provisioned afresh, keeps its key; an edit changes it."""
    import os
    import shutil

    from paser.cache import file_fingerprint
    from paser.models import model_fingerprint

    monkeypatch.setenv("PASER_CACHE", str(tmp_path / "cache"))
    first = tmp_path / "a"
    first.mkdir()
    (first / "config.json").write_text('{"layers": 2}')
    (first / "model.safetensors").write_bytes(b"\x00" * 1000)
    key = model_fingerprint(first)
    copy = tmp_path / "b"
    shutil.copytree(first, copy)
    os.utime(copy / "model.safetensors", ns=(1, 1))
    assert model_fingerprint(copy) == key
    # the same weights pruned into another folder: its report (paths, timings) differs, the key does not
    (copy / "prune_report.json").write_text('{"config": {"out": "elsewhere"}}')
    assert model_fingerprint(copy) == key
    (copy / "model.safetensors").write_bytes(b"\x00" * 999 + b"\x01")
    assert model_fingerprint(copy) != key
    # the memo is keyed by path, size and mtime: a rewrite with the same size is seen
    before = file_fingerprint(first / "config.json")
    (first / "config.json").write_text('{"layers": 3}')
    os.utime(first / "config.json", ns=(2, 2))
    assert file_fingerprint(first / "config.json")["sha256"] != before["sha256"]
