"""The memory plan: each method states what it needs from the models' configs alone, before any weight loads;
auto steps down to what fits and says so; an explicit method that cannot fit stops with the figures."""

import pytest

from paser.errors import ConfigError
from paser.recovery import RECOVERY_METHODS, resolve_recovery
from paser.recovery.memory import GB, RUNTIME, Shape
from test_recover import small_config


def test_a_shape_is_read_from_the_config_alone(tiny_model_dir):
    from paser.models import load_model

    shape = Shape.of(str(tiny_model_dir))
    model, _ = load_model(str(tiny_model_dir), dtype="fp32")
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    assert shape.block == sum(p.numel() for p in model.model.layers[0].parameters())
    assert shape.layers == model.config.num_hidden_layers and shape.vocab == model.config.vocab_size


def test_each_method_states_its_parts(tmp_path, sparse_tiny, tiny_model_dir):
    config = small_config(tmp_path, sparse_tiny, teacher=str(tiny_model_dir), loss="kd", method="blockwise+kd")
    shape = Shape.of(str(sparse_tiny))
    e2e = RECOVERY_METHODS.get("end-to-end").need(config)
    assert e2e.parts["student"] == e2e.parts["original"] == 4 * shape.parameters  # fp32
    assert e2e.total == RUNTIME + sum(e2e.parts.values())
    topk = RECOVERY_METHODS.get("end-to-end").need(config.__class__(**{**config.__dict__, "teacher_cache": "topk"}))
    assert "original" not in topk.parts and topk.total < e2e.total
    blocks = RECOVERY_METHODS.get("blockwise").need(config)
    assert blocks.parts["trained block"] == 16 * shape.block and "student" not in blocks.parts
    both = RECOVERY_METHODS.get("blockwise+kd").need(config)
    assert both.total == max(e2e.total, blocks.total)


def _resolve(monkeypatch, config, limit_bytes):
    monkeypatch.setenv("PASER_MEMORY_GB", repr((limit_bytes + 64) / GB))
    return resolve_recovery(config, announce=False)


def test_auto_steps_down_to_what_fits_and_an_explicit_method_stops(tmp_path, sparse_tiny, tiny_model_dir,
                                                                   monkeypatch):
    from dataclasses import replace

    config = small_config(tmp_path, sparse_tiny, teacher=str(tiny_model_dir), loss="kd", method="auto",
                          block_batch_tokens=64)
    methods = {n: RECOVERY_METHODS.get(n) for n in ("end-to-end", "blockwise", "blockwise+kd")}
    full = methods["blockwise+kd"].need(replace(config, method="blockwise+kd")).total
    topk = methods["end-to-end"].need(replace(config, teacher_cache="topk")).total
    blocks = methods["blockwise"].need(config).total
    assert blocks < topk < full

    plenty = _resolve(monkeypatch, config, full)
    assert plenty.config.method == "blockwise+kd" and plenty.config.teacher_cache == "none"
    assert plenty.record()["memory"]["need_bytes"] == full and not plenty.warnings

    stored = _resolve(monkeypatch, config, topk)
    assert stored.config.method == "blockwise+kd" and stored.config.teacher_cache == "topk"
    assert stored.choices["teacher_cache"]["chosen"] == "topk" and "--teacher-cache topk" in stored.warnings[0]

    alone = _resolve(monkeypatch, config, blocks)
    assert alone.config.method == "blockwise" and "--method blockwise" in alone.warnings[0]

    with pytest.raises(ConfigError, match="nothing paser would change fits"):
        _resolve(monkeypatch, config, blocks - 4096)
    explicit = replace(config, method="end-to-end")
    with pytest.raises(ConfigError, match=r"method end-to-end needs .* \(student .*--teacher-cache topk needs"):
        _resolve(monkeypatch, explicit, topk)
