"""paser export: compressed-tensors checkpoints that keep the pruned zeros, load back, and are written whole or
not at all."""

import json
import os
import signal
import subprocess
import sys

import pytest
import torch

from paser.errors import ConfigError, DataError, ModelError
from paser.export import ExportConfig, dequantized_model, run_export
from tiny import make_tiny_llama, save_model


@pytest.fixture(scope="module")
def sparse_dir(tmp_path_factory, tiny_tokenizer):
    """A tiny Llama (128 wide: one int4 group per row) with half of every decoder linear layer's weights zero,
    2:4 in the MLP, unstructured elsewhere."""
    model = make_tiny_llama(tiny_tokenizer, seed=3, hidden=128)
    with torch.no_grad():
        for name, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear) or "lm_head" in name:
                continue
            weight = module.weight
            if "mlp" in name:
                groups = weight.abs().reshape(-1, 4)
                smallest = groups.argsort(dim=1)[:, :2]
                weight.view(-1, 4).scatter_(1, smallest, 0.0)
            else:
                weight.masked_fill_(weight.abs() <= weight.abs().flatten().median(), 0.0)
    return save_model(model, tiny_tokenizer, tmp_path_factory.mktemp("export") / "sparse")


def _zeros(model):
    return {n: m.weight == 0 for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and "lm_head" not in n}


@pytest.mark.parametrize("fmt", ["w4a16", "w8a8"])
def test_export_keeps_every_zero_and_loads_back(tmp_path, sparse_dir, fmt):
    from transformers import AutoModelForCausalLM

    report = run_export(ExportConfig(model=str(sparse_dir), out=str(tmp_path / fmt), format=fmt))
    original = AutoModelForCausalLM.from_pretrained(sparse_dir)
    written = dequantized_model(tmp_path / fmt)
    before, after = _zeros(original), _zeros(written)
    assert report["pruned_layers"] == len(before) == 14
    for name, mask in before.items():
        assert after[name][mask].all(), f"{name}: a pruned weight is no longer zero"
        nonzero = original.get_submodule(name).weight[~mask]
        assert (nonzero - written.get_submodule(name).weight[~mask]).abs().max() < nonzero.abs().max() / 4
    mlp = written.get_submodule("model.layers.0.mlp.up_proj").weight
    assert ((mlp.reshape(-1, 4) == 0).sum(dim=1) >= 2).all(), "2:4 pattern broken"
    assert report["sparsity"]["output_min"] >= report["sparsity"]["input_min"] >= 0.5
    assert report["size_bytes"]["output_weights"] < report["size_bytes"]["input_weights"]
    config = json.loads((tmp_path / fmt / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "compressed-tensors"
    assert config["quantization_config"]["ignore"] == ["lm_head"]
    # the compressed folder runs as it is (transformers alone) and matches its dequantized weights
    compressed = AutoModelForCausalLM.from_pretrained(tmp_path / fmt)
    ids = torch.tensor([[5, 17, 42, 99, 7, 3]])
    with torch.no_grad():
        assert torch.allclose(compressed(ids).logits, written(ids).logits, atol=1e-4)
        assert (original(ids).logits - compressed(ids).logits).abs().mean() < original(ids).logits.abs().mean() / 2


def test_gptq_calibrates_on_records_and_sets_pruned_positions_back_to_zero(tmp_path, sparse_dir):
    from tests_helpers import write_demo_train

    data = write_demo_train(tmp_path / "calib.jsonl")
    report = run_export(ExportConfig(model=str(sparse_dir), out=str(tmp_path / "gptq"), format="w4a16",
                                     method="gptq", calib_data=str(data), calib_samples=16, seq_len=64))
    assert report["calibration"] == {"source": str(data), "records": 16}
    assert report["sparsity"]["output_min"] >= report["sparsity"]["input_min"]
    written = dequantized_model(tmp_path / "gptq")
    from transformers import AutoModelForCausalLM

    for name, mask in _zeros(AutoModelForCausalLM.from_pretrained(sparse_dir)).items():
        assert _zeros(written)[name][mask].all()


def test_dense_export_is_the_model_unchanged(tmp_path, sparse_dir):
    from transformers import AutoModelForCausalLM

    report = run_export(ExportConfig(model=str(sparse_dir), out=str(tmp_path / "dense"), format="dense"))
    assert report["scheme"] is None and report["size_bytes"]["weights_ratio"] == pytest.approx(1.0, abs=0.01)
    a, b = AutoModelForCausalLM.from_pretrained(sparse_dir), AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_bad_input_is_one_error_and_writes_nothing(tmp_path, sparse_dir):
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="format must be one of dense, w4a16, w8a8"):
        run_export(ExportConfig(model=str(sparse_dir), out=str(out), format="w5"))
    with pytest.raises(ConfigError, match="--method applies to w4a16 and w8a8"):
        run_export(ExportConfig(model=str(sparse_dir), out=str(out), format="dense", method="gptq"))
    with pytest.raises(ModelError, match="no config.json"):
        run_export(ExportConfig(model=str(tmp_path), out=str(out)))
    with pytest.raises(ModelError, match="not a model folder"):
        run_export(ExportConfig(model=str(tmp_path / "missing"), out=str(out)))
    with pytest.raises(ConfigError, match="--calib-data"):
        run_export(ExportConfig(model=str(sparse_dir), out=str(out), method="gptq"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "Say hi.", "output": "hi"}\n{"instruction": "", "output": "x"}\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2: field .instruction."):
        run_export(ExportConfig(model=str(sparse_dir), out=str(out), method="gptq", calib_data=str(bad)))
    quantized = tmp_path / "q"
    run_export(ExportConfig(model=str(sparse_dir), out=str(quantized)))
    with pytest.raises(ModelError, match="already quantized"):
        run_export(ExportConfig(model=str(quantized), out=str(out)))
    assert not out.exists()


def test_a_kill_before_the_rename_leaves_the_previous_export(tmp_path, sparse_dir):
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PASER_CACHE": str(tmp_path / "cache")}
    args = [sys.executable, "-m", "paser.cli", "export", str(sparse_dir), "--out", str(out)]
    first = subprocess.run([*args, "--format", "dense"], capture_output=True, text=True, env=env)
    assert first.returncode == 0, first.stderr
    killed = subprocess.run([*args, "--format", "w4a16"], capture_output=True, text=True,
                            env={**env, "PASER_KILL_AT": "export.written:1"})
    assert killed.returncode == -signal.SIGKILL
    assert json.loads((out / "export_report.json").read_text())["format"] == "dense"  # untouched
    again = subprocess.run([*args, "--format", "w4a16"], capture_output=True, text=True, env=env)
    assert again.returncode == 0, again.stderr
    assert "min sparsity 0.5000 -> 0.5000" in again.stdout
    assert json.loads((out / "export_report.json").read_text())["format"] == "w4a16"


def test_int4_groups_shrink_to_divide_every_input_width(tmp_path, tiny_tokenizer):
    """A model whose widths are not multiples of 128 (like SmolLM2-135M's 576) gets the largest group size that
    divides them all, and still keeps its zeros."""
    from paser.prune import magnitude_prune_

    model = magnitude_prune_(make_tiny_llama(tiny_tokenizer, seed=4, hidden=96), 0.5)  # widths 96 and 192
    folder = save_model(model, tiny_tokenizer, tmp_path / "m")
    report = run_export(ExportConfig(model=str(folder), out=str(tmp_path / "q"), format="w4a16"))
    assert report["group_size"] == 32
    assert report["sparsity"]["output_min"] >= report["sparsity"]["input_min"] >= 0.5
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert config["config_groups"]["group_0"]["weights"]["group_size"] == 32
