"""What each recovery reads is declared once, and the declaration is the truth: every field a method, objective
or target looks at while it runs is one it declares (recorded on real runs); a declared option changes the resume
key and the stage hash; an option nothing chosen reads is refused; a changed option reruns, from a clean folder."""

import dataclasses
import json
import logging
import subprocess
import sys

import pytest

from paser.errors import ConfigError
from paser.recovery import RecoverConfig, fields_read, resolve_recovery, run_recovery
from paser.recovery.reads import NOT_IN_KEY, resume_key_settings
from test_recover import small_config

READS: set[str] = set()


def _recording(config):
    """``config`` as an instance of a subclass that records every field read outside :mod:`dataclasses` (``asdict``
    for the train log and ``replace`` copy every field: they are not reads of a setting)."""
    names = {f.name for f in dataclasses.fields(config)}

    class Recording(type(config)):
        def __getattribute__(self, name):
            if name in names and not sys._getframe(1).f_code.co_filename.endswith("dataclasses.py"):
                READS.add(name)
            return object.__getattribute__(self, name)

    return Recording(**{n: getattr(config, n) for n in names})


@pytest.mark.parametrize("method, overrides", [
    ("blockwise", {"block_epochs": 1, "block_batch_tokens": 256}),
    ("end-to-end", {"epochs": 1, "loss": "kd"}),
    ("end-to-end", {"epochs": 1, "loss": "mix", "adapter": "full", "targets": "original", "target_max_new_tokens": 8}),
    ("blockwise+kd", {"epochs": 1, "block_epochs": 1, "block_batch_tokens": 256}),
])
def test_a_method_reads_only_what_it_declares(tmp_path, sparse_tiny, tiny_model_dir, monkeypatch, method, overrides):
    monkeypatch.setenv("PASER_CACHE", str(tmp_path / "cache"))
    config = small_config(tmp_path, sparse_tiny, method=method, teacher=str(tiny_model_dir), **overrides)
    resolved = resolve_recovery(config, announce=False).config
    READS.clear()
    from paser.recovery import RECOVERY_METHODS

    RECOVERY_METHODS.get(method).run(_recording(resolved))
    undeclared = READS - fields_read(resolved)
    assert not undeclared, f"{method} reads {sorted(undeclared)} without declaring them"
    assert {"seed", "cutoff_len"} <= READS  # the recorder sees reads at all


@pytest.mark.parametrize("method", ["blockwise", "end-to-end", "blockwise+kd"])
def test_every_declared_option_changes_the_resume_key_and_the_stage_hash(tmp_path, sparse_tiny, tiny_model_dir, method):
    from paser.pipeline.schema import recover_stage_inputs

    config = small_config(tmp_path, sparse_tiny, method=method, teacher=str(tiny_model_dir), loss="kd")
    resolved = resolve_recovery(config, announce=False).config
    key, stage = resume_key_settings(resolved), recover_stage_inputs(resolved)
    keyed = fields_read(resolved) - NOT_IN_KEY
    assert {"warmup_ratio", "seed", "cutoff_len"} <= keyed
    for name in sorted(keyed - {"model", "method"}):  # the model: its weights' fingerprint is in the key beside it
        value = {"loss": "mix", "targets": "original",  # registered names
                 "generated_tokens": 0.5}.get(name, ("changed", getattr(resolved, name)))
        changed = dataclasses.replace(resolved, **{name: value})
        assert resume_key_settings(changed) != key, name
        assert recover_stage_inputs(changed) != stage, name


def test_a_changed_warmup_ratio_reruns_the_blocks(tmp_path, sparse_tiny, tiny_model_dir, caplog):
    config = small_config(tmp_path, sparse_tiny, method="blockwise", teacher=str(tiny_model_dir), block_epochs=1,
                          block_batch_tokens=256)
    first = run_recovery(config)
    with caplog.at_level(logging.INFO, logger="paser"):
        again = run_recovery(config)
    assert "finished already" in caplog.text and again["blocks"] == first["blocks"]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="paser"):
        changed = run_recovery(dataclasses.replace(config, warmup_ratio=0.5))
    assert "finished already" not in caplog.text and "starting afresh" in caplog.text
    assert changed["config"]["warmup_ratio"] == 0.5
    assert [b["loss_after"] for b in changed["blocks"]] != [b["loss_after"] for b in first["blocks"]]


@pytest.mark.parametrize("given, method, reader", [
    ({"lr": 5e-4}, "blockwise", "method end-to-end, method blockwise+kd"),
    ({"lora_r": 32}, "blockwise", "method end-to-end"),
    ({"block_lr": 5e-4}, "end-to-end", "method blockwise, method blockwise+kd"),
    ({"lora_r": 32, "adapter": "full"}, "end-to-end", "--lora-r is read by method end-to-end"),
    ({"kd_temperature": 2.0, "loss": "nll"}, "end-to-end", "loss kd, loss mix, loss kd-features"),
    ({"target_temperature": 0.5}, "end-to-end", "targets original"),
])
def test_an_option_nothing_chosen_reads_is_refused_naming_who_reads_it(tmp_path, tiny_model_dir, given, method,
                                                                          reader):
    config = RecoverConfig(model=str(tiny_model_dir), data="d.jsonl", out=tmp_path / "o", method=method,
                           teacher=str(tiny_model_dir), **given)
    stray = next(k for k in given if k not in ("adapter", "loss"))
    with pytest.raises(ConfigError, match="--" + stray.replace("_", "-")) as error:
        run_recovery(config)
    assert reader in str(error.value) and f"method {method}" in str(error.value)


def test_paser_recover_refuses_a_stray_option_with_one_line_and_exit_2(tmp_path, sparse_tiny, tiny_model_dir):
    command = [sys.executable, "-m", "paser", "recover", str(sparse_tiny), "--data", "d.jsonl", "--out",
               str(tmp_path / "o"), "--method", "blockwise", "--teacher", str(tiny_model_dir), "--lr", "5e-4"]
    done = subprocess.run(command, capture_output=True, text=True, env={**__import__("os").environ,
                                                                        "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 2, done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--lr" in errors[0] and "method blockwise" in errors[0]
    assert "read by method end-to-end" in errors[0]


def test_auto_that_cannot_run_blockwise_warns_why_and_records_it(tmp_path, sparse_tiny, caplog):
    config = small_config(tmp_path, sparse_tiny, epochs=1)  # no original known: no teacher, no prune report
    with caplog.at_level(logging.WARNING, logger="paser"):
        log = run_recovery(config)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(w.startswith("method auto: end-to-end, not block-wise + KD: no original model known") and "--teacher"
               in w for w in warnings), warnings
    assert log["resolved"]["choices"]["method"]["chosen"] == "end-to-end"
    assert log["resolved"]["choices"]["loss"]["chosen"] == "nll" and len(log["resolved"]["warnings"]) == 2
    on_disk = json.loads((tmp_path / "rec" / "train_log.json").read_text())
    assert on_disk["resolved"] == log["resolved"]


@pytest.mark.parametrize("report", ["{not json", json.dumps({"config": {}}), json.dumps({"config": {"model": 3}})])
def test_a_malformed_prune_report_is_an_error_naming_it(tmp_path, sparse_tiny, report):
    pruned = tmp_path / "pruned"
    pruned.mkdir()
    for item in sparse_tiny.iterdir():
        (pruned / item.name).symlink_to(item)
    (pruned / "prune_report.json").unlink(missing_ok=True)
    (pruned / "prune_report.json").write_text(report)
    with pytest.raises(ConfigError, match="prune_report.json"):
        run_recovery(small_config(tmp_path, pruned))


def test_a_recipe_that_overrides_a_given_option_says_which(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from paser.cli import app

    result = CliRunner().invoke(app, ["recover", str(tiny_model_dir), "--data", "d.jsonl", "--out", str(tmp_path / "o"),
                                      "--recipe", "paper", "--method", "blockwise", "--loss", "kd"])
    assert result.exit_code != 0
    message = str(result.exception)
    assert "--recipe paper sets method end-to-end, loss nll" in message and "--method blockwise" in message


def test_paser_run_reruns_a_recovery_whose_option_changed_from_a_clean_folder(tmp_path, tiny_model_dir):
    """An arm's changed warmup_ratio reruns its block-wise recovery in paser run, in an emptied folder; an option its
    method does not read is refused before any stage runs."""
    from paser.pipeline import parse_config, run_pipeline
    from test_pipeline import tiny_config
    from tests_helpers import write_fixtures

    raw = tiny_config(tiny_model_dir, write_fixtures(tmp_path / "tasks", rows=4), tmp_path / "run")
    raw["select"]["methods"] = ["random"]
    raw["recover"] = {"method": "blockwise", "cutoff_len": 48, "block_epochs": 1, "block_batch_tokens": 256}
    raw["evaluate"] = {"tasks": ["arc_easy"], "task_dir": raw["evaluate"]["task_dir"], "limit": 4, "batch_size": 8}
    run_pipeline(parse_config(raw))
    folder = tmp_path / "run" / "recover" / "random" / "s0"
    (folder / "blockwise" / "blocks" / "stale.safetensors").write_text("left by an earlier run")
    raw["arms"] = [{"name": "random", "method": "random", "recover": {"warmup_ratio": 0.5}}]
    stages = {s["stage"]: s["skipped"] for s in run_pipeline(parse_config(raw))["stages"]}
    assert stages["recover/random/s0"] is False and stages["select/random/s0"] is True
    assert not (folder / "blockwise" / "blocks" / "stale.safetensors").exists()
    log = json.loads((folder / "train_log.json").read_text())
    assert log["config"]["warmup_ratio"] == 0.5
    assert log["resolved"]["choices"] == {} and log["resolved"]["warnings"] == []
    assert log["resolved"]["memory"]["need_bytes"] > 0  # the plan made before it loaded
    raw["arms"] = [{"name": "random", "method": "random", "recover": {"lr": 5e-4}}]
    with pytest.raises(ConfigError, match="arm 'random': --lr: not read by this recovery .method blockwise"):
        parse_config(raw)


def test_an_option_at_its_neutral_value_leaves_finished_runs_keyed_as_before(tmp_path, sparse_tiny, tiny_model_dir):
    """An option added after runs were finished is out of the key at the value that computes what the code did
    before it (so adding it reruns nothing), and in the key at any other value."""
    from paser.recovery.reads import NEUTRAL

    config = small_config(tmp_path, sparse_tiny, method="blockwise", teacher=str(tiny_model_dir))
    for name, neutral in NEUTRAL.items():
        assert name in fields_read(config) and getattr(config, name) == neutral
        assert name not in resume_key_settings(config)
        assert resume_key_settings(dataclasses.replace(config, **{name: neutral + 1}))[name] == neutral + 1
