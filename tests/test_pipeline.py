import json

import pytest
import yaml

from paser.cache import stable_hash
from paser.errors import ConfigError
from paser.pipeline import demo_config_text, load_config, parse_config, run_pipeline
from tests_helpers import write_fixtures


def assert_every_image_is_a_png(page: str) -> None:
    """No broken image: every inline image decodes to a PNG."""
    import base64
    import re

    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert images and all(base64.b64decode(data).startswith(b"\x89PNG\r\n\x1a\n") for data in images)

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
    ({"prune": {"sparsity": 1.5}}, "prune.sparsity: Input should be less than 1"),
    ({"select": {"methods": ["paser", "best"]}}, "select.methods"),
    ({"select": {"allocation": "fair"}}, "arm .paser.: allocation must be one of"),
    ({"arms": [{"name": "a", "method": "best"}]}, r"arms\[0\] \(a\): method must be one of"),
    ({"arms": [{"name": "a", "method": "paser", "select": {"budgett": 1}}]}, r"unknown key .arms\[0\].select.budgett."),
    ({"arms": [{"name": "a", "method": "paser"}], "baseline": "random"}, "baseline .random. is not an arm"),
    ({"baseline": ["random", "random"]}, "baseline must be an arm's name or a list of distinct arm names"),
    ({"baseline": ["random", "random-kd"]}, "baseline .random-kd. is not an arm"),
    ({"seeds": [0, 0]}, "seeds must be a list of distinct integers"),
    ({"pruned": "/some/model"}, "either 'prune'"),
    ({"evaluate": {"tasks": ["mmlu"]}}, "unknown task"),
    ({"data": {"limit": 0}}, "data.limit"),
    ({"data": {"duplicates": "dedupe"}}, "data.duplicates: Input should be 'keep' or 'drop'"),
    ({"data": {"sample": {"n": 10}, "heldout": 0}}, "data.heldout: Input should be greater than or equal to 1"),
    ({"arms": [{"name": "a", "method": "paser", "sed": [1]}]}, r"arms\[0\]: unknown key 'sed'"),
    ({"data": {"path": "x.jsonl"}}, "unknown key 'data.path'"),
    ({"export": {"format": "gguf"}}, "export: format must be one of dense, w4a16, w8a8"),
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
    from paser.pipeline import arm_recover_settings, arm_select_config

    config = parse_config(yaml.safe_load(demo_config_text()))
    arms = {arm["name"]: arm for arm in config.arms}
    assert list(arms) == ["paser", "random", "random-kd"] and config.baselines == ["random"]
    assert config.select["budget"] == 0.2 and config.prune["method"] == "wanda" and config.prune["sparsity"] == 0.5
    # the default recipe: a random slice (SelectConfig's default method), LoRA distilled from the original; PASER's
    # selection (the pool's cluster shares, each filled by highest IFD, rare-concept CCG) trained the same way;
    # the baseline trains on the random slice's reference answers
    from paser.selection.select import SelectConfig

    assert SelectConfig(original="-", pruned="-", data="-", budget=1).method == arms["random-kd"]["method"] == "random"
    selection = arm_select_config(config, "pruned/", arms["paser"], 0, "out/")
    assert (selection.allocation, selection.within, selection.rank, selection.ccg_rule) == ("size", "top", "ifd", "specific")
    assert arm_recover_settings(config, arms["paser"], 0) == arm_recover_settings(config, arms["random-kd"], 0)  # same training
    kd = arm_recover_settings(config, arms["random-kd"], 0)
    assert kd["teacher"] == config.model  # the pipeline always knows the original: loss auto distils from it
    from paser.recovery import RecoverConfig, resolve_recovery

    resolved = resolve_recovery(RecoverConfig(model="-", data="-", out="-", **{**kd, "method": "end-to-end"}), False)
    assert resolved.config.loss == "kd"
    assert arm_recover_settings(config, arms["random"], 0)["loss"] == "nll"


def test_tiny_end_to_end_skips_and_invalidates(tmp_path, tiny_model_dir):
    tasks = write_fixtures(tmp_path / "tasks", rows=4)
    out = tmp_path / "run"
    heldout = tmp_path / "heldout.jsonl"
    heldout.write_text("".join(json.dumps({"instruction": f"Add {i} and 2.", "output": str(i + 2)}) + "\n"
                               for i in range(8)))
    raw = tiny_config(tiny_model_dir, tasks, out, heldout)
    run = run_pipeline(parse_config(raw))
    stages = {s["stage"]: s for s in run["stages"]}
    assert list(stages) == ["prune", "select/paser/s0", "recover/paser/s0", "select/random/s0", "recover/random/s0",
                            "evaluate"]
    assert not any(s["skipped"] for s in stages.values())
    assert all(s["peak_rss_gb"] > 0 for s in stages.values())
    assert stages["select/random/s0"]["cache"]["scores_from_cache"] is None  # random computes no scores

    results = json.loads((out / "evaluate" / "results.json").read_text())
    assert list(results["models"]) == ["dense", "pruned (magnitude 0.5)", "pruned (magnitude 0.5) + paser",
                                       "pruned (magnitude 0.5) + random"]
    for entry in results["models"].values():
        assert entry["tasks"]["arc_easy"]["n"] == 4 and str(heldout) in entry["response_perplexity"]
        assert entry["demo_skills"]["mean"]["n"] == 11 and len(entry["demo_answer_examples"]) == 11
    for method in ("paser", "random"):
        assert len((out / "select" / method / "s0" / "selected.jsonl").read_text().splitlines()) == 12
        assert (out / "recover" / method / "s0" / "merged" / "config.json").exists()
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 7 and "http://" not in page and "https://" not in page
    assert_every_image_is_a_png(page)
    # the answer first: the headline chart before the tables; the comparison is an HTML table, not raw markdown
    assert page.index("<h2>Headline</h2>") < page.index("<h2>Evaluation</h2>") < page.index("Methods compared")
    assert 'alt="headline: fidelity to the original against random"' in page and "<pre>" not in page
    # two arms and many metrics: the arms are the comparison table's columns, so it fits a page's width
    compared = page[page.index("<h3>Against random</h3>"):]
    assert compared.index('<th class="text">arm</th><th>paser</th><th>random</th></tr>') < compared.index("arc_<wbr>easy")
    comparison = json.loads((out / "evaluate" / "comparison.json").read_text())
    assert comparison["baseline"] == "random" and set(comparison["arms"]) == {"paser", "random"}
    assert {"arc_easy (acc)", f"response ppl {heldout.name}"} <= set(comparison["metrics"])
    assert "ppl gap recovered" not in " ".join(comparison["metrics"])  # no perplexity text in this run
    diff = comparison["arms"]["paser"]["metrics"][f"response ppl {heldout.name}"]
    assert diff["ci_low"] <= diff["diff"] <= diff["ci_high"] and diff["std"] is None  # one seed
    assert "pruned (magnitude 0.5) + paser" in page and "not available" not in page
    assert json.loads((out / "run.json").read_text())["stages"] == run["stages"]

    again = run_pipeline(parse_config(raw))
    assert all(s["skipped"] for s in again["stages"])
    assert [s["earlier_run"]["seconds"] for s in again["stages"]] == [s["seconds"] for s in run["stages"]]

    # a second baseline: every stage reused, one more comparison written and shown, removed when not asked for
    raw["baseline"] = ["random", "paser"]
    assert all(s["skipped"] for s in run_pipeline(parse_config(raw))["stages"])
    versus = json.loads((out / "evaluate" / "comparison-vs-paser.json").read_text())
    assert versus["baseline"] == "paser" and json.loads((out / "evaluate" / "comparison.json").read_text()) == comparison
    name = f"response ppl {heldout.name}"
    assert versus["arms"]["random"]["metrics"][name]["diff"] == pytest.approx(-diff["diff"])
    assert "Δ = arm − paser" in (out / "evaluate" / "comparison-vs-paser.md").read_text()
    page = (out / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 8 and "forest plot of differences against paser" in page
    raw["baseline"] = "random"
    run_pipeline(parse_config(raw))
    assert not list((out / "evaluate").glob("comparison-vs-*"))

    raw["select"]["within"] = "sample"  # an option only paser reads: random's selection and recovery untouched
    changed = {s["stage"]: s["skipped"] for s in run_pipeline(parse_config(raw))["stages"]}
    assert [k for k, skipped in changed.items() if not skipped] == ["select/paser/s0", "recover/paser/s0", "evaluate"]

    raw["select"]["batch_size"] = 4  # a scoring setting random reads not: it selects again, the same records
    random_records = (out / "select" / "random" / "s0" / "selected.jsonl").read_bytes()
    changed = {s["stage"]: s["skipped"] for s in run_pipeline(parse_config(raw))["stages"]}
    assert not changed["select/random/s0"] and changed["recover/random/s0"]  # recovery is keyed by the records
    assert (out / "select" / "random" / "s0" / "selected.jsonl").read_bytes() == random_records

    raw["select"]["budget"] = 0.3  # invalidates selection and everything downstream, not pruning
    changed = {s["stage"]: s["skipped"] for s in run_pipeline(parse_config(raw))["stages"]}
    assert changed == {"prune": True, "select/paser/s0": False, "recover/paser/s0": False,
                       "select/random/s0": False, "recover/random/s0": False, "evaluate": False}
    assert len((out / "select" / "paser" / "s0" / "selected.jsonl").read_text().splitlines()) == 18

    forced = {s["stage"]: s["skipped"] for s in run_pipeline(parse_config(raw), from_stage="evaluate")["stages"]}
    assert [k for k, skipped in forced.items() if not skipped] == ["evaluate"]

    raw["export"] = {"format": "w8a8"}  # each recovered model as a deployable checkpoint; nothing else redone
    exported = {s["stage"]: s["skipped"] for s in run_pipeline(parse_config(raw))["stages"]}
    assert [k for k, skipped in exported.items() if not skipped] == ["export/paser/s0", "export/random/s0"]
    report = json.loads((out / "export" / "random" / "s0" / "model" / "export_report.json").read_text())
    assert report["format"] == "w8a8" and report["sparsity"]["output_min"] >= report["sparsity"]["input_min"] >= 0.5
    raw.pop("export")

    # tasks whose folder is absent are skipped when the config allows it, and the report says so
    # (and so are perplexity texts that are absent, beside the ones present)
    text = tmp_path / "text.txt"
    text.write_text("The cat sat on the mat. " * 40)
    raw["evaluate"] = {**raw["evaluate"], "task_dir": str(tmp_path / "absent"), "skip_missing_task_dir": True,
                       "ppl": [str(text), str(tmp_path / "absent.txt")], "skip_missing_ppl": True, "ppl_seqlen": 32}
    run_pipeline(parse_config(raw))
    results = json.loads((out / "evaluate" / "results.json").read_text())
    assert not results["models"]["dense"].get("tasks") and results["ppl_files"] == [str(text)]
    page = (out / "report.html").read_text()
    assert f"zero-shot tasks arc_easy skipped: {tmp_path / 'absent'} not found" in page
    assert f"perplexity text(s) {tmp_path / 'absent.txt'} skipped: not found" in page
    raw["evaluate"]["skip_missing_ppl"] = False
    with pytest.raises(ConfigError, match="perplexity text file not found"):
        run_pipeline(parse_config(raw))


def test_cli_run_config_error_and_demo_show_config(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"model": "m", "select": {"budget": 0.2, "alocation": "cds"}}))
    result = subprocess.run([sys.executable, "-m", "paser.cli", "run", str(path)], capture_output=True, text=True)
    assert result.returncode == 2
    errors = [line for line in result.stderr.strip().splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "unknown key 'select.alocation'" in errors[0] and str(path) in errors[0]
    assert "Traceback" not in result.stderr  # (a busy-CPU warning may precede the error line on stderr)
    shown = subprocess.run([sys.executable, "-m", "paser.cli", "demo", "--show-config"], capture_output=True,
                           text=True, check=True)
    assert yaml.safe_load(shown.stdout) == yaml.safe_load(demo_config_text())


def test_arms_seeds_sampled_data_and_comparison(tmp_path, tiny_model_dir):
    from paser.demo_data import demo_records

    pool = tmp_path / "pool.jsonl"
    pool.write_text("".join(json.dumps(r) + "\n" for r in demo_records()["train"][:220]))
    raw = {
        "model": str(tiny_model_dir), "out": str(tmp_path / "run"), "dtype": "fp32",
        "prune": {"method": "magnitude", "sparsity": 0.5, "calib_data": "@calibration", "calib_samples": 4,
                  "heldout_samples": 2, "seq_len": 48},
        "data": {"source": str(pool), "sample": {"n": 66, "seed": 1, "stratify": "skill"}, "heldout": 11,
                 "calibration": 8},
        "select": {"budget": 0.2, "max_length": 64, "clusters": 3},
        "recover": {"epochs": 1, "batch_size": 4, "micro_batch_size": 4, "cutoff_len": 64, "lr": 0.001},
        "seeds": [0, 1],
        "arms": [{"name": "random", "method": "random"}, {"name": "paser", "method": "paser"},
                 {"name": "paser-size", "method": "paser", "select": {"allocation": "size"}, "recover": {"lr": 0.002},
                  "seeds": [0]}],
        "evaluate": {"tasks": [], "response_ppl": ["@heldout"], "batch_size": 8},
    }
    run = run_pipeline(parse_config(raw))
    out = tmp_path / "run"
    assert [s["stage"] for s in run["stages"]] == [
        "data", "prune", "select/random/s0", "recover/random/s0", "select/random/s1", "recover/random/s1",
        "select/paser/s0", "recover/paser/s0", "select/paser/s1", "recover/paser/s1", "select/paser-size/s0",
        "recover/paser-size/s0", "evaluate"]
    rows = {name: [json.loads(line) for line in (out / "data" / f"{name}.jsonl").read_text().splitlines()]
            for name in ("slice", "heldout", "calibration")}
    assert [len(v) for v in rows.values()] == [66, 11, 8]
    keys = {name: {(r["instruction"], r["input"]) for r in v} for name, v in rows.items()}
    assert not (keys["slice"] & keys["heldout"]) and not (keys["slice"] & keys["calibration"])
    assert not (keys["heldout"] & keys["calibration"])
    in_pool = [json.loads(line)["skill"] for line in pool.read_text().splitlines()]
    for skill in set(in_pool):  # stratified: each source keeps its share of the pool, to within rounding
        share = 66 * in_pool.count(skill) / len(in_pool)
        assert abs(sum(r["skill"] == skill for r in rows["slice"]) - share) < 1
    sel = {k: [json.loads(line)["paser"]["index"]
               for line in (out / "select" / k / "selected.jsonl").read_text().splitlines()]
           for k in ("random/s0", "random/s1")}
    assert sel["random/s0"] != sel["random/s1"]  # the seed drives random selection
    logs = {k: json.loads((out / "recover" / k / "train_log.json").read_text()) for k in ("paser/s0", "paser/s1",
                                                                                          "paser-size/s0")}
    assert [logs[k]["config"]["seed"] for k in ("paser/s0", "paser/s1")] == [0, 1]
    assert logs["paser-size/s0"]["config"]["lr"] == 0.002 and logs["paser/s0"]["config"]["lr"] == 0.001
    size = json.loads((out / "select" / "paser-size" / "s0" / "selection.json").read_text())
    assert size["allocation"] == "size"

    comparison = json.loads((out / "evaluate" / "comparison.json").read_text())
    assert comparison["arms"]["random"]["seeds"] == [0, 1] and comparison["arms"]["paser-size"]["seeds"] == [0]
    metric = "response ppl heldout.jsonl"
    paser = comparison["arms"]["paser"]["metrics"][metric]
    assert paser["paired_seeds"] and paser["std"] is not None and paser["ci_low"] <= paser["ci_high"]
    assert comparison["arms"]["paser-size"]["metrics"][metric]["paired_seeds"] is False
    assert comparison["costs"]["random"]["model_forward_tokens"] == 0 < comparison["costs"]["paser"]["model_forward_tokens"]
    assert "paser-size" in (out / "evaluate" / "comparison.md").read_text()
    # a new arm reuses everything that exists: only its own stages and the evaluation run
    raw["arms"].append({"name": "perplexity", "method": "perplexity", "seeds": [0]})
    again = {s["stage"]: s["skipped"] for s in run_pipeline(parse_config(raw))["stages"]}
    assert [k for k, skipped in again.items() if not skipped] == ["select/perplexity/s0", "recover/perplexity/s0",
                                                                  "evaluate"]
    # more seeds for an arm reuse the seeds it finished (a one-seed screen extended to three)
    raw["arms"][-1]["seeds"] = [0, 1]
    again = {s["stage"]: s["skipped"] for s in run_pipeline(parse_config(raw))["stages"]}
    assert [k for k, skipped in again.items() if not skipped] == ["select/perplexity/s1", "recover/perplexity/s1",
                                                                  "evaluate"]


def test_shipped_compare_config_is_valid(tmp_path):
    from conftest import shared_path
    from paser.pipeline import load_config, with_evaluation_data

    shared_path("instruct", "pool.jsonl")
    config = load_config("compare")
    names = [a["name"] for a in config.arms]
    assert names[:2] == ["random", "paser"] and config.baseline == "random" and config.seeds == [0, 1, 2]
    assert {"ifd", "perplexity", "loss_gap", "dsir", "nuggets", "paser-no-ccg", "paser-no-cds",
            "paser-random-clusters", "paser-kmeans-raw", "paser-size-ifd"} <= set(names)
    assert config.data["sample"]["n"] == 2000 and config.select["budget"] == 0.2
    write_fixtures(tmp_path)  # another evaluation set: every task file the config names
    text = tmp_path / "other.txt"
    text.write_text("x")
    other = with_evaluation_data(config, str(tmp_path), [str(text)])
    assert other.evaluate["task_dir"] == str(tmp_path) and other.evaluate["ppl"] == [str(text)]
    assert other.arms == config.arms


def test_tokens_config_compares_at_equal_tokens():
    from conftest import shared_path
    from paser.pipeline import load_config

    shared_path("instruct", "pool.jsonl")
    tokens = load_config("tokens")
    arms = {a["name"]: a for a in tokens.arms}
    assert len(arms) == len(tokens.arms) and tokens.baselines == ["random", "random-original"]
    # the baseline is what a user does without paser: a random slice of the same tokens, its references, NLL
    assert tokens.select["budget_tokens"] == 0.2 and tokens.recover["loss"] == "nll"
    assert arms["random"]["method"] == "random" and arms["random"]["recover"] == {}
    assert arms["random-kd"]["method"] == "random" and arms["random-kd"]["recover"] == {"loss": "kd"}
    # paser's default recipe: the random slice, distilled, at the library's LoRA learning rate
    from paser.recovery import DEFAULT_LR

    assert arms["random-kd-lr1e-3"]["recover"] == {"loss": "kd", "lr": DEFAULT_LR["lora"]}
    assert arms["random-original"]["recover"] == {"targets": "original"}
    assert arms["full"]["method"] == "full" and arms["full"]["select"] == {"budget_tokens": None}
    assert arms["paper"]["recipe"] == "paper" and arms["paper"]["select"]["allocation"] == "cds"
    # an arm that changes the recovery's compute (learning rate, full-parameter adapter) says so in its name
    changed = {name: arm["recover"] for name, arm in arms.items() if {"lr", "adapter", "epochs"} & set(arm["recover"])}
    assert {"random-lr1e-3", "random-kd-lr1e-3", "random-original-full"} <= set(changed)
    for name, recover in changed.items():
        if name != "paper":  # the paper's recipe is its own
            assert name.endswith("full") if recover.get("adapter") == "full" else "lr" in name, name
    # pruning calibrated on the 128 windows asked: 300 records outside the slice pack into enough of them
    assert tokens.prune["calib_samples"] == 128 and tokens.data["calibration"] == 300
    other = load_config("tokens", ["select.budget_tokens=0.05", "prune.pattern=2:4", "seeds=[0, 1, 2]"])
    assert other.select["budget_tokens"] == 0.05 and other.prune["pattern"] == "2:4" and other.seeds == [0, 1, 2]


def test_study_config_recipes_and_set_overrides(tmp_path):
    from conftest import shared_path
    from paser.pipeline import load_config

    shared_path("instruct", "pool.jsonl")
    study = load_config("study")
    arms = {a["name"]: a for a in study.arms}
    assert arms["paper"]["method"] == "paser" and arms["paper"]["recipe"] == "paper"
    assert arms["paper"]["select"]["allocation"] == "cds" and arms["paper"]["recover"]["sparse_lora"] == "off"
    assert arms["paser-mix"]["recover"] == {"loss": "mix"} and arms["full"]["method"] == "full"
    five = load_config("study", ["select.budget=0.05", "prune.pattern=2:4", "seeds=[0, 1]"])
    assert five.select["budget"] == 0.05 and five.prune["pattern"] == "2:4" and five.seeds == [0, 1]
    with pytest.raises(ConfigError, match="unknown key 'select.budgett'"):
        load_config("study", ["select.budgett=0.05"])
    with pytest.raises(ConfigError, match="--set expects"):
        load_config("study", ["select.budget"])
    recovery = load_config("recovery")
    arms = {a["name"]: a for a in recovery.arms}
    assert recovery.baseline == "lora-remask" and arms["lora-remask"]["recover"] == {"sparse_lora": "off"}
    assert arms["kd"]["recover"] == {"loss": "kd"} and all(a["method"] == "full" for a in recovery.arms)


def test_stage_hashes_come_from_every_declared_field_and_the_objects_versions(tmp_path, monkeypatch):
    """A changed default, a new field or a bumped ``version`` of a registered object changes a stage's hash;
    no hand-kept list decides what counts."""
    import dataclasses

    from paser.pipeline import declared_inputs
    from paser.selection.select import SelectConfig
    from paser.selection.strategies import get_strategy

    defaults = {f.name: getattr(SelectConfig(original="-", pruned="-", data="-", out="-", budget=0.2), f.name)
                for f in dataclasses.fields(SelectConfig)}
    base = declared_inputs(defaults, {"method": "1"})
    assert base["settings"]["within"] == defaults["within"]  # defaults are hashed, not only overrides
    changed_default = declared_inputs({**defaults, "within": "top" if defaults["within"] != "top" else "sample"},
                                {"method": "1"})
    assert stable_hash(changed_default) != stable_hash(base)
    assert stable_hash(declared_inputs(defaults, {"method": "2"})) != stable_hash(base)
    paser_strategy = get_strategy("paser")
    config = SelectConfig(original="-", pruned="-", data="-", out="-", budget=0.2, method="paser", rank="ies",
                          scoring="sampled")
    monkeypatch.setattr(type(paser_strategy), "version", 7)
    assert paser_strategy.cache_version(config).startswith("7+sampled")


def test_evaluation_data_replaced_before_validation_and_bad_set_values(tmp_path):
    """--task-dir applies before the tasks are validated, so a task whose file is only in the new folder is
    accepted; a --set value that is not YAML is one ConfigError, not a traceback."""
    from paser.pipeline import load_config

    write_fixtures(tmp_path / "tasks")
    config_file = tmp_path / "run.yaml"
    config_file.write_text("evaluate:\n  task_dir: nowhere\n  tasks: [arc_easy]\n")
    config = load_config(config_file, ["evaluate.tasks=[hellaswag]"], task_dir=str(tmp_path / "tasks"))
    assert config.evaluate["tasks"] == ["hellaswag"] and config.evaluate["task_dir"] == str(tmp_path / "tasks")
    with pytest.raises(ConfigError, match=r"--set select.budget=\[: the value is not valid YAML"):
        load_config(config_file, ["select.budget=["])
    assert config.evaluate["fidelity"] is True  # on by default: the run's model is the original


def test_fidelity_follows_the_held_out_answers_unless_told_otherwise(tmp_path):
    """paser run measures fidelity to its model on the response_ppl sources, as many records as response_ppl_limit
    takes; fidelity_prompts / fidelity_prompts_limit override; fidelity: false turns it off."""
    from paser.pipeline import load_config
    from paser.pipeline.schema import evaluate_kwargs

    config_file = tmp_path / "run.yaml"
    config_file.write_text("evaluate:\n  tasks: []\n  response_ppl: [demo-heldout]\n  response_ppl_limit: 50\n")
    wired = evaluate_kwargs(load_config(config_file), ["m"], "r.json", files={})
    assert wired["fidelity_prompts"] == ["demo-heldout"] and wired["fidelity_prompts_limit"] == 50
    assert wired["fidelity_to"] == "smollm2-135m-instruct"
    wired = evaluate_kwargs(load_config(config_file, ["evaluate.fidelity_prompts_limit=7"]), ["m"], "r.json", files={})
    assert wired["fidelity_prompts_limit"] == 7
    wired = evaluate_kwargs(load_config(config_file, ["evaluate.fidelity=false"]), ["m"], "r.json", files={})
    assert wired["fidelity_prompts"] == [] and wired["fidelity_to"] is None


def test_an_arm_without_a_learning_rate_trains_at_its_adapters_default(tmp_path):
    from paser.pipeline.schema import arm_recover_settings, recover_stage_inputs
    from paser.recovery import RecoverConfig

    raw = tiny_config("m", tmp_path, tmp_path / "run")
    del raw["recover"]["lr"]
    raw["recover"]["method"] = "end-to-end"
    raw["evaluate"] = {"response_ppl": ["demo-heldout"]}
    raw["arms"] = [{"name": "lora", "method": "random"}, {"name": "full", "method": "random", "recover": {"adapter": "full"}},
                   {"name": "lr", "method": "random", "recover": {"lr": 3e-4}}]
    config = parse_config(raw)
    lrs = {arm["name"]: recover_stage_inputs(RecoverConfig(model="m", data="d", out="o", **arm_recover_settings(
        config, arm, 0)))["settings"]["lr"] for arm in config.arms}
    assert lrs == {"lora": 1e-3, "full": 1e-4, "lr": 3e-4}  # the recovery stage is keyed by the lr it trains with
