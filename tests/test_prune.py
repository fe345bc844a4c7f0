import json

import pytest
import torch

from paser.errors import ConfigError
from paser.prune import PruneConfig, decoder_linears, magnitude_prune_, run_prune
from tests_helpers import patch_everywhere


def test_magnitude_prune_zeroes_exactly_the_smallest_half_per_row(tiny_model_dir):
    from paser.models import load_model

    model, _ = load_model(str(tiny_model_dir))
    before = model.model.layers[0].mlp.up_proj.weight.clone()
    magnitude_prune_(model, 0.5)
    after = model.model.layers[0].mlp.up_proj.weight
    assert ((after == 0).sum(dim=1) == before.shape[1] // 2).all()
    kept = after != 0
    assert torch.equal(after[kept], before[kept])
    magnitude = before.abs()
    dropped_max = magnitude.masked_fill(kept, 0).amax(dim=1)
    kept_min = magnitude.masked_fill(~kept, float("inf")).amin(dim=1)
    assert (dropped_max <= kept_min).all()  # per output row, the smallest half went
    assert (model.lm_head.weight != 0).all()


def groups_hold_zeros(weight, n, m):
    return bool(((weight.view(weight.shape[0], -1, m) == 0).sum(-1) >= n).all())


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "magnitude"])
def test_unstructured_and_2_4(tmp_path, tiny_model_dir, method):
    from transformers import AutoModelForCausalLM

    report = run_prune(PruneConfig(model=str(tiny_model_dir), out=tmp_path / "p", method=method, sparsity=0.5,
                                   calib_samples=16, heldout_samples=4, seq_len=64))
    for layer in report["layers"].values():
        assert abs(layer["achieved"] - 0.5) <= 0.005
    assert report["perplexity_after"] > 0 and report["parameters_before"] == report["parameters_after"]
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert "quantization_config" not in config and "compression_config" not in config
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "p")
    for module in decoder_linears(reloaded).values():
        assert abs((module.weight == 0).float().mean().item() - 0.5) <= 0.005
    assert json.loads((tmp_path / "p" / "prune_report.json").read_text())["method"] == method

    run_prune(PruneConfig(model=str(tiny_model_dir), out=tmp_path / "nm", method=method, sparsity=0.5, pattern="2:4",
                          calib_samples=16, heldout_samples=4, seq_len=64))
    for module in decoder_linears(AutoModelForCausalLM.from_pretrained(tmp_path / "nm")).values():
        assert groups_hold_zeros(module.weight, 2, 4)


@pytest.mark.parametrize("overrides, error, message", [
    ({"sparsity": 0.0}, ConfigError, "sparsity must be greater than 0"),
    ({"sparsity": 1.0}, ConfigError, "sparsity must be less than 1"),
    ({"seq_len": 4}, ConfigError, "seq_len must be greater than or equal to 8"),
    ({"pattern": "2:4", "sparsity": 0.6}, ConfigError, "means sparsity 0.5"),
    ({"pattern": "4:2"}, ConfigError, "0 < N < M"),
    ({"pattern": "two:four"}, ConfigError, "N:M"),
    ({"method": "random"}, ConfigError, "method must be"),
    ({"method": "taylor", "pattern": "2:4"}, ConfigError, "not taylor"),
])
def test_bad_requests_fail_before_work(tmp_path, overrides, error, message, monkeypatch):
    patch_everywhere(monkeypatch, "paser.models.load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(error, match=message):
        run_prune(PruneConfig(**({"model": "x", "out": tmp_path / "o"} | overrides)))




def test_calibration_windows_are_full_and_packed(tiny_tokenizer, tmp_path):
    from paser.data import PromptFormatter, load_records
    from paser.prune import calibration_sequences

    windows = calibration_sequences("demo", tiny_tokenizer, 5, 32)
    assert len(windows) == 5 and all(len(w) == 32 for w in windows)
    formatter = PromptFormatter(tiny_tokenizer, max_length=32)
    packed = sum((formatter.encode(r).input_ids for r in load_records("demo", limit=40)), [])
    assert sum(windows, []) == packed[:160]
    text = tmp_path / "calib.txt"
    text.write_text("the cat sat on the mat. " * 40)
    chunks = calibration_sequences(str(text), tiny_tokenizer, 3, 16)
    assert len(chunks) == 3 and sum(chunks, []) == tiny_tokenizer(text.read_text(), add_special_tokens=False)["input_ids"][:48]
