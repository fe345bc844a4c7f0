import json

import pytest
import yaml

from paser.errors import ConfigError
from paser.pipeline import demo_config_text, load_config, parse_config, run_pipeline
from tests_helpers import write_fixtures


def tiny_config(model_dir, task_dir, out, heldout="demo-heldout"):
    return {
        "model": str(model_dir), "out": str(out),
        "prune": {"method": "magnitude", "sparsity": 0.5, "calib_samples": 4, "heldout_samples": 2, "seq_len": 48},
        "data": {"source": "demo", "limit": 60},
        "select": {"methods": ["paser", "random"], "budget": 0.2, "max_length": 64, "clusters": 3},
        "recover": {"epochs": 1, "batch_size": 4, "micro_batch_size": 4, "cutoff_len": 64, "lr": 0.001},
        "evaluate": {"tasks": ["arc_easy"], "task_dir": str(task_dir), "limit": 4, "demo_skills": True,
                     "demo_questions": 1, "response_ppl": [str(heldout)], "batch_size": 8},
    }


@pytest.mark.parametrize("change, message", [
    ({"selcet": {}}, "unknown key 'selcet'"),
    ({"select": {"budgett": 0.2}}, "unknown key 'select.budgett'"),
    ({"recover": {"epochs": "many"}}, "recover.epochs"),
    ({"prune": {"sparsity": 1.5}}, "prune: sparsity must be in"),
    ({"select": {"methods": ["paser", "best"]}}, "select.methods"),
    ({"select": {"allocation": "fair"}}, "select: allocation must be one of"),
    ({"pruned": "/some/model"}, "either 'prune'"),
    ({"evaluate": {"tasks": ["mmlu"]}}, "unknown task"),
    ({"data": {"limit": 0}}, "data.limit"),
    ({"data": {"path": "x.jsonl"}}, "unknown key 'data.path'"),
])
def test_config_errors_name_the_key(tmp_path, change, message):
    config = tiny_config("m", tmp_path, tmp_path / "run")
    for section, values in change.items():
        if isinstance(values, dict) and isinstance(config.get(section), dict):
            config[section] = {**config[section], **values}
        else:
            config[section] = values
    with pytest.raises(ConfigError, match=message):
        parse_config(config, where="run.yaml")


def test_yaml_errors_name_the_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: x\nselect:\n  budget: [0.2\n")
    with pytest.raises(ConfigError, match=r"run.yaml: line \d+: invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_demo_config_is_valid():
    config = parse_config(yaml.safe_load(demo_config_text()))
    assert config.select["methods"] == ["paser", "random"] and config.select["budget"] == 0.2
    assert config.prune["method"] == "wanda" and config.prune["sparsity"] == 0.5
    assert config.recover["epochs"] == 1 and config.evaluate["demo_skills"]


def test_tiny_end_to_end_skips_and_invalidates(tmp_path, tiny_model_dir):
    tasks = write_fixtures(tmp_path / "tasks", rows=4)
    out = tmp_path / "run"
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"instruction": f"Add {i} and 2.", "output": str(i + 2)}) + "\n"
                               for i in range(8)))
    raw = tiny_config(tiny_model_dir, tasks, out, heldout)
    run = run_pipeline(parse_config(raw))
    stages = {s["stage"]: s for s in run["stages"]}
    assert list(stages) == ["prune", "select/paser", "recover/paser", "select/random", "recover/random", "evaluate"]
    assert not any(s["skipped"] for s in stages.values())
    assert all(s["peak_rss_gb"] > 0 for s in stages.values())
    assert stages["select/random"]["cache"]["scores_from_cache"]  # paser scored; random reused the scores

    results = json.loads((out / "evaluate" / "results.json").read_text())
    assert list(results["models"]) == ["dense", "pruned (magnitude 0.5)", "pruned (magnitude 0.5) + paser",
                                       "pruned (magnitude 0.5) + random"]
    for entry in results["models"].values():
        assert entry["tasks"]["arc_easy"]["n"] == 4 and str(heldout) in entry["response_perplexity"]
        assert entry["demo_skills"]["mean"]["n"] == 11 and len(entry["demo_answer_examples"]) == 11
    for method in ("paser", "random"):
        assert len((out / "select" / method / "selected.jsonl").read_text().splitlines()) == 12
        assert (out / "recover" / method / "merged" / "config.json").exists()
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 5 and "http://" not in page and "https://" not in page
    assert "pruned (magnitude 0.5) + paser" in page and "not available" not in page
    assert json.loads((out / "run.json").read_text())["stages"] == run["stages"]

    again = run_pipeline(parse_config(raw))
    assert all(s["skipped"] for s in again["stages"])
    assert [s["earlier_run"]["seconds"] for s in again["stages"]] == [s["seconds"] for s in run["stages"]]

    raw["select"]["budget"] = 0.3  # invalidates selection and everything downstream, not pruning
    changed = {s["stage"]: s["skipped"] for s in run_pipeline(parse_config(raw))["stages"]}
    assert changed == {"prune": True, "select/paser": False, "recover/paser": False, "select/random": False,
                       "recover/random": False, "evaluate": False}
    assert len((out / "select" / "paser" / "selected.jsonl").read_text().splitlines()) == 18

    forced = {s["stage"]: s["skipped"] for s in run_pipeline(parse_config(raw), from_stage="evaluate")["stages"]}
    assert [k for k, skipped in forced.items() if not skipped] == ["evaluate"]


def test_cli_run_config_error_and_demo_show_config(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "select": {"budget": 0.2, "alocation": "cds"}}))
    result = subprocess.run([sys.executable, "-m", "paser.cli", "run", str(path)], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "unknown key 'select.alocation'" in lines[0] and str(path) in lines[0]
    shown = subprocess.run([sys.executable, "-m", "paser.cli", "demo", "--show-config"], capture_output=True,
                           text=True, check=True)
    assert yaml.safe_load(shown.stdout) == yaml.safe_load(demo_config_text())
