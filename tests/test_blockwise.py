"""Blockwise reconstruction: it moves each block toward the original's output, keeps every pruned zero,
resumes at the block where it was killed, and refuses what it cannot do before any work."""

import json
from dataclasses import replace

import pytest
import torch

from paser.errors import ConfigError
from paser.recovery import run_recovery
from test_recover import small_config


@pytest.fixture()
def blockwise_config(tmp_path, sparse_tiny, tiny_model_dir):
    return small_config(tmp_path, sparse_tiny, method="blockwise", teacher=str(tiny_model_dir), block_lr=3e-3,
                        block_epochs=2, block_batch_tokens=256)


def _weights(folder):
    from safetensors.torch import load_file

    return {k: v for f in sorted(folder.glob("*.safetensors")) for k, v in load_file(str(f)).items()}


def test_blockwise_reduces_every_block_error_and_keeps_zeros(blockwise_config, sparse_tiny):
    log = run_recovery(blockwise_config)
    assert log["method"] == "blockwise" and len(log["blocks"]) == 2
    for block in log["blocks"]:
        assert block["loss_after"] < block["loss_before"], block
        assert block["zeros_after"] == block["zeros_before"] > 0
    before, after = _weights(sparse_tiny), _weights(blockwise_config.out / "merged")
    assert before.keys() == after.keys()
    changed = [k for k in before if "layers" in k and not torch.equal(before[k], after[k])]
    assert changed, "no block weight moved"
    for name, weight in before.items():
        if name.endswith("proj.weight"):
            assert torch.equal(after[name][weight == 0], weight[weight == 0])  # every pruned zero stays zero
            assert (after[name] == 0).sum() == (weight == 0).sum()
    assert torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])
    assert not (blockwise_config.out / "blockwise" / "streams").exists()  # the streams are removed at the end


def test_blockwise_resumes_at_the_block_it_was_killed_in(blockwise_config, monkeypatch, tmp_path):
    from dataclasses import replace

    from paser import faults
    from paser.recovery import blockwise

    whole = run_recovery(replace(blockwise_config, out=tmp_path / "whole"))
    real_block, real_reached = blockwise.BlockwiseRun._block, faults.reached
    calls, steps_in_block_1 = [], []

    def counted(self, layer, streams):
        calls.append(layer)
        return real_block(self, layer, streams)

    def killed_two_steps_into_block_1(name):
        if name == "blockwise.step" and calls[-1] == 1:
            steps_in_block_1.append(name)
            if len(steps_in_block_1) == 2:
                raise KeyboardInterrupt
        real_reached(name)

    monkeypatch.setattr(blockwise.BlockwiseRun, "_block", counted)
    monkeypatch.setattr(faults, "reached", killed_two_steps_into_block_1)
    with pytest.raises(KeyboardInterrupt):
        run_recovery(blockwise_config)
    progress = json.loads((blockwise_config.out / "blockwise" / "progress.json").read_text())
    assert len(progress["blocks"]) == 1 and len(steps_in_block_1) == 2  # killed mid-block: block 0 kept
    monkeypatch.setattr(faults, "reached", real_reached)
    resumed = run_recovery(blockwise_config)
    assert calls == [0, 1, 1]  # block 0 once, block 1 again after the kill
    assert [b["loss_after"] for b in resumed["blocks"]] == pytest.approx([b["loss_after"] for b in whole["blocks"]])
    a, b = _weights(blockwise_config.out / "merged"), _weights(tmp_path / "whole" / "merged")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_blockwise_warns_on_a_family_it_has_not_parity_tested(blockwise_config, caplog, monkeypatch):
    import logging

    import paser.recovery.blockwise as blockwise

    monkeypatch.setattr(blockwise, "PARITY_TESTED", ("mistral",))
    with caplog.at_level(logging.WARNING, logger="paser"):
        run_recovery(replace(blockwise_config, block_epochs=1))
    assert "'llama' is not among the families whose block-by-block forward is tested (mistral)" in caplog.text


def test_blockwise_says_how_much_disk_it_needs(blockwise_config, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10, 10, 1000))
    with pytest.raises(ConfigError, match="GB of disk"):
        run_recovery(blockwise_config)


def test_blockwise_then_kd_stacks_both(blockwise_config, sparse_tiny):
    from dataclasses import replace

    log = run_recovery(replace(blockwise_config, method="blockwise+kd", epochs=1))
    assert log["method"] == "blockwise+kd" and len(log["blockwise"]["blocks"]) == 2
    assert log["config"]["model"].endswith("stage-blockwise/merged") and log["config"]["loss"] == "kd"
    assert log["zeros_after_merge"] == log["zeros_kept"] > 0


def test_the_block_loop_reproduces_the_model_forward(tiny_model_dir, tiny_tokenizer):
    """Blocks called one at a time with the arguments the model's own forward gives them reproduce its hidden
    states, padding included: what blockwise trains toward is what the model computes."""
    from paser.data import pad_right
    from paser.models import load_model
    from paser.recovery.layers import LayerReader, call_block

    model, _ = load_model(str(tiny_model_dir), dtype="fp32")
    ids, attention = pad_right([[5, 9, 13, 2, 7, 11], [4, 8, 3]], tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=attention, output_hidden_states=True).hidden_states
    reader = LayerReader(str(tiny_model_dir), "cpu")
    hidden, calls = reader.capture(ids, attention)
    real = attention.bool()
    assert torch.equal(hidden[real], expected[0][real])
    with torch.no_grad():
        for layer in range(reader.n_layers):
            hidden = call_block(reader.block(layer, torch.float32), hidden, calls[layer])
            if layer + 1 < reader.n_layers:  # the last entry of hidden_states is after the final norm
                assert torch.allclose(hidden[real], expected[layer + 1][real], atol=1e-5)

def test_global_propagation_learns_from_the_originals_stream_alone(blockwise_config):
    """block_stream original: each block's input and target are the original's (the blocks independent), so the
    student's stream is never computed; each block's error still falls."""
    log = run_recovery(replace(blockwise_config, block_stream="original"))
    assert all(b["loss_after"] < b["loss_before"] for b in log["blocks"])
    assert log["config"]["block_stream"] == "original"
    mixed = run_recovery(replace(blockwise_config, block_stream="mix", out=blockwise_config.out.parent / "mix"))
    assert all(b["loss_after"] < b["loss_before"] for b in mixed["blocks"])


def test_held_aside_batches_stop_a_block_and_keep_its_best_pass(blockwise_config):
    log = run_recovery(replace(blockwise_config, block_heldout=0.25, block_epochs=6, block_schedule="linear",
                               block_weight_decay=0.1))
    for block in log["blocks"]:
        curve = block["heldout_per_pass"]
        assert block["heldout_batches"] >= 1 and curve[0] == block["heldout_before"]
        assert block["heldout_after"] == min(curve) == curve[block["kept_pass"]]
        assert block["heldout_after"] <= block["heldout_before"]
        stopped = len(curve) - 1 < 6
        assert not stopped or curve[-1] > curve[-2]  # it stops only once the held-aside error rose
        assert block["zeros_after"] == block["zeros_before"]


def test_windows_train_overlapping_blocks_and_resume_exactly(blockwise_config, monkeypatch, tmp_path):
    """block_window 2: each window trains two blocks toward the original's output of the second, keeps the first and
    hands the second on trained; a kill inside the second window resumes to the very weights of an unbroken run."""
    from paser import faults
    from paser.recovery import blockwise

    config = replace(blockwise_config, block_window=2, block_epochs=3)
    whole = run_recovery(replace(config, out=tmp_path / "whole"))
    assert whole["blocks"][0]["window"] == [0, 1] and "window" not in whole["blocks"][1]  # the last window: one block
    single = run_recovery(replace(blockwise_config, block_epochs=3, out=tmp_path / "single"))
    assert whole["blocks"][0]["loss_before"] != single["blocks"][0]["loss_before"]  # measured at block 1's output
    for block in whole["blocks"]:
        assert block["loss_after"] < block["loss_before"]
        assert block["zeros_after"] == block["zeros_before"] > 0
    real_reached = faults.reached

    def killed_in_the_second_window(name):
        if name == "blockwise.step" and (tmp_path / "carry-seen").exists():
            raise KeyboardInterrupt
        real_reached(name)

    real_block = blockwise.BlockwiseRun._block

    def marking(self, layer, streams):
        if layer == 1:
            (tmp_path / "carry-seen").touch()
        return real_block(self, layer, streams)

    monkeypatch.setattr(blockwise.BlockwiseRun, "_block", marking)
    monkeypatch.setattr(faults, "reached", killed_in_the_second_window)
    with pytest.raises(KeyboardInterrupt):
        run_recovery(config)
    assert (config.out / "blockwise" / "carry" / "from-000" / "001.safetensors").is_file()
    monkeypatch.setattr(faults, "reached", real_reached)
    (tmp_path / "carry-seen").unlink()
    resumed = run_recovery(config)
    assert [b["loss_after"] for b in resumed["blocks"]] == pytest.approx([b["loss_after"] for b in whole["blocks"]])
    a, b = _weights(config.out / "merged"), _weights(tmp_path / "whole" / "merged")
    assert all(torch.equal(a[k], b[k]) for k in a)
