import json
import math
import subprocess
import sys

import pytest
import torch

from conftest import shared_path
from paser.data import PromptFormatter, iter_dict_records
from paser.errors import ConfigError, DataError
from paser.evaluate import (
    ZERO_SHOT_TASKS,
    EvaluateConfig,
    perplexity,
    response_perplexity,
    run_evaluation,
    text_windows,
    write_task_configs,
)
from tests_helpers import WORDS, patch_everywhere, write_fixtures


@torch.no_grad()
def loglikelihood(model, tokenizer, context, continuation):
    """log p(continuation | context), tokenised as lm-eval does (context and continuation apart)."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    cont = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    logp = model(torch.tensor([ctx + cont])).logits[0].log_softmax(-1)
    return sum(logp[len(ctx) + i - 1, t].item() for i, t in enumerate(cont))


def test_all_task_formats_on_a_tiny_model(tmp_path, tiny_model_dir):
    from paser.models import load_model, resolve_dtype_name

    fixtures = write_fixtures(tmp_path / "tasks")
    out = tmp_path / "res" / "results.json"
    results = run_evaluation(EvaluateConfig(models=[str(tiny_model_dir)], task_dir=fixtures, out=out, batch_size=4))
    entry = results["models"][str(tiny_model_dir)]
    for task in ZERO_SHOT_TASKS:
        row = entry["tasks"][task]
        assert row["n"] == 10 and 0 <= row["acc"] <= 1 and 0 <= row["acc_norm"] <= 1
        assert row["acc_stderr"] is not None and row["seconds"] >= 0
    saved = json.loads(out.read_text())
    assert saved["versions"]["lm-eval"].startswith("0.4") and saved["dtype"] == resolve_dtype_name("auto")
    table = out.with_suffix(".md").read_text()
    assert str(tiny_model_dir) in table and "mean acc" in table and "arc_easy (acc)" in table

    # acc equals an independent computation: argmax of log p(" choice" | prompt), and for WinoGrande
    # argmax of log p(continuation | option).
    model, tokenizer = load_model(str(tiny_model_dir), dtype="fp32")
    docs = [json.loads(line) for line in (fixtures / "arc_easy.jsonl").read_text().splitlines()]
    hits = [max(range(4), key=lambda c: loglikelihood(model, tokenizer, f"Question: {d['question']}\nAnswer:",
                                                      " " + d["choices"][c])) == d["label"] for d in docs]
    assert entry["tasks"]["arc_easy"]["acc"] == pytest.approx(sum(hits) / len(hits))
    docs = [json.loads(line) for line in (fixtures / "winogrande.jsonl").read_text().splitlines()]
    hits = [max(range(2), key=lambda c: loglikelihood(model, tokenizer, d["context_options"][c],
                                                      " " + d["continuation"])) == d["label"] for d in docs]
    assert entry["tasks"]["winogrande"]["acc"] == pytest.approx(sum(hits) / len(hits))


def test_two_models_share_tasks_and_tokenised_text(tmp_path, tiny_model_dir, tiny_pruned_dir, monkeypatch):
    import paser.evaluate.text_perplexity as text_module
    import paser.evaluate.zero_shot as task_module

    fixtures = write_fixtures(tmp_path / "tasks", rows=4)
    text = tmp_path / "wiki.txt"
    text.write_text(" ".join(WORDS * 20))
    calls = {"load_tasks": 0, "text_windows": 0}

    def spy(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, wrapper)

    spy(task_module, "load_tasks")
    spy(text_module, "text_windows")
    results = run_evaluation(EvaluateConfig(models=[str(tiny_model_dir), str(tiny_pruned_dir)], tasks=["arc_easy"],
                                            task_dir=fixtures, ppl=[str(text)], ppl_seqlen=32, limit=3,
                                            labels=["dense", "pruned"], out=tmp_path / "r.json"))
    assert calls == {"load_tasks": 1, "text_windows": 1}
    assert list(results["models"]) == ["dense", "pruned"]
    assert results["models"]["pruned"]["tasks"]["arc_easy"]["n"] == 3
    ppl = {label: results["models"][label]["perplexity"][str(text)]["ppl"] for label in ("dense", "pruned")}
    assert ppl["dense"] != ppl["pruned"]
    lines = results["table"].splitlines()
    assert lines[2].startswith("| dense |") and lines[3].startswith("| pruned |")


def test_perplexity_matches_direct_computation(tiny_model_dir):
    from paser.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir), dtype="fp32")
    sequences = [[5, 9, 14, 3, 7], [8, 2, 11]]
    nll = []
    with torch.no_grad():
        for s in sequences:
            logp = model(torch.tensor([s])).logits[0].log_softmax(-1)
            nll += [-logp[t - 1, s[t]].item() for t in range(1, len(s))]
    assert perplexity(model, sequences) == pytest.approx(torch.tensor(nll).mean().exp().item(), rel=1e-5)

    text = " ".join(WORDS * 5)
    ids = tokenizer(text)["input_ids"]
    windows = text_windows(tokenizer, text, 16)
    assert len(windows) == len(ids) // 16 and sum(windows, []) == ids[:len(windows) * 16]
    with pytest.raises(ConfigError, match="fewer than one window"):
        text_windows(tokenizer, "the cat", 16)


def test_response_perplexity_counts_response_tokens_only(tiny_model_dir):
    from paser.models import load_model

    model, tokenizer = load_model(str(tiny_model_dir), dtype="fp32")
    records = list(iter_dict_records([{"instruction": "Add 2 and 3.", "output": "5"},
                                      {"instruction": "Name a colour.", "input": "warm", "output": "red or orange"}], source="t"))
    encoded = PromptFormatter(tokenizer).encode_all(records)
    nll = []
    with torch.no_grad():
        for e in encoded:
            logp = model(torch.tensor([e.input_ids])).logits[0].log_softmax(-1)
            start = len(e.prompt_ids)
            nll += [-logp[t - 1, e.input_ids[t]].item() for t in range(start, len(e.input_ids))]
    expected = math.exp(sum(nll) / len(nll))
    assert response_perplexity(model, encoded, tokenizer.pad_token_id, batch_size=2) == pytest.approx(expected, rel=1e-5)


def test_bad_requests_fail_before_any_model_loads(tmp_path, monkeypatch):
    patch_everywhere(monkeypatch, "paser.models.load_model", lambda *a, **k: pytest.fail("model loaded"))
    fixtures = write_fixtures(tmp_path / "tasks", rows=3)
    with pytest.raises(ConfigError, match="unknown task"):
        run_evaluation(EvaluateConfig(models=["m"], tasks=["mmlu"], task_dir=fixtures))
    with pytest.raises(ConfigError, match="not found"):
        run_evaluation(EvaluateConfig(models=["m"], tasks=["arc_easy"], task_dir=tmp_path / "none"))
    with pytest.raises(ConfigError, match="perplexity text file not found"):
        run_evaluation(EvaluateConfig(models=["m"], tasks=[], ppl=[str(tmp_path / "missing.txt")]))
    lines = (fixtures / "piqa.jsonl").read_text().splitlines()
    bad = json.loads(lines[1])
    bad["label"] = 5
    (fixtures / "piqa.jsonl").write_text("\n".join([lines[0], json.dumps(bad), lines[2]]) + "\n")
    with pytest.raises(DataError, match=r"piqa.jsonl: line 2: field 'label'"):
        run_evaluation(EvaluateConfig(models=["m"], tasks=["piqa"], task_dir=fixtures))
    del bad["label"]
    (fixtures / "piqa.jsonl").write_text("\n".join([lines[0], json.dumps(bad)]) + "\n")
    with pytest.raises(DataError, match=r"line 2: field 'label'.*missing"):
        run_evaluation(EvaluateConfig(models=["m"], tasks=["piqa"], task_dir=fixtures))


@pytest.mark.slow
def test_arc_easy_matches_lm_eval_command_line(tmp_path):
    """paser's ARC-Easy accuracy equals lm-eval's own CLI on the same task config and data (50 rows)."""
    from paser.models import DEFAULT_MODEL as embedded
    from paser.models import resolve_spec

    arc = shared_path("eval", "arc_easy.jsonl")
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    (task_dir / "arc_easy.jsonl").write_text("".join(arc.read_text().splitlines(keepends=True)[:50]))
    ours = run_evaluation(EvaluateConfig(models=[embedded], tasks=["arc_easy"], task_dir=task_dir, limit=50,
                                         dtype="fp32", batch_size=8, out=tmp_path / "ours.json"))
    ours = ours["models"][embedded]["tasks"]["arc_easy"]

    include = write_task_configs(task_dir, ["arc_easy"], tmp_path / "configs")
    location = resolve_spec(embedded).location
    subprocess.run([sys.executable, "-m", "lm_eval", "--model", "hf",
                    "--model_args", f"pretrained={location},dtype=float32", "--tasks", include["arc_easy"],
                    "--include_path", str(tmp_path / "configs"), "--limit", "50", "--batch_size", "8",
                    "--output_path", str(tmp_path / "cli")], check=True, capture_output=True)
    theirs = json.loads(next((tmp_path / "cli").rglob("results_*.json")).read_text())["results"]["paser_arc_easy"]
    assert ours["n"] == 50
    assert ours["acc"] == pytest.approx(theirs["acc,none"], abs=1e-9)
    assert ours["acc_norm"] == pytest.approx(theirs["acc_norm,none"], abs=1e-9)


def _fidelity_of_dense_and_pruned(tmp_path, tiny_model_dir, tiny_pruned_dir, item, **settings):
    """Evaluate the tiny dense and pruned models' fidelity to the dense one; checks the dense is exact and
    returns (pruned's value, the dense model, the pruned model, the tokenizer)."""
    from paser.models import load_model

    settings.setdefault("dtype", "fp32")  # what the direct computations use ("auto" is bf16 on AVX512-BF16 CPUs)
    results = run_evaluation(EvaluateConfig(models=[str(tiny_model_dir), str(tiny_pruned_dir)], tasks=[],
                                            fidelity_to=str(tiny_model_dir), labels=["dense", "pruned"],
                                            out=tmp_path / "r.json", **settings))
    dense = results["models"]["dense"]["fidelity"][item]
    assert dense["kl"] == pytest.approx(0.0, abs=1e-6) and dense["top1_agreement"] == 1.0
    original, tokenizer = load_model(str(tiny_model_dir), dtype="fp32")
    model, _ = load_model(str(tiny_pruned_dir), dtype="fp32")
    return results, results["models"]["pruned"]["fidelity"][item], original, model, tokenizer


def test_fidelity_is_the_exact_kl_to_the_original(tmp_path, tiny_model_dir, tiny_pruned_dir):
    """KL(original || model) and top-1 agreement per window equal a direct full-vocabulary computation; the
    original against itself is 0 and 1; the comparison's 'KL removed' is 0 for the pruned model and 1 for it."""
    from paser.compare import compare_arms
    from paser.evaluate import text_windows

    text = tmp_path / "wiki.txt"
    text.write_text(" ".join(WORDS * 20))
    results, pruned, original, model, tokenizer = _fidelity_of_dense_and_pruned(
        tmp_path, tiny_model_dir, tiny_pruned_dir, str(text), ppl=[str(text)], ppl_seqlen=32, ppl_windows=3,
        batch_size=8)
    windows = text_windows(tokenizer, text.read_text(), 32)[:3]
    with torch.no_grad():
        ids = torch.tensor(windows)
        log_p = original(input_ids=ids).logits[:, :-1].float().log_softmax(-1)
        log_q = model(input_ids=ids).logits[:, :-1].float().log_softmax(-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    agree = (log_p.argmax(-1) == log_q.argmax(-1)).float()
    assert pruned["items"]["kl"] == pytest.approx(kl.sum(1).tolist(), rel=1e-4)
    assert pruned["items"]["agree"] == agree.sum(1).tolist()
    assert pruned["items"]["tokens"] == [31, 31, 31]
    assert pruned["kl"] == pytest.approx(kl.mean().item(), rel=1e-4) and pruned["kl"] > 0
    assert "KL to original wiki.txt" in results["table"]
    arms = {"a": {0: "pruned"}, "b": {0: "dense"}}
    comparison = compare_arms(results, arms, "a", references={"dense": "dense", "pruned": "pruned"}, replicates=50)
    removed = comparison["arms"]
    assert removed["a"]["metrics"]["KL removed wiki.txt"]["mean"] == pytest.approx(0.0)
    assert removed["b"]["metrics"]["KL removed wiki.txt"]["mean"] == pytest.approx(1.0)
    assert comparison["higher_is_better"]["KL to original wiki.txt"] is False


def test_fidelity_on_the_originals_own_answers(tmp_path, tiny_model_dir, tiny_pruned_dir, monkeypatch):
    """Held-out prompts: the original answers them (once, cached); KL and agreement are taken at the answer's
    positions, equal to a direct computation; the original against itself is 0 and 1."""
    from paser.data import PromptFormatter
    from paser.passes import collate
    from paser.targets import TARGETS

    monkeypatch.setenv("PASER_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"instruction": f"Say {w} twice.", "output": w}) + "\n" for w in WORDS[:6]))
    _, pruned, original, model, tokenizer = _fidelity_of_dense_and_pruned(
        tmp_path, tiny_model_dir, tiny_pruned_dir, str(prompts), fidelity_prompts=[str(prompts)],
        fidelity_max_new_tokens=5)
    records = list(iter_dict_records([json.loads(line) for line in prompts.read_text().splitlines()], source="p"))
    settings = type("S", (), dict(teacher=str(tiny_model_dir), target_max_new_tokens=5, cutoff_len=512,
                                  target_do_sample=False, target_temperature=1.0, target_top_p=1.0, template="auto",
                                  seed=0, target_batch_size=16))()
    answered, info = TARGETS.get("original").build(records, settings, tokenizer, "fp32")
    assert info["generated_records"] == 0  # the measurement generated and cached them
    kept = [a for a, r in zip(answered, records) if a is not r]
    assert pruned["records"] == len(kept) > 0
    encoded = PromptFormatter(tokenizer, max_length=512).encode_all(kept)
    ids, mask, predicts, _ = collate(encoded, tokenizer.pad_token_id)
    with torch.no_grad():
        log_p = original(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)[predicts]
        log_q = model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)[predicts]
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    assert pruned["kl"] == pytest.approx(kl.mean().item(), rel=1e-4)
    assert pruned["top1_agreement"] == pytest.approx((log_p.argmax(-1) == log_q.argmax(-1)).float().mean().item())


def test_fidelity_against_the_stored_topk_is_a_lower_bound_exact_at_full_vocabulary(tmp_path, tiny_model_dir,
                                                                                    tiny_pruned_dir, monkeypatch):
    """fidelity_topk: each model measured alone against the original's stored top k. The bucketed KL never
    exceeds the exact KL and equals it when k covers the vocabulary; top-1 agreement is exact at any k."""
    monkeypatch.setenv("PASER_CACHE", str(tmp_path / "cache"))
    text = tmp_path / "wiki.txt"
    text.write_text(" ".join(WORDS * 20))
    settings = dict(ppl=[str(text)], ppl_seqlen=32, ppl_windows=3, batch_size=8)
    _, exact, *_ = _fidelity_of_dense_and_pruned(tmp_path, tiny_model_dir, tiny_pruned_dir, str(text), **settings)
    _, full, *_ = _fidelity_of_dense_and_pruned(tmp_path, tiny_model_dir, tiny_pruned_dir, str(text),
                                                fidelity_topk=10_000, **settings)
    _, top4, *_ = _fidelity_of_dense_and_pruned(tmp_path, tiny_model_dir, tiny_pruned_dir, str(text),
                                                fidelity_topk=4, **settings)
    assert full["items"]["kl"] == pytest.approx(exact["items"]["kl"], rel=1e-4)
    assert full["tail_mass"] == pytest.approx(0.0, abs=1e-6) and top4["tail_mass"] > 0.05
    assert all(b <= e + 1e-5 for b, e in zip(top4["items"]["kl"], exact["items"]["kl"]))
    assert top4["kl"] < exact["kl"]
    assert top4["items"]["agree"] == exact["items"]["agree"] and top4["items"]["tokens"] == exact["items"]["tokens"]
    assert (tmp_path / "cache" / "teacher").is_dir()  # the original's store, computed once per k
