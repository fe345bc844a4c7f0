"""The stored teacher signal: top-k log-probabilities, bucketed KL and JSD, and their error bound."""

import math

import numpy as np
import torch

from paser.data import PromptFormatter, load_records
from paser.passes import jsd_and_nll
from paser.teacher import TopK, bucketed_jsd, bucketed_kl, teacher_topk


def _full_logits(model, e):
    with torch.no_grad():
        logits = model(torch.tensor([e.input_ids])).logits[0]
    return logits[len(e.prompt_ids) - 1:len(e.input_ids) - 1].float()


def test_topk_with_the_whole_vocabulary_is_exact(tmp_path, tiny_model_dir, tiny_pruned_dir):
    from paser.models import load_model

    teacher, tokenizer = load_model(str(tiny_model_dir), dtype="fp32")
    student, _ = load_model(str(tiny_pruned_dir), dtype="fp32")
    encoded = PromptFormatter(tokenizer, max_length=48).encode_all(load_records("demo", limit=6))
    vocab = teacher.config.vocab_size
    store = teacher_topk(teacher, encoded, tokenizer.pad_token_id, k=vocab, batch_size=4)
    store.save(tmp_path / "t.npz")
    store = TopK.load(tmp_path / "t.npz")
    for i, e in enumerate(encoded):
        rows = store.rows(i)
        t_logits, s_logits = _full_logits(teacher, e), _full_logits(student, e)
        lp, ids, tail = (torch.from_numpy(a[rows]) for a in (store.logprobs, store.ids, store.log_tail))
        assert torch.isneginf(tail).all() or (tail < -10).all()  # no mass outside the whole vocabulary
        exact_jsd, _, _ = jsd_and_nll(t_logits, s_logits)
        jsd, bound = bucketed_jsd(lp, ids, tail, s_logits)
        np.testing.assert_allclose(jsd.numpy(), exact_jsd.numpy(), atol=2e-6)
        p, q = t_logits.log_softmax(-1), s_logits.log_softmax(-1)
        exact_kl = (p.exp() * (p - q)).sum(-1)
        np.testing.assert_allclose(bucketed_kl(lp, ids, tail, s_logits).numpy(), exact_kl.numpy(), atol=2e-5)
        assert bound.max().item() < 1e-6


def test_small_k_stays_within_the_bound(tiny_model_dir, tiny_pruned_dir):
    from paser.models import load_model

    teacher, tokenizer = load_model(str(tiny_model_dir), dtype="fp32")
    student, _ = load_model(str(tiny_pruned_dir), dtype="fp32")
    encoded = PromptFormatter(tokenizer, max_length=48).encode_all(load_records("demo", limit=6))
    store = teacher_topk(teacher, encoded, tokenizer.pad_token_id, k=8)
    for i, e in enumerate(encoded):
        rows = store.rows(i)
        t_logits, s_logits = _full_logits(teacher, e), _full_logits(student, e)
        lp, ids, tail = (torch.from_numpy(a[rows]) for a in (store.logprobs, store.ids, store.log_tail))
        exact, _, _ = jsd_and_nll(t_logits, s_logits)
        approx, bound = bucketed_jsd(lp, ids, tail, s_logits)
        gap = (exact - approx).numpy()
        assert (gap >= -1e-6).all() and (gap <= bound.numpy() + 1e-6).all() and (bound <= math.log(2)).all()
        p, q = t_logits.log_softmax(-1), s_logits.log_softmax(-1)
        exact_kl = (p.exp() * (p - q)).sum(-1)
        assert (bucketed_kl(lp, ids, tail, s_logits) <= exact_kl + 1e-5).all()  # coarsening never adds divergence
        np.testing.assert_allclose(np.exp(store.logprobs[rows]).sum(1) + np.exp(store.log_tail[rows]), 1.0,
                                   atol=1e-5)


def test_one_resident_scoring_equals_exact_with_the_whole_vocabulary(tmp_path, tiny_model_dir, tiny_pruned_dir,
                                                                     monkeypatch):
    """--resident one with k = vocabulary size gives the exact JSD and losses; with a small k the JSD stays
    within the proven bound below the exact one."""
    import json

    from paser.demo_data import demo_records
    from paser.selection.select import SelectConfig, run_selection

    monkeypatch.setenv("PASER_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in demo_records()["train"][:40]))
    common = dict(original=str(tiny_model_dir), pruned=str(tiny_pruned_dir), data=str(data), method="paser", budget=10,
                  dtype="fp32", batch_size=8, ccg=False)
    exact = run_selection(SelectConfig(**common)).scores
    whole = run_selection(SelectConfig(**common, resident="one", topk=100_000)).scores
    for column in ("jsd", "loss_original", "loss_pruned"):
        np.testing.assert_allclose(whole[column], exact[column], atol=2e-5)
    small = run_selection(SelectConfig(**common, resident="one", topk=4)).scores
    assert (small["jsd"] <= exact["jsd"] + 1e-5).all() and (small["jsd"] < exact["jsd"] - 1e-4).any()
    np.testing.assert_allclose(small["loss_original"], exact["loss_original"], atol=2e-5)  # stored exactly
    assert len(list((tmp_path / "cache" / "teacher").glob("*.npz"))) == 2  # one store per k, reusable
    # accelerate's big-model loading (here onto the CPU alone) gives the same scores
    mapped = run_selection(SelectConfig(**common, device_map="auto", cache_dir=str(tmp_path / "other"))).scores
    np.testing.assert_allclose(mapped["jsd"], exact["jsd"], atol=1e-6)
