"""The original's own tokens: about N per real token, sampled from the original, cached per prefix (a rerun loads
no model), trained on beside the records by either method, and refused without the original."""

import json
from dataclasses import replace

import pytest

from paser.data import Encoded
from paser.errors import ConfigError
from paser.recovery import RecoverConfig, resolve_recovery, run_recovery
from paser.recovery.generated import MIN_NEW_TOKENS, prefixes
from test_recover import small_config


def test_prefixes_alternate_prompts_and_cut_texts_and_leave_room():
    encoded = [Encoded(list(range(10 * i, 10 * i + 6)), list(range(500, 520))) for i in range(4)]
    planned = prefixes(encoded, budget=400, cutoff=40, seed=0)
    assert planned == prefixes(encoded, budget=400, cutoff=40, seed=0)  # seeded
    assert sum(40 - len(p) for p in planned) >= 400 > sum(40 - len(p) for p in planned[:-1])
    prompts = {tuple(e.prompt_ids) for e in encoded}
    assert tuple(planned[0]) in prompts and tuple(planned[1]) not in prompts  # a prompt, then a text cut inside
    assert all(len(p) <= 40 - MIN_NEW_TOKENS for p in planned)
    later = prefixes(encoded, budget=100, cutoff=40, seed=0, start=len(planned))
    assert later[0] == prefixes(encoded, budget=10_000, cutoff=40, seed=0)[len(planned)]  # one sequence, continued


def test_generated_tokens_train_beside_the_records_and_come_from_the_cache_on_a_rerun(
        tmp_path, sparse_tiny, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("PASER_CACHE", str(tmp_path / "cache"))
    config = small_config(tmp_path, sparse_tiny, method="blockwise", teacher=str(tiny_model_dir), block_epochs=1,
                          block_batch_tokens=256, generated_tokens=0.25, generated_batch_size=8)
    log = run_recovery(config)
    info = log["targets"]["generated"]
    assert 0.8 * info["budget"] <= info["generated_tokens"] <= info["budget"] == round(0.25 * info["real_tokens"])
    plain = run_recovery(replace(config, generated_tokens=0.0, generated_batch_size=16, out=tmp_path / "plain"))
    assert log["trained_tokens"] > plain["trained_tokens"]
    import paser.recovery.generated as generated

    monkeypatch.setattr(generated, "load_model", lambda *a, **k: pytest.fail("the cache should answer"))
    again = run_recovery(replace(config, out=tmp_path / "again"))
    assert again["targets"]["generated"]["generated_tokens"] == info["generated_tokens"]
    with open(info["cache"], encoding="utf-8") as cache:
        rows = [json.loads(line) for line in cache]
    assert len(rows) >= info["samples"]


def test_generated_tokens_need_the_original_and_their_options_need_them(tmp_path, sparse_tiny):
    with pytest.raises(ConfigError, match="generated_tokens needs the original model"):
        resolve_recovery(small_config(tmp_path, sparse_tiny, method="end-to-end", loss="nll", generated_tokens=1.0))
    config = RecoverConfig(model=str(sparse_tiny), data="d.jsonl", out=tmp_path / "o", method="end-to-end",
                           loss="nll", generated_top_p=0.5)
    with pytest.raises(ConfigError, match="--generated-top-p"):
        run_recovery(config)
