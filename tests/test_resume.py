"""Kill-and-resume for every long stage, concurrent runs sharing a cache, atomic writes under SIGKILL.

Each test kills a real subprocess with SIGKILL at a named point (``PASER_KILL_AT``, see
:mod:`paser.faults`), reruns the very same command, and compares the result with an uninterrupted run.
"""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from tests_helpers import ok, write_demo_train, write_fixtures

KILLED = -signal.SIGKILL


def run(args, tmp_path, kill_at=None, cache="cache", **extra_env):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "300", "PASER_CACHE": str(tmp_path / cache),
           "PASER_CHECKPOINT_SECONDS": "0", **extra_env}
    env.pop("PASER_KILL_AT", None)
    if kill_at:
        env["PASER_KILL_AT"] = kill_at
    return subprocess.run([sys.executable, "-m", "paser.cli", *map(str, args)], capture_output=True, text=True,
                          env=env, cwd=tmp_path)


@pytest.fixture()
def data(tmp_path):
    return write_demo_train(tmp_path / "data.jsonl")


def assert_cache_files_whole(cache: Path):
    """Every artifact under its final name loads; only hidden temp files may be left by a kill."""
    for path in cache.rglob("*"):
        if path.is_dir() or path.name.startswith(".") or path.suffix == ".lock":
            continue
        if path.suffix == ".parquet":
            pd.read_parquet(path)
        elif path.suffix == ".npy":
            np.load(path)
        elif path.suffix == ".npz":
            dict(np.load(path))
        elif path.suffix == ".json":
            json.loads(path.read_text())


def select_args(tiny_model_dir, tiny_pruned_dir, data, out):
    return ["select", "--original", tiny_model_dir, "--pruned", tiny_pruned_dir, "--data", data, "--budget", 30,
            "--out", out, "--method", "paser", "--dtype", "fp32", "--batch-size", 8]


def test_scoring_resumes_after_sigkill(tmp_path, tiny_model_dir, tiny_pruned_dir, data):
    args = select_args(tiny_model_dir, tiny_pruned_dir, data, "sel")
    killed = run(args, tmp_path, kill_at="score.saved:3")
    assert killed.returncode == KILLED, killed.stderr[-2000:]
    partial = list((tmp_path / "cache" / "scores").glob("*.partial.parquet"))
    assert len(partial) == 1 and len(pd.read_parquet(partial[0])) == 24  # 3 batches of 8 were saved
    assert_cache_files_whole(tmp_path / "cache")
    log = ok(run(args, tmp_path))
    assert "resuming scoring: 24 of 120 samples already scored" in log
    clean = ok(run(select_args(tiny_model_dir, tiny_pruned_dir, data, "sel_clean"), tmp_path, cache="cache2"))
    assert "resuming" not in clean
    resumed, fresh = (pd.read_parquet(tmp_path / d / "scores.parquet") for d in ("sel", "sel_clean"))
    np.testing.assert_allclose(resumed["jsd"], fresh["jsd"], atol=1e-6)
    assert (tmp_path / "sel" / "selected.jsonl").read_text() == (tmp_path / "sel_clean" / "selected.jsonl").read_text()


def test_kill_during_an_atomic_write_leaves_no_half_file(tmp_path, tiny_model_dir, tiny_pruned_dir, data):
    args = select_args(tiny_model_dir, tiny_pruned_dir, data, "sel")
    # The second atomic write is the second partial score file: killed after writing, before its rename.
    killed = run(args, tmp_path, kill_at="atomic.before_rename:2")
    assert killed.returncode == KILLED
    scores = tmp_path / "cache" / "scores"
    assert [len(pd.read_parquet(p)) for p in scores.glob("*.partial.parquet")] == [8]  # the first, whole
    assert list(scores.glob(".*"))  # the unfinished write exists only under its hidden temporary name
    assert_cache_files_whole(tmp_path / "cache")
    assert "resuming scoring: 8 of 120" in ok(run(args, tmp_path))


def test_embedding_resumes_after_sigkill(tmp_path):
    script = """
import sys, paser.selection.embed as e
from paser.data import load_records
e.EMBED_CHUNK = 40
vectors, hit = e.embed_records(load_records("demo", limit=200), cache_dir=__import__("pathlib").Path(sys.argv[1]),
                               progress=False)
__import__("numpy").save(sys.argv[2], vectors)
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PASER_KILL_AT": "embed.saved:2"}
    cmd = [sys.executable, "-c", script, str(tmp_path / "emb"), str(tmp_path / "a.npy")]
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == KILLED
    parts = list((tmp_path / "emb").glob("*.parts/*.npy"))
    assert len(parts) == 2
    env.pop("PASER_KILL_AT")
    again = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert not any(p.exists() for p in parts)  # merged into the cache entry, then removed
    fresh = subprocess.run([sys.executable, "-c", script, str(tmp_path / "emb2"), str(tmp_path / "b.npy")], env=env,
                           capture_output=True, text=True)
    assert fresh.returncode == 0
    np.testing.assert_allclose(np.load(tmp_path / "a.npy"), np.load(tmp_path / "b.npy"), atol=1e-6)


def test_recovery_resumes_from_its_checkpoint_after_sigkill(tmp_path, tiny_model_dir, data):
    def args(out):
        return ["recover", tiny_model_dir, "--data", data, "--out", out, "--epochs", 1, "--batch-size", 8,
                "--micro-batch-size", 4, "--save-steps", 5, "--cutoff-len", 64, "--dtype", "fp32", "--lr", 5e-3,
                "--limit", 80]

    killed = run(args("rec"), tmp_path, kill_at="recover.saved:1")
    assert killed.returncode == KILLED
    assert (tmp_path / "rec" / "checkpoints" / "checkpoint-5").exists()
    ok(run(args("rec"), tmp_path))
    ok(run(args("rec_clean"), tmp_path))
    resumed, fresh = (json.loads((tmp_path / d / "train_log.json").read_text()) for d in ("rec", "rec_clean"))
    assert resumed["resumed_from"].endswith("checkpoint-5") and fresh["resumed_from"] is None
    assert resumed["steps"] == fresh["steps"] == 10
    np.testing.assert_allclose([p["loss"] for p in resumed["loss_curve"]], [p["loss"] for p in fresh["loss_curve"]],
                               rtol=1e-5)
    from safetensors.torch import load_file

    a = load_file(tmp_path / "rec" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "rec_clean" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), atol=1e-5)
    # other settings: stale checkpoints are not resumed
    other = ok(run([*args("rec"), "--lora-r", 4], tmp_path))
    assert "starting afresh" in other


def test_evaluation_resumes_per_model_and_task(tmp_path, tiny_model_dir, tiny_pruned_dir):
    tasks = write_fixtures(tmp_path / "tasks", rows=6)
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on a mat while two dogs ran over green hills " * 40)

    def args(out):
        return ["evaluate", tiny_model_dir, tiny_pruned_dir, "--tasks", "arc_easy,piqa", "--task-dir", tasks,
                "--ppl", text, "--ppl-seqlen", 32, "--dtype", "fp32", "--out", out]

    killed = run(args("ev/results.json"), tmp_path, kill_at="evaluate.saved:4")  # model 1 done, model 2 one task
    assert killed.returncode == KILLED
    assert not (tmp_path / "ev" / "results.json").exists()
    log = ok(run(args("ev/results.json"), tmp_path))
    assert "3 of 3 measurements already finished" in log and "1 of 3 measurements already finished" in log
    ok(run(args("clean/results.json"), tmp_path))
    resumed, fresh = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("ev", "clean"))
    for label in resumed["models"]:
        for kind in ("tasks", "perplexity"):
            for name, value in fresh["models"][label][kind].items():
                got = resumed["models"][label][kind][name]
                for metric in ("acc", "acc_norm", "ppl"):
                    if metric in value:
                        assert got[metric] == value[metric], (label, name, metric)


def test_paser_run_resumes_after_sigkill(tmp_path, tiny_model_dir, tiny_pruned_dir, data):
    config = {"model": str(tiny_model_dir), "pruned": str(tiny_pruned_dir), "dtype": "fp32", "threads": 1,
              "data": {"source": str(data)},
              "select": {"methods": ["paser", "random"], "budget": 16, "max_length": 64, "clusters": 3},
              "recover": {"epochs": 1, "batch_size": 8, "micro_batch_size": 4, "cutoff_len": 64, "save_steps": 1},
              "evaluate": {"tasks": [], "response_ppl": [str(data)], "response_ppl_limit": 10}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    killed = run(["run", "run.yaml", "--out", "r"], tmp_path, kill_at="run.stage_done:2")  # select + recover of paser
    assert killed.returncode == KILLED
    ok(run(["run", "run.yaml", "--out", "r"], tmp_path))
    record = json.loads((tmp_path / "r" / "run.json").read_text())
    skipped = {s["stage"]: s["skipped"] for s in record["stages"]}
    assert skipped == {"select/paser/s0": True, "recover/paser/s0": True, "select/random/s0": False,
                       "recover/random/s0": False, "evaluate": False}
    ok(run(["run", "run.yaml", "--out", "clean"], tmp_path, cache="cache2"))
    resumed, fresh = (json.loads((tmp_path / d / "evaluate" / "results.json").read_text()) for d in ("r", "clean"))
    for (label, a), b in zip(resumed["models"].items(), fresh["models"].values()):
        assert a["response_perplexity"][str(data)]["ppl"] == pytest.approx(
            b["response_perplexity"][str(data)]["ppl"], rel=1e-5), label


def test_two_concurrent_selects_score_once(tmp_path, tiny_model_dir, tiny_pruned_dir, data):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "300", "PASER_CACHE": str(tmp_path / "cache")}
    env.pop("PASER_KILL_AT", None)
    procs = [subprocess.Popen([sys.executable, "-m", "paser.cli", "--threads", "1",
                               *map(str, select_args(tiny_model_dir, tiny_pruned_dir, data, f"sel{i}"))],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
             for i in (1, 2)]
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    computed = sum("scores: computed for 120 records" in log for log in logs)
    reused = sum("scores: 120 records from the cache" in log for log in logs)
    assert (computed, reused) == (1, 1), logs
    assert (tmp_path / "sel1" / "selected.jsonl").read_text() == (tmp_path / "sel2" / "selected.jsonl").read_text()
    assert_cache_files_whole(tmp_path / "cache")


def test_atomic_dir_replaces_a_linked_folder_at_its_target(tmp_path):
    from paser.cache import atomic_dir

    target = tmp_path / "shared" / "prune"
    target.mkdir(parents=True)
    (target / "old.txt").write_text("old")
    link = tmp_path / "run" / "prune"
    link.parent.mkdir()
    link.symlink_to(target)
    with atomic_dir(link) as tmp:
        (tmp / "new.txt").write_text("new")
    assert link.is_symlink() and sorted(p.name for p in link.iterdir()) == ["new.txt"]
    assert (target / "new.txt").read_text() == "new"
