"""A package outside paser adds a recovery method (with its own option) and an objective through entry points:
found at start-up, offered by ``paser recover --help``, run by ``paser recover``; a broken plugin is a warning."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from paser.registry import Registry

PLUGIN = textwrap.dedent('''
    import shutil
    from dataclasses import dataclass
    from pathlib import Path

    from paser.cache import write_json
    from paser.objectives import Objective
    from paser.options import option
    from paser.recovery.base import RecoveryMethod


    @dataclass
    class CopyOptions:
        copy_note: str = option("none", "copy-plugin: a note written to the train log.")


    class CopyMethod(RecoveryMethod):
        """Keeps the pruned model as it is (a plugin's method)."""
        options = CopyOptions

        def run(self, config, callbacks=()):
            out = Path(config.out)
            shutil.copytree(config.model, out / "merged", dirs_exist_ok=True)
            log = {"method": self.name, "note": config.copy_note, "steps": 0, "seconds": 0.0, "tokens_per_s": 0.0,
                   "loss_curve": []}
            write_json(out / "train_log.json", log)
            return log


    class HalfNLL(Objective):
        """Half the NLL (a plugin's objective)."""
        terms = frozenset({"nll"})

        def loss(self, terms, config):
            return 0.5 * terms["nll"]
''')


def _fake_distribution(root, entry_points):
    """An installed distribution as importlib.metadata finds one on sys.path: a module and a .dist-info folder."""
    (root / "paser_fake_plugin.py").write_text(PLUGIN)
    info = root / "paser_fake_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: paser-fake-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(entry_points)
    return root


def _paser(args, plugin_root, tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": f"{plugin_root}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "paser", *args], capture_output=True, text=True, env=env, cwd=tmp_path)


def test_a_plugin_package_adds_a_method_and_an_objective(tmp_path, tiny_model_dir):
    site = tmp_path / "site"
    site.mkdir()
    _fake_distribution(site, "[paser.recovery]\ncopy-plugin = paser_fake_plugin:CopyMethod\n\n"
                             "[paser.objectives]\nhalf-nll = paser_fake_plugin:HalfNLL\n")
    shown = _paser(["recover", "--help"], site, tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "copy-plugin" in shown.stdout and "--copy-note" in shown.stdout and "half-nll" in shown.stdout
    data = tmp_path / "train.jsonl"
    data.write_text(json.dumps({"instruction": "Say hi.", "output": "hi"}) + "\n")
    done = _paser(["recover", str(tiny_model_dir), "--data", str(data), "--out", str(tmp_path / "rec"),
                   "--method", "copy-plugin", "--copy-note", "from a plugin"], site, tmp_path)
    assert done.returncode == 0, done.stderr
    log = json.loads((tmp_path / "rec" / "train_log.json").read_text())
    assert log["method"] == "copy-plugin" and log["note"] == "from a plugin"


def test_a_broken_plugin_is_a_warning_naming_it(tmp_path, monkeypatch, caplog):
    site = tmp_path / "site"
    site.mkdir()
    _fake_distribution(site, "[paser.test-kind]\nmissing = paser_fake_plugin:NoSuchThing\n"
                             "good = paser_fake_plugin:HalfNLL\n")
    monkeypatch.syspath_prepend(str(site))
    registry = Registry("test kind", "paser.test-kind")
    with caplog.at_level("WARNING"):
        assert registry.names() == ("good",)
    assert "test kind plugin 'missing' (paser_fake_plugin:NoSuchThing, package paser-fake-plugin)" in caplog.text
    with pytest.raises(Exception, match="unknown test kind 'missing'"):
        registry.get("missing")
