import json
from pathlib import Path

import pytest

from paser.data import iter_dict_records
from paser.demo_data import demo_records
from paser.errors import ConfigError
from paser.models import load_tokenizer
from paser.recovery import RecoverConfig, resolve_recovery, run_recovery
from paser.targets import TARGETS
from tests_helpers import patch_everywhere


def _records(n):
    return list(iter_dict_records(demo_records()["train"][:n], source="demo"))


def _settings(tmp_path, teacher, **overrides):
    base = dict(model=str(teacher), data="-", out=tmp_path / "o", teacher=str(teacher), target_max_new_tokens=6,
                target_batch_size=4, dtype="fp32")
    return RecoverConfig(**(base | overrides))


def test_original_targets_are_generated_once_cached_and_resumed(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("PASER_CACHE", str(tmp_path / "cache"))
    records = _records(10)
    tokenizer = load_tokenizer(str(tiny_model_dir))
    target = TARGETS.get("original")
    built, info = target.build(records, _settings(tmp_path, tiny_model_dir), tokenizer, "fp32")
    assert info["generated_records"] == 10 and info["cached_records"] == 0
    assert len(built) == 10 and [r.instruction for r in built] == [r.instruction for r in records]
    kept = [b.output == r.output for b, r in zip(built, records)]
    assert sum(kept) == info["empty_kept_reference"]  # only empty answers keep the reference
    assert info["truncated"] <= 10 - info["empty_kept_reference"]
    store = Path(info["cache"])

    # a second build reads every answer from the cache: no model is loaded
    patch_everywhere(monkeypatch, "paser.models.load_model", lambda *a, **k: pytest.fail("model loaded despite cache"))
    again, info2 = target.build(records, _settings(tmp_path, tiny_model_dir), tokenizer, "fp32")
    assert info2["generated_records"] == 0 and [r.output for r in again] == [r.output for r in built]
    monkeypatch.undo()
    monkeypatch.setenv("PASER_CACHE", str(tmp_path / "cache"))

    # a killed run: four answers stored and a torn line; the rest is generated, the stored ones kept
    lines = store.read_text(encoding="utf-8").splitlines()
    with open(store, "w", encoding="utf-8") as handle:
        handle.write("\n".join(lines[:4]) + "\n" + lines[4][: len(lines[4]) // 2])
    resumed, info3 = target.build(records, _settings(tmp_path, tiny_model_dir), tokenizer, "fp32")
    assert info3["cached_records"] == 4 and info3["generated_records"] == 6
    assert [r.output for r in resumed] == [r.output for r in built]  # greedy: the same answers

    # other generation settings are another cache entry
    _, info4 = target.build(records[:2], _settings(tmp_path, tiny_model_dir, target_max_new_tokens=3), tokenizer,
                            "fp32")
    assert info4["generated_records"] == 2 and info4["cache"] != store


def test_empty_answers_keep_the_reference(tmp_path, tiny_model_dir, monkeypatch):
    from paser.generate import Answer

    monkeypatch.setenv("PASER_CACHE", str(tmp_path / "cache"))
    records = _records(4)

    def fake_generate(model, tokenizer, prompts, *args, on_batch=None, **kwargs):
        answers = [Answer("" if i % 2 else f"answer {i}", 0 if i % 2 else 2, i != 2) for i in range(len(prompts))]
        on_batch(list(range(len(prompts))), answers)
        return answers

    patch_everywhere(monkeypatch, "paser.generate.generate", fake_generate)
    built, info = TARGETS.get("original").build(records, _settings(tmp_path, tiny_model_dir),
                                                load_tokenizer(str(tiny_model_dir)), "fp32")
    assert [r.output for r in built] == ["answer 0", records[1].output, "answer 2", records[3].output]
    assert info["empty_kept_reference"] == 2 and info["truncated"] == 1 and info["target_tokens"] == 4


def test_recovery_on_original_targets(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("PASER_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in demo_records()["train"][:16]))
    config = RecoverConfig(model=str(tiny_model_dir), data=str(data), out=tmp_path / "rec", epochs=1, batch_size=8,
                           micro_batch_size=4, dtype="fp32", cutoff_len=64, targets="original",
                           teacher=str(tiny_model_dir), target_max_new_tokens=8)
    log = run_recovery(config)
    assert log["targets"]["targets"] == "original" and log["targets"]["generated_records"] == 16
    assert log["targets"]["generation_seconds"] >= 0 and log["trained_tokens"] > 0
    with pytest.raises(ConfigError, match="needs the original model"):
        resolve_recovery(RecoverConfig(model=str(tiny_model_dir), data=str(data), out=tmp_path / "r2", targets="original"))
    with pytest.raises(ConfigError, match="targets must be one of"):
        RecoverConfig(model=str(tiny_model_dir), data=str(data), out=tmp_path / "r3", targets="nope").validate()


def test_a_token_budget_survives_longer_targets(tmp_path, tiny_model_dir, monkeypatch):
    """max_train_tokens: records are trained on in selection order while their tokens fit, whatever the targets
    did to the answers' lengths; the dropped count is in train_log.json."""
    from paser.recovery.data import within_tokens

    monkeypatch.setenv("PASER_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in demo_records()["train"][:16]))
    config = RecoverConfig(model=str(tiny_model_dir), data=str(data), out=tmp_path / "rec", epochs=1, batch_size=4,
                           micro_batch_size=4, dtype="fp32", cutoff_len=64, targets="original",
                           teacher=str(tiny_model_dir), target_max_new_tokens=8, max_train_tokens=200,
                           method="end-to-end")  # one pass: trained_tokens is the budget's
    log = run_recovery(config)
    assert log["trained_tokens"] <= 200 and log["records"] + log["targets"]["dropped_for_token_budget"] == 16

    class Item:
        def __init__(self, n):
            self.input_ids = [0] * n

    kept, dropped = within_tokens([Item(5), Item(4), Item(3), Item(9)], 12)
    assert [len(e.input_ids) for e in kept] == [5, 4, 3] and dropped == 1
    kept, dropped = within_tokens([Item(20), Item(1)], 12)  # one record at least
    assert len(kept) == 1 and dropped == 1
