"""Recovery methods are a registered extension point: a method is one file, selected by ``paser recover
--method`` and by ``recover: {method: ...}`` in ``paser run``, and its version enters the stage hash."""

import dataclasses
import json

import pytest
from typer.testing import CliRunner

import recovery_plugin  # noqa: F401  (registers copy-test)
from paser.errors import ConfigError
from paser.recovery import RECOVERY_METHODS
from test_pipeline import tiny_config
from tests_helpers import write_fixtures


def test_the_shipped_methods_are_registered():
    assert {"end-to-end", "blockwise", "blockwise+kd"} <= set(RECOVERY_METHODS.names())


def test_a_method_in_one_file_runs_through_paser_recover(tmp_path, tiny_model_dir):
    from paser.cli import app

    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n")
    result = CliRunner().invoke(app, ["recover", str(tiny_model_dir), "--data", str(data), "--out",
                                      str(tmp_path / "rec"), "--method", "copy-test"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "rec" / "train_log.json").read_text())["method"] == "copy-test"
    assert (tmp_path / "rec" / "merged" / "config.json").is_file()


def test_an_unknown_method_is_refused_with_the_choices(tmp_path, tiny_model_dir):
    from paser.recovery import RecoverConfig

    with pytest.raises(ConfigError, match="method must be one of end-to-end, blockwise"):
        RecoverConfig(model=str(tiny_model_dir), data="x.jsonl", out=tmp_path, method="blokwise").validate()


def test_a_method_in_one_file_runs_through_paser_run(tmp_path, tiny_model_dir):
    from paser.pipeline import parse_config, run_pipeline

    raw = tiny_config(tiny_model_dir, write_fixtures(tmp_path / "tasks", rows=4), tmp_path / "run")
    raw["select"]["methods"] = ["random"]
    raw["recover"] = {"method": "copy-test"}  # it reads none of end-to-end's options
    raw["evaluate"] = {"tasks": ["arc_easy"], "task_dir": raw["evaluate"]["task_dir"], "limit": 4, "batch_size": 8}
    run = run_pipeline(parse_config(raw))
    log = json.loads((tmp_path / "run" / "recover" / "random" / "s0" / "train_log.json").read_text())
    assert log["method"] == "copy-test"
    results = json.loads((tmp_path / "run" / "evaluate" / "results.json").read_text())
    pruned, recovered = list(results["models"].values())[1:3]
    assert pruned["tasks"]["arc_easy"]["items"] == recovered["tasks"]["arc_easy"]["items"]  # the copy is the pruned model
    # a new version of the method redoes the recovery
    RECOVERY_METHODS.get("copy-test").version = 2
    try:
        stages = {s["stage"]: s["skipped"] for s in run_pipeline(parse_config(raw))["stages"]}
    finally:
        RECOVERY_METHODS.get("copy-test").version = 1
    assert stages["recover/random/s0"] is False and stages["prune"] is True
    assert run["stages"]


def test_auto_reconstructs_blocks_where_it_can_and_says_why_not(tmp_path, sparse_tiny, tiny_model_dir):
    from transformers import MixtralConfig

    from paser.recovery import RecoverConfig, choose_method

    assert RecoverConfig(model="m", data="d", out="o").method == "auto"  # the default
    original = str(tiny_model_dir)
    assert choose_method(str(sparse_tiny), original, "kd") == (
        "blockwise+kd", "the original is known and the blocks keep its shapes")
    assert choose_method(str(sparse_tiny), original, "mix")[0] == "blockwise+kd"
    assert choose_method(str(sparse_tiny), None, "kd")[1].startswith("no original model known")
    assert choose_method(str(sparse_tiny), original, "nll") == (
        "end-to-end", "loss nll trains on the records' answers, not toward the original")
    assert choose_method(str(sparse_tiny), original, "kd", fsdp=True)[0] == "end-to-end"
    narrow = tmp_path / "narrow"  # what structured pruning writes: a smaller MLP in the config
    narrow.mkdir()
    config = json.loads((sparse_tiny / "config.json").read_text())
    (narrow / "config.json").write_text(json.dumps(config | {"intermediate_size": config["intermediate_size"] // 2}))
    method, reason = choose_method(str(narrow), original, "kd")
    assert method == "end-to-end" and reason.startswith("pruning changed the blocks' shapes (intermediate_size: 64")
    MixtralConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=64, num_attention_heads=2,
                  num_key_value_heads=2).save_pretrained(tmp_path / "moe")
    method, reason = choose_method(str(tmp_path / "moe"), original, "kd")
    assert method == "end-to-end" and "'mixtral' is not among the families" in reason and "llama" in reason


@pytest.mark.parametrize("loss, chosen", [("kd", "blockwise+kd"), ("nll", "end-to-end")])
def test_auto_runs_the_method_it_chose_and_records_why(tmp_path, sparse_tiny, tiny_model_dir, loss, chosen):
    from paser.recovery import run_recovery
    from test_recover import small_config

    blocks = {"block_epochs": 1, "block_batch_tokens": 256} if chosen == "blockwise+kd" else {}
    config = small_config(tmp_path, sparse_tiny, epochs=1, loss=loss, teacher=str(tiny_model_dir), method="auto",
                          **blocks)
    if chosen == "end-to-end":  # options auto's fallback does not read are refused, naming why it fell back
        with pytest.raises(ConfigError, match="--teacher, --block-lr: not read by this recovery .method end-to-end "
                                              r"\(auto chose it: loss nll trains on the records' answers"):
            run_recovery(dataclasses.replace(config, block_lr=5e-4))
        config = dataclasses.replace(config, teacher=None)
    log = run_recovery(config)
    on_disk = json.loads((tmp_path / "rec" / "train_log.json").read_text())
    assert log["method"] == on_disk["method"] == chosen
    choice = on_disk["resolved"]["choices"]["method"]
    assert choice["asked"] == "auto" and choice["chosen"] == chosen and choice["reason"]
    assert ("blockwise" in on_disk) == (chosen == "blockwise+kd")
    assert (tmp_path / "rec" / "merged" / "config.json").is_file()


def test_paser_run_resolves_auto_before_hashing_and_keeps_only_the_options_read(tmp_path, sparse_tiny, tiny_model_dir):
    from paser.pipeline import arm_recover_settings, parse_config
    from paser.pipeline.schema import recover_stage_inputs
    from paser.recovery import RecoverConfig

    raw = tiny_config(tiny_model_dir, write_fixtures(tmp_path / "tasks", rows=4), tmp_path / "run")
    raw["recover"]["method"] = "auto"
    raw["arms"] = [{"name": "kd", "method": "random"}, {"name": "nll", "method": "random", "recover": {"loss": "nll"}},
                   {"name": "stacked", "method": "random", "recover": {"method": "blockwise+kd"}}]
    config = parse_config(raw)
    arms = {arm["name"]: arm for arm in config.arms}
    assert arm_recover_settings(config, arms["kd"], 0)["method"] == "auto"  # before pruning: validated as auto

    def stage(name):
        settings = arm_recover_settings(config, arms[name], 0, str(sparse_tiny))
        return settings, recover_stage_inputs(RecoverConfig(model=str(sparse_tiny), data="d", out="o", **settings))

    (_, auto_inputs), (_, stacked_inputs) = stage("kd"), stage("stacked")
    # auto is hashed as the method it runs: the same stage as asking for that method by name
    assert auto_inputs == stacked_inputs and auto_inputs["settings"]["method"] == "blockwise+kd"
    assert auto_inputs["settings"]["block_lr"] == 1e-3 and auto_inputs["settings"]["lr"] == 1e-3
    plain, plain_inputs = stage("nll")
    assert plain_inputs["settings"]["method"] == "end-to-end"
    assert not any(key.startswith(("block_", "stream_")) for key in [*plain, *plain_inputs["settings"]])
