import json

import numpy as np
import pandas as pd
import pytest

from paser.errors import ConfigError, ModelError
from paser.selection.select import SelectConfig, run_selection
from tests_helpers import patch_everywhere, select_config, write_demo_data


@pytest.fixture()
def demo_subset(tmp_path):
    return write_demo_data(tmp_path / "data.jsonl", 400)


def config(tmp_path, original, pruned, data, **overrides):
    return select_config(tmp_path, original, pruned, data, **({"budget": 60, "batch_size": 32} | overrides))


def test_end_to_end_with_tiny_models(tmp_path, tiny_model_dir, tiny_pruned_dir, demo_subset, monkeypatch):
    result = run_selection(config(tmp_path, tiny_model_dir, tiny_pruned_dir, demo_subset))
    out = tmp_path / "out"
    selected = [json.loads(line) for line in (out / "selected.jsonl").read_text().splitlines()]
    summary = json.loads((out / "selection.json").read_text())
    scores = pd.read_parquet(out / "scores.parquet")

    assert len(selected) == 60 == len(set(result.indices))
    assert all(set(row["paser"]) == {"index", "line", "cluster", "jsd", "ies", "rank", "score"} for row in selected)
    assert all("skill" in row for row in selected)  # records as given, extra fields kept
    assert summary["n_selected"] == 60 and summary["scores_from_cache"] is False
    assert sum(c["selected"] for c in summary["clusters"]) == 60
    assert sum(c["size"] for c in summary["clusters"]) == 400 and summary["k"] == len(summary["clusters"])
    assert sum(c["budget"] for c in summary["clusters"]) == 60
    assert {"load_data", "embed", "cluster", "score", "select", "write", "total"} <= set(summary["timings"])
    assert "torch" in summary["versions"]
    assert len(scores) == 400 and scores["selected"].sum() == 60
    assert ((scores["jsd"] >= 0) & (scores["jsd"] <= np.log(2))).all()
    # Within each cluster, the accepted records are the best-IES ones (CCG rejections aside).
    for c in summary["clusters"]:
        members = scores[scores["cluster"] == c["cluster"]].sort_values("rank")
        assert members["selected"].iloc[: c["selected"]].sum() + c["rejected"] >= c["selected"]

    # A new budget, allocation and CCG setting reuse the model scores: no model is loaded.
    patch_everywhere(monkeypatch, "paser.models.load_model", lambda *a, **k: pytest.fail("model loaded despite cache"))
    again = run_selection(config(tmp_path, tiny_model_dir, tiny_pruned_dir, demo_subset, budget=0.1,
                                 allocation="mass", ccg=False, out=tmp_path / "out2"))
    summary2 = json.loads((tmp_path / "out2" / "selection.json").read_text())
    assert summary2["scores_from_cache"] is True and summary2["embeddings_from_cache"] is True
    assert summary2["clusters_from_cache"] is True
    assert len(again.indices) == 40 and summary2["ccg"]["rejected"] == 0

    # Same inputs and seed: the same selection, byte for byte.
    run_selection(config(tmp_path, tiny_model_dir, tiny_pruned_dir, demo_subset, out=tmp_path / "out3"))
    assert (tmp_path / "out3" / "selected.jsonl").read_bytes() == (out / "selected.jsonl").read_bytes()


def test_baselines_write_the_same_files(tmp_path, tiny_model_dir, tiny_pruned_dir, demo_subset):
    random = run_selection(config(tmp_path, tiny_model_dir, tiny_pruned_dir, demo_subset, method="random", seed=3))
    again = run_selection(config(tmp_path, tiny_model_dir, tiny_pruned_dir, demo_subset, method="random", seed=3,
                                 out=tmp_path / "r2"))
    assert random.indices == again.indices and len(random.indices) == 60
    full = run_selection(config(tmp_path, tiny_model_dir, tiny_pruned_dir, demo_subset, method="full",
                                out=tmp_path / "full"))
    assert len(full.indices) == 400
    for d in (tmp_path / "out", tmp_path / "full"):
        assert {p.name for p in d.iterdir()} == {"selected.jsonl", "selection.json", "scores.parquet"}


def test_identical_models_fall_back_to_size(tmp_path, tiny_model_dir, demo_subset):
    result = run_selection(config(tmp_path, tiny_model_dir, tiny_model_dir, demo_subset, ccg=False))
    assert "identical models" in result.summary["allocation_fallback"]
    sizes = np.array([c["size"] for c in result.summary["clusters"]])
    budgets = np.array([c["budget"] for c in result.summary["clusters"]])
    assert np.all(np.abs(budgets - 60 * sizes / sizes.sum()) < 1)


def test_ccg_rejections_are_replaced_to_reach_the_budget(tmp_path, tiny_model_dir, tiny_pruned_dir, demo_subset):
    # the paper's rule rejects plenty on the demo data (the default rule, on rare concepts only, rejects none)
    result = run_selection(config(tmp_path, tiny_model_dir, tiny_pruned_dir, demo_subset, budget=200,
                                  ccg_rule="paper"))
    ccg = result.summary["ccg"]
    assert len(result.indices) == 200
    assert ccg["rejected"] > 0
    examples = [e for c in result.summary["clusters"] for e in c["rejection_examples"]]
    assert examples and "never co-occurred" in examples[0]["conflict"]


def test_invalid_configs_fail_before_work(tmp_path, tiny_model_dir, tiny_tokenizer, demo_subset):
    for bad, message in [({"method": "best"}, "method must be"), ({"budget": 0}, "budget must be positive"),
                         ({"budget": 12.5}, "neither a fraction"), ({"allocation": "x"}, "allocation must be"),
                         ({"score": "x"}, "score must be"), ({"dtype": "int8"}, "dtype must be")]:
        with pytest.raises(ConfigError, match=message):
            run_selection(config(tmp_path, tiny_model_dir, tiny_model_dir, demo_subset, **bad))
    from tiny import make_tiny_llama, make_tokenizer, save_model

    other_tok = make_tokenizer(vocab_size=300)
    other = save_model(make_tiny_llama(other_tok), other_tok, tmp_path / "other")
    with pytest.raises(ModelError, match="tokenizers differ"):
        run_selection(config(tmp_path, tiny_model_dir, other, demo_subset))


def test_cli_select(tmp_path, tiny_model_dir, tiny_pruned_dir, demo_subset, monkeypatch, capsys):
    from paser import cli

    monkeypatch.setenv("PASER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("sys.argv", ["paser", "select", "--original", str(tiny_model_dir), "--pruned",
                                     str(tiny_pruned_dir), "--data", str(demo_subset), "--budget", "0.05",
                                     "--out", str(tmp_path / "cli"), "--dtype", "fp32", "--method", "paser", "--clusters", "4"])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 0
    summary = json.loads((tmp_path / "cli" / "selection.json").read_text())
    assert summary["k"] == 4 and summary["n_selected"] == 20
    assert "selected 20 of 400" in capsys.readouterr().out


def test_cli_select_defaults_to_random_and_refuses_another_methods_options(tmp_path, tiny_model_dir, tiny_pruned_dir,
                                                                            demo_subset, monkeypatch, capsys):
    """The default method is random (it loads no model and scores nothing); a PASER option given without
    --method paser is one error naming the method, not silently ignored."""
    from paser import cli

    monkeypatch.setenv("PASER_CACHE", str(tmp_path / "cache"))
    base = ["paser", "select", "--original", str(tiny_model_dir), "--pruned", str(tiny_pruned_dir), "--data",
            str(demo_subset), "--budget-tokens", "0.05", "--dtype", "fp32"]
    monkeypatch.setattr("sys.argv", [*base, "--out", str(tmp_path / "default")])
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    assert exit_info.value.code == 0
    summary = json.loads((tmp_path / "default" / "selection.json").read_text())
    assert summary["method"] == "random" and summary["scores_from_cache"] is None and "clusters" not in summary
    assert 0 < summary["tokens"]["selected"] <= summary["tokens"]["budget"]
    capsys.readouterr()
    for extra, message in ((["--allocation", "cds"], "--allocation applies to method paser, not 'random': add --method paser"),
                           (["--no-ccg", "--rank", "ies"], "--rank, --ccg apply to method paser"),
                           (["--method", "ifd", "--anchors", "8"], "--anchors applies to method nuggets, not 'ifd'")):
        monkeypatch.setattr("sys.argv", [*base, *extra, "--out", str(tmp_path / "refused")])
        with pytest.raises(SystemExit) as exit_info:
            cli.main()
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "refused").exists()


@pytest.mark.slow
def test_embedded_model_and_pruned_copy(tmp_path, embedded):
    from conftest import shared_path
    from paser.data import load_records
    from tests_helpers import magnitude_prune_copy

    pool = shared_path("instruct", "pool.jsonl")
    data = tmp_path / "pool100.jsonl"
    with open(pool) as f:
        data.write_text("".join(next(f) for _ in range(100)))
    model, tok = embedded
    pruned_dir = magnitude_prune_copy(model, tok, tmp_path / "pruned", sparsity=0.5)
    result = run_selection(SelectConfig(original="smollm2-135m-instruct", pruned=str(pruned_dir), data=str(data), method="paser",
                                        budget=20, out=tmp_path / "sel", cache_dir=tmp_path / "cache",
                                        max_length=128))
    jsd = result.scores["jsd"]
    assert len(result.indices) == 20 and len(load_records(tmp_path / "sel" / "selected.jsonl")) == 20
    assert jsd.between(0, np.log(2)).all() and jsd.mean() > 0.01  # 50% pruning visibly changes predictions
    # the selection prefers damaged samples: selected mean JSD above the pool's
    assert result.summary["degradation_selected"]["mean"] > result.summary["degradation"]["mean"] * 0.9


@pytest.mark.parametrize("method", ["random", "paser", "ifd", "full"])
def test_token_budget_stops_at_the_tokens_and_reports_them(tmp_path, tiny_model_dir, tiny_pruned_dir, method):
    """--budget-tokens: the selection's training tokens are within the budget and, for a method that takes a
    record budget, one more record's worth would not have fit; selection.json reports records and tokens."""
    import json

    data = write_demo_data(tmp_path / "pool.jsonl", 120)
    config = select_config(tmp_path, tiny_model_dir, tiny_pruned_dir, data, method=method, budget=None,
                           budget_tokens=0.25, clusters=3, batch_size=16, max_length=64, out=tmp_path / method)
    result = run_selection(config)
    tokens = result.summary["tokens"]
    assert tokens["budget"] == round(0.25 * tokens["pool"])
    assert 0 < tokens["selected"] <= tokens["budget"]
    if method != "full":  # the record budget found is the largest whose selection fits
        assert result.summary["budget"] == result.summary["token_search"]["record_budget"] == len(result.positions)
        assert tokens["selected"] > 0.8 * tokens["budget"]
    written = json.loads((tmp_path / method / "selection.json").read_text())
    assert written["tokens"]["selected"] == tokens["selected"]
    by_records = run_selection(select_config(tmp_path, tiny_model_dir, tiny_pruned_dir, data, method=method,
                                             budget=10, clusters=3, batch_size=16, max_length=64))
    assert by_records.summary["tokens"]["budget"] is None and by_records.summary["tokens"]["selected"] > 0
    # the search reruns the strategy with its signals cached: the cost reported is still one run's from nothing
    costs = [{k: v for k, v in r.summary["cost"].items() if k != "seconds"} for r in (result, by_records)]
    assert costs[0] == costs[1] and (costs[0]["model_forward_tokens"] > 0) == (method in ("paser", "ifd"))


def test_a_budget_is_required(tmp_path, tiny_model_dir, tiny_pruned_dir):
    data = write_demo_data(tmp_path / "pool.jsonl", 20)
    with pytest.raises(ConfigError, match="give a budget"):
        select_config(tmp_path, tiny_model_dir, tiny_pruned_dir, data, budget=None).validate()
