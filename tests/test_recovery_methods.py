"""Recovery methods are a registered extension point: a method is one file, selected by ``paser recover
--method`` and by ``recover: {method: ...}`` in ``paser run``, and its version enters the stage hash."""

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
                                      str(tmp_path / "rec"), "--method", "copy-test", "--loss", "nll"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "rec" / "train_log.json").read_text())["method"] == "copy-test"
    assert (tmp_path / "rec" / "merged" / "config.json").is_file()


def test_an_unknown_method_is_refused_with_the_choices(tmp_path, tiny_model_dir):
    from paser.recover import RecoverConfig

    with pytest.raises(ConfigError, match="method must be one of end-to-end, blockwise"):
        RecoverConfig(model=str(tiny_model_dir), data="x.jsonl", out=tmp_path, method="blokwise").validate()


def test_a_method_in_one_file_runs_through_paser_run(tmp_path, tiny_model_dir):
    from paser.pipeline import parse_config, run_pipeline

    raw = tiny_config(tiny_model_dir, write_fixtures(tmp_path / "tasks", rows=4), tmp_path / "run")
    raw["select"]["methods"] = ["random"]
    raw["recover"]["method"] = "copy-test"
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
