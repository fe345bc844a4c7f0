import math

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.spatial.distance import jensenshannon
from scipy.special import softmax

from paser.data import PromptFormatter, load_records
from paser.errors import ConfigError
from paser.passes import collate, jsd_and_nll, length_buckets
from paser.selection.score import SCORERS, ScoreConfig, get_scorer, score_batch, score_records


def test_jsd_matches_scipy_on_random_distributions():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(64, 1000, generator=gen) * 3
    b = torch.randn(64, 1000, generator=gen) * 3
    targets = torch.randint(0, 1000, (64,), generator=gen)
    jsd, nll_a, nll_b = jsd_and_nll(a, b, targets)
    pa, pb = softmax(a.double().numpy(), axis=1), softmax(b.double().numpy(), axis=1)
    expected = jensenshannon(pa, pb, axis=1) ** 2  # scipy returns the distance (square root), base e
    np.testing.assert_allclose(jsd.numpy(), expected, atol=1e-6)
    np.testing.assert_allclose(nll_a.numpy(), -np.log(pa[np.arange(64), targets.numpy()]), rtol=1e-5)
    np.testing.assert_allclose(nll_b.numpy(), -np.log(pb[np.arange(64), targets.numpy()]), rtol=1e-5)


def test_jsd_is_finite_and_bounded_at_extremes():
    a = torch.tensor([[1e4, -1e4, 0.0], [0.0, 0.0, 0.0], [-1e30, 1e30, 5.0]])
    b = torch.tensor([[-1e4, 1e4, 0.0], [0.0, 0.0, 0.0], [1e30, -1e30, 5.0]])
    jsd, _, _ = jsd_and_nll(a, b)
    assert torch.isfinite(jsd).all()
    assert ((jsd >= 0) & (jsd <= math.log(2))).all()
    assert jsd[0].item() == pytest.approx(math.log(2), abs=1e-6)  # disjoint supports
    assert jsd[1].item() == 0.0


def test_identical_models_give_zero(tiny_model_dir, tiny_tokenizer):
    from paser.models import load_model

    model, _ = load_model(str(tiny_model_dir), dtype="fp32")
    records = load_records("demo", limit=12)
    encoded = PromptFormatter(tiny_tokenizer).encode_all(records)
    jsd, loss_a, loss_b = score_batch(model, model, encoded, tiny_tokenizer.pad_token_id)
    assert np.abs(jsd).max() < 1e-6
    np.testing.assert_allclose(loss_a, loss_b)


def test_padding_invariance(tiny_model_dir, tiny_pruned_dir, tiny_tokenizer):
    from paser.models import load_model

    original, _ = load_model(str(tiny_model_dir), dtype="fp32")
    pruned, _ = load_model(str(tiny_pruned_dir), dtype="fp32")
    records = load_records("demo", limit=24)
    encoded = PromptFormatter(tiny_tokenizer).encode_all(records)
    lengths = {len(e.input_ids) for e in encoded}
    assert len(lengths) > 3  # the batch really pads
    batched, _, _ = score_batch(original, pruned, encoded, tiny_tokenizer.pad_token_id, chunk_rows=7)
    for i in (0, 5, 17):
        alone, _, _ = score_batch(original, pruned, [encoded[i]], tiny_tokenizer.pad_token_id)
        assert abs(alone[0] - batched[i]) < 1e-4
    reordered, _, _ = score_batch(original, pruned, encoded[::-1], tiny_tokenizer.pad_token_id)
    np.testing.assert_allclose(reordered[::-1], batched, atol=1e-4)


def test_jsd_averages_response_positions_only(tiny_model_dir, tiny_pruned_dir, tiny_tokenizer):
    """The per-sample JSD equals a direct full-logit computation over the response positions."""
    from paser.models import load_model

    original, _ = load_model(str(tiny_model_dir), dtype="fp32")
    pruned, _ = load_model(str(tiny_pruned_dir), dtype="fp32")
    encoded = PromptFormatter(tiny_tokenizer).encode_all(load_records("demo", limit=3))
    batched, loss_o, _ = score_batch(original, pruned, encoded, tiny_tokenizer.pad_token_id)
    for i, e in enumerate(encoded):
        ids = torch.tensor([e.input_ids])
        with torch.no_grad():
            la, lb = original(ids).logits[0].double(), pruned(ids).logits[0].double()
        p0, n = len(e.prompt_ids), len(e.input_ids)
        pa, pb = softmax(la[p0 - 1:n - 1].numpy(), axis=1), softmax(lb[p0 - 1:n - 1].numpy(), axis=1)
        assert batched[i] == pytest.approx(float(np.mean(jensenshannon(pa, pb, axis=1) ** 2)), abs=1e-5)
        targets = np.array(e.response_ids)
        assert loss_o[i] == pytest.approx(float(-np.log(pa[np.arange(len(targets)), targets]).mean()), abs=1e-4)


def test_collate_marks_positions_that_predict_response_tokens(tiny_tokenizer):
    from paser.data import Encoded

    encoded = [Encoded([5, 6, 7], [8, 9]), Encoded([5, 6], [10])]
    ids, attention, mask, targets = collate(encoded, pad_id=0)
    assert ids.tolist() == [[5, 6, 7, 8, 9], [5, 6, 10, 0, 0]]
    assert attention.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert mask.tolist() == [[False, False, True, True, False], [False, True, False, False, False]]
    assert targets.tolist() == [8, 9, 10]


def test_length_buckets_cover_everything_within_limits():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 300, size=200).tolist()
    batches = length_buckets(lengths, batch_size=8, max_batch_tokens=1000)
    assert sorted(i for b in batches for i in b) == list(range(200))
    for batch in batches:
        assert len(batch) <= 8
        assert max(lengths[i] for i in batch) * len(batch) <= max(1000, max(lengths[i] for i in batch))


def test_resume_from_partial_file(tmp_path, tiny_model_dir, tiny_pruned_dir, tiny_tokenizer, monkeypatch):
    from paser.models import load_model
    from paser.selection import score as score_module

    original, _ = load_model(str(tiny_model_dir), dtype="fp32")
    pruned, _ = load_model(str(tiny_pruned_dir), dtype="fp32")
    encoded = PromptFormatter(tiny_tokenizer).encode_all(load_records("demo", limit=40))
    cache_file = tmp_path / "scores.parquet"
    full = score_records(original, pruned, encoded, tiny_tokenizer.pad_token_id, ScoreConfig(batch_size=8),
                         progress=False)
    # Simulate an interrupted run that saved the first 25 samples.
    full.iloc[:25].to_parquet(cache_file.with_suffix(".partial.parquet"))
    seen = []
    real = score_module.score_batch
    monkeypatch.setattr(score_module, "score_batch",
                        lambda o, p, batch, *a: seen.extend(batch) or real(o, p, batch, *a))
    resumed = score_records(original, pruned, encoded, tiny_tokenizer.pad_token_id, ScoreConfig(batch_size=8),
                            cache_file=cache_file, progress=False)
    assert len(seen) == 15
    pd.testing.assert_frame_equal(resumed, full, atol=1e-6)
    assert cache_file.exists() and not cache_file.with_suffix(".partial.parquet").exists()


def test_scorers_are_interchangeable():
    table = pd.DataFrame({"jsd": [0.1, 0.3], "loss_original": [1.0, 2.0], "loss_pruned": [1.5, 1.0]})
    assert get_scorer("jsd")(table).tolist() == [0.1, 0.3]
    assert get_scorer("loss_gap")(table).tolist() == [0.5, 0.0]
    assert get_scorer("pruned_loss")(table).tolist() == [1.5, 1.0]
    assert set(SCORERS) == {"jsd", "loss_gap", "pruned_loss"}
    with pytest.raises(ConfigError, match="unknown scorer"):
        get_scorer("nope")
