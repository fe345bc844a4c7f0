"""Selection strategies: each baseline against a direct computation, the ablation switches, the bootstrap."""

import math

import numpy as np
import pandas as pd
import pytest
import torch

from paser.data import PromptFormatter, load_records
from paser.selection.select import run_selection
from tests_helpers import patch_everywhere, select_config, write_demo_data


@pytest.fixture()
def pool(tmp_path):
    return write_demo_data(tmp_path / "pool.jsonl", 160)


def config(tmp_path, original, pruned, data, **overrides):
    # the paper's IES ranking unless a test asks for IFD: the ablation switches are measured against it
    return select_config(tmp_path, original, pruned, data, **({"budget": 30, "batch_size": 16, "max_length": 64,
                                                               "rank": "ies"} | overrides))


def test_random_loads_no_model(tmp_path, tiny_model_dir, tiny_pruned_dir, pool, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("random selection loaded a model")

    patch_everywhere(monkeypatch, "paser.models.load_model", refuse)
    patch_everywhere(monkeypatch, "paser.selection.embed.embed_texts", refuse)
    result = run_selection(config(tmp_path, tiny_model_dir, tiny_pruned_dir, pool, method="random", seed=3))
    again = run_selection(config(tmp_path, tiny_model_dir, tiny_pruned_dir, pool, method="random", seed=3,
                                 out=tmp_path / "o2"))
    other = run_selection(config(tmp_path, tiny_model_dir, tiny_pruned_dir, pool, method="random", seed=4,
                                 out=tmp_path / "o3"))
    assert result.indices == again.indices != other.indices and len(set(result.indices)) == 30
    assert result.summary["cost"]["model_forward_tokens"] == 0
    assert result.summary["score"] is None  # selection.json names no score it did not use


def _direct_response_loss(model, ids, n_prompt):
    with torch.no_grad():
        logp = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
    return float(np.mean([-logp[t - 1, ids[t]].item() for t in range(n_prompt, len(ids))]))


def test_ifd_equals_a_direct_two_pass_computation(tmp_path, tiny_model_dir, tiny_pruned_dir, pool):
    from paser.models import load_model

    result = run_selection(config(tmp_path, tiny_model_dir, tiny_pruned_dir, pool, method="ifd"))
    model, tokenizer = load_model(str(tiny_pruned_dir), dtype="fp32")
    formatter = PromptFormatter(tokenizer, max_length=64)
    records = load_records(pool)
    start = tokenizer.bos_token_id
    for i in (0, 7, 42):
        e = formatter.encode(records[i])
        conditioned = _direct_response_loss(model, e.input_ids, len(e.prompt_ids))
        alone = _direct_response_loss(model, [start] + e.response_ids, 1)
        assert result.scores["ifd"][i] == pytest.approx(conditioned / alone, rel=1e-4)
    ifd = result.scores["ifd"].to_numpy()
    chosen = ifd[result.positions]
    eligible = ifd < 1
    if eligible.sum() >= 30:  # highest IFD below 1 first
        assert (chosen < 1).all() and chosen.min() >= ifd[eligible & ~result.scores["selected"].to_numpy()].max()
    # perplexity reuses the conditioned pass of the same model: no new forward pass
    perp = run_selection(config(tmp_path, tiny_model_dir, tiny_pruned_dir, pool, method="perplexity",
                                out=tmp_path / "p"))
    loss = perp.scores["loss_pruned"].to_numpy()
    assert set(perp.positions) == set(np.argsort(-loss, kind="stable")[:30])


def test_nuggets_equals_hand_computation(tiny_model_dir, tiny_tokenizer):
    from paser.models import load_model
    from paser.selection.strategies.nuggets import nuggets_scores

    model, tokenizer = load_model(str(tiny_model_dir), dtype="fp32")
    formatter = PromptFormatter(tokenizer, max_length=48)
    records = load_records("demo", limit=5)
    encoded = [formatter.encode(r) for r in records]
    candidates, anchors = encoded[:3], encoded[3:]
    scores = nuggets_scores(model, candidates, anchors, tokenizer.pad_token_id, progress=False)
    for c, score in zip(candidates, scores):
        drops = 0
        for a in anchors:
            zero = _direct_response_loss(model, a.input_ids, len(a.prompt_ids))
            one = _direct_response_loss(model, c.input_ids + a.input_ids, len(c.input_ids) + len(a.prompt_ids))
            assert one != pytest.approx(zero, abs=1e-9)  # the demonstration changes the loss
            drops += one < zero
        assert score == drops / len(anchors)


def test_dsir_weights_equal_hand_computation():
    import zlib

    from paser.selection.strategies.dsir import gumbel_top_k, log_importance_weights, ngram_features

    pool = ["the cat sat", "a dog ran far", "the cat ran"]
    target = ["the cat", "cat sat on the mat"]
    buckets = 64

    def counts(text):
        words = text.split()
        grams = words + [f"{a} {b}" for a, b in zip(words, words[1:])]
        c = np.zeros(buckets)
        for g in grams:
            c[zlib.crc32(g.encode()) % buckets] += 1
        return c

    P = np.stack([counts(t) for t in pool])
    T = np.stack([counts(t) for t in target])
    log_t = np.log((T.sum(0) + 1) / (T.sum() + buckets))
    log_p = np.log((P.sum(0) + 1) / (P.sum() + buckets))
    expected = P @ (log_t - log_p)
    got = log_importance_weights(ngram_features(pool, buckets), ngram_features(target, buckets))
    np.testing.assert_allclose(got, expected, rtol=1e-12)
    assert got[0] > got[1]  # "the cat sat" is far more target-like than "a dog ran far"
    keys = expected + np.random.default_rng(5).gumbel(size=3)
    assert gumbel_top_k(expected, 2, seed=5) == list(np.argsort(-keys, kind="stable")[:2])


def test_dsir_selects_toward_the_target(tmp_path, tiny_model_dir, tiny_pruned_dir, pool, monkeypatch):
    patch_everywhere(monkeypatch, "paser.models.load_model", lambda *a, **k: pytest.fail("dsir loaded a model"))
    from paser.demo_data import demo_records

    target = tmp_path / "target.txt"  # held-out capital questions: not in the pool
    target.write_text("\n".join(f"{r['instruction']} {r['input']} {r['output']}" for r in demo_records()["heldout"]
                                if r["skill"] == "capitals"))
    result = run_selection(config(tmp_path, tiny_model_dir, tiny_pruned_dir, pool, method="dsir", target=str(target)))
    skills = [r.raw["skill"] for r in result.records]
    assert skills.count("capitals") > 30 / 11 * 2  # far above its share of a uniform sample
    assert result.summary["score"].startswith("log importance weight")


def test_ablation_switches_change_only_their_part(tmp_path, tiny_model_dir, tiny_pruned_dir, pool):
    def run(**kw):
        out = tmp_path / "_".join(f"{k}-{v}" for k, v in kw.items()) if kw else tmp_path / "base"
        # against the paper's CDS allocation: the ablations the paper names are switched off one at a time
        return run_selection(config(tmp_path, tiny_model_dir, tiny_pruned_dir, pool, budget=40, out=out,
                                    **({"allocation": "cds"} | kw)))

    base = run()
    labels = base.scores["cluster"].to_numpy()
    no_ccg = run(ccg=False)
    assert no_ccg.summary["ccg"]["rejected"] == 0 and base.summary["ccg"]["enabled"]
    np.testing.assert_array_equal(no_ccg.scores["cluster"], labels)
    assert [c["budget"] for c in no_ccg.summary["clusters"]] == [c["budget"] for c in base.summary["clusters"]]
    np.testing.assert_allclose(no_ccg.scores["ies"], base.scores["ies"])

    size = run(allocation="size")
    np.testing.assert_array_equal(size.scores["cluster"], labels)
    sizes = np.array([c["size"] for c in size.summary["clusters"]])
    budgets = np.array([c["budget"] for c in size.summary["clusters"]])
    assert np.abs(budgets - 40 * sizes / sizes.sum()).max() < 1  # proportional to size, not to CDS
    assert budgets.tolist() != [c["budget"] for c in base.summary["clusters"]] or np.allclose(
        [c["cds"] for c in base.summary["clusters"]], base.summary["clusters"][0]["cds"])

    shuffled = run(cluster_method="random")
    assert shuffled.summary["k"] == base.summary["k"] and not np.array_equal(shuffled.scores["cluster"], labels)
    np.testing.assert_allclose(shuffled.scores["jsd"], base.scores["jsd"])
    raw = run(cluster_method="kmeans-raw")
    assert raw.summary["k"] == base.summary["k"] and raw.summary["cluster_method"] == "kmeans-raw"
    for result in (no_ccg, size, shuffled, raw):
        assert len(result.indices) == 40 and result.summary["scores_from_cache"] is True


def test_paired_bootstrap_matches_hand_computation():
    from paser.compare import compare_arms

    rng = np.random.default_rng(1)
    items = {label: (rng.random(12) < p).astype(float).tolist()
             for label, p in {"r0": 0.4, "r1": 0.5, "p0": 0.6, "p1": 0.7}.items()}
    results = {"models": {label: {"tasks": {"arc_easy": {"items": {"acc": v}}}, "perplexity": {},
                                  "response_perplexity": {}} for label, v in items.items()}}
    arms = {"random": {0: "r0", 1: "r1"}, "paser": {0: "p0", 1: "p1"}}
    out = compare_arms(results, arms, "random", replicates=500, seed=7)
    got = out["arms"]["paser"]["metrics"]["arc_easy (acc)"]

    # by hand, drawing in the documented order: item weights, then one seed draw shared by both arms
    hand = np.random.default_rng(7)
    weights = hand.multinomial(12, np.full(12, 1 / 12), size=500)
    draw = hand.integers(0, 2, size=(500, 2))
    diffs = []
    for b in range(500):
        value = {label: float(np.dot(weights[b], v)) / 12 for label, v in items.items()}
        arm = np.mean([value[["p0", "p1"][s]] for s in draw[b]])
        base = np.mean([value[["r0", "r1"][s]] for s in draw[b]])
        diffs.append(arm - base)
    assert got["ci_low"] == pytest.approx(np.percentile(diffs, 2.5))
    assert got["ci_high"] == pytest.approx(np.percentile(diffs, 97.5))
    means = {k: np.mean(v) for k, v in items.items()}
    assert got["diff"] == pytest.approx((means["p0"] + means["p1"]) / 2 - (means["r0"] + means["r1"]) / 2)
    assert got["std"] == pytest.approx(np.std([means["p0"], means["p1"]], ddof=1))
    assert got["paired_seeds"] and got["verdict"] in {"better", "worse", "within noise"}
    assert math.isfinite(got["mean"])


def test_specific_concept_rule_never_erases_a_cluster(tmp_path, tiny_model_dir, tiny_pruned_dir, pool):
    paper = run_selection(config(tmp_path, tiny_model_dir, tiny_pruned_dir, pool, budget=60, clusters=6,
                                 ccg_rule="paper"))
    specific = run_selection(config(tmp_path, tiny_model_dir, tiny_pruned_dir, pool, budget=60, clusters=6,
                                    ccg_rule="specific", ccg_max_df=0.05, out=tmp_path / "s"))
    assert specific.summary["ccg"]["rule"] == "specific" and specific.summary["ccg"]["specific_concepts"] > 0
    assert specific.summary["ccg"]["rejected"] < paper.summary["ccg"]["rejected"]
    assert specific.summary["ccg"]["clusters_emptied"] == 0
    emptied = sum(1 for c in paper.summary["clusters"] if c["budget"] and not c["selected"])
    assert paper.summary["ccg"]["clusters_emptied"] == emptied
    for c in specific.summary["clusters"]:
        assert c["rejected"] <= c["budget"]  # the cap
        if c["budget"] and c["size"] > c["budget"]:
            assert c["selected"] > 0
    np.testing.assert_array_equal(specific.scores["cluster"], paper.scores["cluster"])  # only the filter changed
    # boilerplate concepts (in more than 5% of the records) are out of the graph
    from collections import Counter

    from paser.selection.ccg import extract_concepts

    records = load_records(pool)
    df = Counter(c for r in records for c in extract_concepts(f"{r.user_text}\n{r.output}", 5))
    assert sum(n > 0.05 * len(records) for n in df.values()) >= 1
    assert specific.summary["ccg"]["specific_concepts"] == sum(n <= 0.05 * len(records) for n in df.values())


def test_sampling_inside_clusters_and_original_loss_filter(tmp_path, tiny_model_dir, tiny_pruned_dir, pool):
    top = run_selection(config(tmp_path, tiny_model_dir, tiny_pruned_dir, pool, budget=40, clusters=4, ccg=False,
                               within="top"))
    kw = dict(budget=40, clusters=4, ccg=False, within="sample")
    sampled = run_selection(config(tmp_path, tiny_model_dir, tiny_pruned_dir, pool, out=tmp_path / "a", **kw))
    again = run_selection(config(tmp_path, tiny_model_dir, tiny_pruned_dir, pool, out=tmp_path / "b", **kw))
    assert sampled.indices == again.indices and set(sampled.indices) != set(top.indices)
    assert [c["budget"] for c in sampled.summary["clusters"]] == [c["budget"] for c in top.summary["clusters"]]
    filtered = run_selection(config(tmp_path, tiny_model_dir, tiny_pruned_dir, pool, budget=40, clusters=4, ccg=False,
                                    within="top", drop_original_loss_above=0.8, out=tmp_path / "f"))
    loss = filtered.scores["loss_original"].to_numpy()
    noisy = loss > np.quantile(loss, 0.8)
    assert filtered.summary["examined_last"] == noisy.sum()
    chosen = np.zeros(len(loss), dtype=bool)
    chosen[filtered.positions] = True
    labels = filtered.scores["cluster"].to_numpy()
    for c in filtered.summary["clusters"]:  # a noisy record is taken only once its cluster's clean ones ran out
        members = labels == c["cluster"]
        if (chosen & members & noisy).any():
            assert (chosen[members & ~noisy]).all()


def test_rank_ifd_keeps_the_allocation_and_takes_each_clusters_highest_ifd(tmp_path, tiny_model_dir,
                                                                          tiny_pruned_dir, pool):
    kw = dict(budget=40, clusters=4, ccg=False, within="top", allocation="size")
    by_ies = run_selection(config(tmp_path, tiny_model_dir, tiny_pruned_dir, pool, **kw))
    by_ifd = run_selection(config(tmp_path, tiny_model_dir, tiny_pruned_dir, pool, rank="ifd", out=tmp_path / "i",
                                  **kw))
    ifd_only = run_selection(config(tmp_path, tiny_model_dir, tiny_pruned_dir, pool, method="ifd", out=tmp_path / "g"))
    ifd = by_ifd.scores["ifd"].to_numpy()
    np.testing.assert_allclose(ifd, ifd_only.scores["ifd"].to_numpy())  # the IFD baseline's own scores
    assert by_ifd.summary["rank"] == "ifd" and by_ifd.summary["examined_last"] == int((ifd >= 1).sum())
    assert by_ifd.summary["score"] == "jsd" and ifd_only.summary["score"] == "IFD under the pruned model"
    # the clusters and their budgets are IES's; only the order inside a cluster changed
    np.testing.assert_array_equal(by_ifd.scores["cluster"], by_ies.scores["cluster"])
    assert [c["budget"] for c in by_ifd.summary["clusters"]] == [c["budget"] for c in by_ies.summary["clusters"]]
    assert set(by_ifd.indices) != set(by_ies.indices)
    labels = by_ifd.scores["cluster"].to_numpy()
    chosen = np.zeros(len(ifd), dtype=bool)
    chosen[by_ifd.positions] = True
    key = np.where(ifd < 1, ifd, -np.inf)  # IFD >= 1 only once a cluster's other records ran out
    for c in by_ifd.summary["clusters"]:
        members = np.flatnonzero(labels == c["cluster"])
        expected = members[np.lexsort((members, -key[members]))][: c["budget"]]
        assert set(np.flatnonzero(chosen & (labels == c["cluster"]))) == set(expected)


def test_rank_score_takes_each_clusters_highest_jsd_per_token_whatever_the_length(tmp_path, tiny_model_dir,
                                                                                 tiny_pruned_dir, pool):
    kw = dict(budget=40, clusters=4, ccg=False, within="top", allocation="size")
    by_ies = run_selection(config(tmp_path, tiny_model_dir, tiny_pruned_dir, pool, **kw))
    by_score = run_selection(config(tmp_path, tiny_model_dir, tiny_pruned_dir, pool, rank="score",
                                    out=tmp_path / "s", **kw))
    jsd = by_score.scores["score"].to_numpy()
    labels = by_score.scores["cluster"].to_numpy()
    np.testing.assert_array_equal(labels, by_ies.scores["cluster"])
    assert by_score.summary["rank"] == "score" and set(by_score.indices) != set(by_ies.indices)
    chosen = np.zeros(len(jsd), dtype=bool)
    chosen[by_score.positions] = True
    for c in by_score.summary["clusters"]:  # the top of the score itself, not of score / log cost
        members = np.flatnonzero(labels == c["cluster"])
        expected = members[np.lexsort((members, -jsd[members]))][: c["budget"]]
        assert set(np.flatnonzero(chosen & (labels == c["cluster"]))) == set(expected)

def test_sampled_scoring_scores_a_pilot_and_the_likely_picks_only(tmp_path, tiny_model_dir, tiny_pruned_dir,
                                                                   monkeypatch):
    import json

    from paser.demo_data import demo_records
    from paser.selection.select import SelectConfig, run_selection

    monkeypatch.setenv("PASER_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in demo_records()["train"][:150]))
    common = dict(method="paser", original=str(tiny_model_dir), pruned=str(tiny_pruned_dir), data=str(data), budget=15,
                  dtype="fp32", batch_size=8, clusters=3, ccg=False, rank="ies", allocation="mass", within="sample")
    exhaustive = run_selection(SelectConfig(**common, out=tmp_path / "ex")).scores
    monkeypatch.setenv("PASER_CACHE", str(tmp_path / "cache2"))  # nothing scored yet
    result = run_selection(SelectConfig(**common, scoring="sampled", pilot=0.1, pilot_min=5, out=tmp_path / "sa"))
    info = result.summary["sampling"]
    table = pd.read_parquet(tmp_path / "sa" / "scores.parquet")
    exact = table["scored_exactly"].to_numpy()
    assert info["scored_exactly"] == exact.sum() == info["pilot"] + info["confirmed"] < 150
    assert info["pilot"] == 3 * 5 or info["pilot"] >= 15  # max(5, 10% of each cluster)
    assert info["confirmed"] <= 2 * 15 and info["predictor_heldout_spearman"] is not None
    np.testing.assert_allclose(table["jsd"][exact], exhaustive["jsd"][exact], atol=1e-6)  # exact where scored
    assert table["jsd"][~exact].isna().all() and table["score"].notna().all()  # predicted elsewhere
    assert all(json.loads(line)["paser"]["scored_exactly"] for line in (tmp_path / "sa" / "selected.jsonl").open())
    assert len(result.indices) == 15
    selection = json.loads((tmp_path / "sa" / "selection.json").read_text())
    assert selection["sampling"]["scoring"] == "sampled" and len(selection["sampling"]["cds_stderr"]) == 3

    # scores served from the exhaustive run's cache: the same selection, costed as if computed
    monkeypatch.setenv("PASER_CACHE", str(tmp_path / "cache"))
    cached = run_selection(SelectConfig(**common, scoring="sampled", pilot=0.1, pilot_min=5))
    assert cached.indices == result.indices
    assert cached.summary["cost"]["model_forward_tokens"] == result.summary["cost"]["model_forward_tokens"] < (
        json.loads((tmp_path / "ex" / "selection.json").read_text())["cost"]["model_forward_tokens"])

    capped = run_selection(SelectConfig(**common, scoring="sampled", pilot=0.1, pilot_min=5, max_scored=25))
    assert capped.summary["sampling"]["scored_exactly"] <= 25 and len(capped.indices) == 15


def test_sampled_confirmation_on_first_tokens(tmp_path, tiny_model_dir, tiny_pruned_dir, monkeypatch):
    """confirm_tokens: the confirmed records' JSD is the JSD of their prompt and first N response tokens, the
    pilot's is whole; with N beyond every response the selection is the whole-record one."""
    import json

    from paser.data import Encoded, PromptFormatter, encode_records, load_records
    from paser.demo_data import demo_records
    from paser.models import load_model, load_tokenizer
    from paser.selection.score import score_records
    from paser.selection.select import SelectConfig, run_selection

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in demo_records()["train"][:150]))
    common = dict(method="paser", original=str(tiny_model_dir), pruned=str(tiny_pruned_dir), data=str(data), budget=15,
                  dtype="fp32", batch_size=8, clusters=3, ccg=False, scoring="sampled", pilot=0.1, pilot_min=5, rank="ies",
                  allocation="mass", within="sample")
    monkeypatch.setenv("PASER_CACHE", str(tmp_path / "cache"))
    whole = run_selection(SelectConfig(**common, out=tmp_path / "whole"))
    short = run_selection(SelectConfig(**common, confirm_tokens=3, out=tmp_path / "short"))
    info = short.summary["sampling"]
    table = pd.read_parquet(tmp_path / "short" / "scores.parquet")
    prefix, exact = table["scored_prefix"].to_numpy(), table["scored_exactly"].to_numpy()
    assert info["scored_prefix"] == prefix.sum() == info["confirmed"] > 0 and info["scored_exactly"] == exact.sum()
    assert info["confirm_tokens"] == 3 and not (prefix & exact).any()
    np.testing.assert_allclose(table["jsd"][exact], whole.scores["jsd"][exact], atol=1e-6)  # the pilot: whole

    tokenizer = load_tokenizer(str(tiny_model_dir))
    _, encoded = encode_records(PromptFormatter(tokenizer), load_records(str(data)))
    rows = np.flatnonzero(prefix)
    truncated = [Encoded(encoded[i].prompt_ids, encoded[i].response_ids[:3]) for i in rows]  # by hand
    direct = score_records(load_model(str(tiny_model_dir), dtype="fp32", tokenizer=False)[0],
                           load_model(str(tiny_pruned_dir), dtype="fp32", tokenizer=False)[0],
                           truncated, tokenizer.pad_token_id, progress=False)
    np.testing.assert_allclose(table["jsd"].to_numpy()[rows], direct["jsd"].to_numpy(), atol=1e-5)
    whole_jsd = whole.scores["jsd"].to_numpy()[rows]  # the same records, confirmed on their whole responses
    assert np.isfinite(whole_jsd).all() and not np.allclose(table["jsd"].to_numpy()[rows], whole_jsd)

    longest = int(table["response_tokens"].max())
    same = run_selection(SelectConfig(**common, confirm_tokens=longest))
    assert same.indices == whole.indices
    with pytest.raises(Exception, match="confirm_tokens"):
        SelectConfig(**{**common, "scoring": "exhaustive"}, confirm_tokens=3).validate()


def test_sampled_scoring_with_a_perfect_predictor_draws_what_exhaustive_draws(tmp_path, tiny_model_dir, tiny_pruned_dir,
                                                                              monkeypatch):
    """Confirmation follows the selection's own draw (within="sample"): with an oracle predictor and budgets
    that do not depend on the pilot (size allocation), confirming n_k per cluster finds exactly the records the
    exhaustive draw picks."""
    import json

    import paser.selection.strategies.sampled as sampled_module
    from paser.demo_data import demo_records
    from paser.selection.select import SelectConfig, run_selection

    monkeypatch.setenv("PASER_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in demo_records()["train"][:150]))
    common = dict(method="paser", original=str(tiny_model_dir), pruned=str(tiny_pruned_dir), data=str(data), budget=15,
                  dtype="fp32", batch_size=8, clusters=3, ccg=False, allocation="size", within="sample", rank="ies", seed=3)
    exhaustive = run_selection(SelectConfig(**common))
    truth = exhaustive.scores["jsd"].to_numpy()

    class Oracle:
        def predict(self, features):
            assert len(features) == len(truth)
            return truth

    monkeypatch.setattr(sampled_module, "fit_predictor", lambda features, target, seed: (Oracle(), 1.0))
    sampled = run_selection(SelectConfig(**common, scoring="sampled", pilot=0.05, pilot_min=2, oversample=1))
    assert sampled.summary["sampling"]["scored_exactly"] < 150
    assert sorted(sampled.indices) == sorted(exhaustive.indices)


def test_concept_filter_refills_in_the_ranks_order(tmp_path, tiny_model_dir, tiny_pruned_dir, pool, monkeypatch):
    """When the filter rejected more than the budget can spare, the rejected records come back in the order
    the selection ranked them (IFD with --rank ifd), not by IES."""
    import paser.selection.strategies.paser as paser_strategy

    records = list(load_records(pool))
    flagged = set(range(0, len(records), 2))  # every other record "conflicts"
    by_text = {f"{r.user_text}\n{r.output}": i for i, r in enumerate(records)}
    monkeypatch.setattr(paser_strategy, "extract_concepts",
                        lambda text, n: frozenset({"conflict"}) if by_text[text] in flagged else frozenset())
    monkeypatch.setattr(paser_strategy.ConceptGraph, "conflict",
                        lambda self, concepts: ("conflict", "conflict") if "conflict" in concepts else None)
    budget = len(records) - len(flagged) // 2  # every unflagged record, and half the flagged ones
    result = run_selection(config(tmp_path, tiny_model_dir, tiny_pruned_dir, pool, budget=budget, clusters=4,
                                  ccg=True, ccg_rule="paper", rank="ifd", allocation="size"))
    assert result.summary["ccg"]["admitted_despite_conflict"] == len(flagged) // 2
    ifd = result.scores["ifd"].to_numpy()
    ies = result.scores["ies"].to_numpy()
    key = np.where(ifd < 1, ifd, -np.inf)
    candidates = np.array(sorted(flagged))
    expected = set(candidates[np.lexsort((candidates, -key[candidates]))][: len(flagged) // 2].tolist())
    admitted = set(result.positions) & flagged
    assert admitted == expected
    by_ies = set(candidates[np.lexsort((candidates, -ies[candidates]))][: len(flagged) // 2].tolist())
    assert by_ies != expected  # the test tells the two orders apart
