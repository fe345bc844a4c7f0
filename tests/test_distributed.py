"""Several processes, one job: ``torchrun -m paser ...`` on CPU (gloo) gives what one process gives."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from paser.distributed import shard_by_tokens
from tests_helpers import magnitude_prune_copy, ok, write_demo_train, write_fixtures


def test_shards_balance_tokens_and_cover_every_position():
    lengths = [500, 20, 20, 20, 480, 30, 10, 10, 400, 15]
    shards = shard_by_tokens(lengths, 3)
    assert sorted(i for s in shards for i in s) == list(range(len(lengths)))
    loads = [sum(lengths[i] for i in s) for s in shards]
    assert sorted(loads) == [500, 500, 505]  # longest first, each to the lightest shard
    assert shards == shard_by_tokens(lengths, 3)  # deterministic: a restarted rank gets the same share
    assert [len(s) for s in shard_by_tokens(lengths, 1)] == [len(lengths)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(args, tmp_path, processes=1, kill_at=None, cache="cache"):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "300", "PASER_CACHE": str(tmp_path / cache),
           "PASER_CHECKPOINT_SECONDS": "0", "OMP_NUM_THREADS": "1"}
    env.pop("PASER_KILL_AT", None)
    if kill_at:
        env["PASER_KILL_AT"] = kill_at
    launcher = [] if processes == 1 else ["-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                                          "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    return subprocess.run([sys.executable, *launcher, "-m", "paser", *map(str, args)], capture_output=True,
                          text=True, env=env, cwd=tmp_path)


@pytest.fixture()
def data(tmp_path):
    return write_demo_train(tmp_path / "data.jsonl")


def select_args(tiny_model_dir, tiny_pruned_dir, data, out):
    return ["select", "--original", tiny_model_dir, "--pruned", tiny_pruned_dir, "--data", data, "--budget", 30,
            "--out", out, "--method", "paser", "--dtype", "fp32", "--batch-size", 8]


def test_two_process_scoring_equals_one_and_a_killed_rank_resumes(tmp_path, tiny_model_dir, tiny_pruned_dir, data):
    one = ok(run(select_args(tiny_model_dir, tiny_pruned_dir, data, "one"), tmp_path, cache="cache1"))
    assert "resuming" not in one

    args = select_args(tiny_model_dir, tiny_pruned_dir, data, "two")
    killed = run(args, tmp_path, processes=2, kill_at="score.saved:2")  # each rank dies at its second save
    assert killed.returncode != 0
    partials = sorted((tmp_path / "cache" / "scores").glob("*.rank*.partial.parquet"))
    # whichever rank reaches its second save first dies (and torchrun stops the other): its first save is kept
    assert partials and {p.name.split(".")[1] for p in partials} <= {"rank0", "rank1"}
    saved = sum(len(pd.read_parquet(p)) for p in partials)
    assert 0 < saved < 120 and not (tmp_path / "two" / "selected.jsonl").exists()

    log = ok(run(args, tmp_path, processes=2))
    assert f"resuming scoring: {saved} of 120 samples already scored" in log
    assert not list((tmp_path / "cache" / "scores").glob("*.partial.parquet"))  # merged, then removed
    single, double = (pd.read_parquet(tmp_path / d / "scores.parquet") for d in ("one", "two"))
    np.testing.assert_allclose(double["jsd"], single["jsd"], rtol=0, atol=1e-6)
    np.testing.assert_allclose(double["loss_pruned"], single["loss_pruned"], rtol=0, atol=1e-6)
    picked = [[json.loads(line)["paser"]["index"] for line in (tmp_path / d / "selected.jsonl").open()]
              for d in ("one", "two")]
    assert picked[0] == picked[1]  # (values agree to ~1e-8: the resumed run batches the rest differently)
    assert log.count("PASER: K =") == 1  # rank 0 alone prints the table



def test_two_process_recovery_follows_the_one_process_loss_curve(tmp_path, tiny_model_dir, data):
    from paser.models import load_model

    # half of every linear layer zero: masked LoRA under DDP and FSDP
    sparse = magnitude_prune_copy(*load_model(tiny_model_dir, dtype="fp32"), tmp_path / "sparse")

    def args(out):  # effective batch 8 either way: 1 process x 2 micro-batches of 4, or 2 processes x 1
        return ["recover", sparse, "--data", data, "--out", out, "--epochs", 1, "--batch-size", 8,
                "--micro-batch-size", 4, "--cutoff-len", 64, "--dtype", "fp32", "--lr", 5e-3, "--limit", 64,
                "--no-group-by-length", "--save-steps", 4, "--lora-dropout", 0]

    ok(run(args("one"), tmp_path))
    log = ok(run(args("two"), tmp_path, processes=2))
    assert log.count("steps in") == 1  # rank 0 alone reports
    one, two = (json.loads((tmp_path / d / "train_log.json").read_text()) for d in ("one", "two"))
    assert one["processes"] == 1 and two["processes"] == 2 and one["steps"] == two["steps"] == 8
    # the same records make each step's batch; only summation order and padding differ
    np.testing.assert_allclose([p["loss"] for p in two["loss_curve"]], [p["loss"] for p in one["loss_curve"]],
                               rtol=2e-3)
    assert (tmp_path / "two" / "merged" / "config.json").exists() and two["merge_max_logit_diff"] < 1e-4
    assert two["sparse_lora"] == "masked" and two["zeros_after_merge"] >= two["zeros_kept"] > 0
    assert (tmp_path / "two" / "checkpoints" / "checkpoint-8").exists()

    # a killed DDP run resumes from rank 0's last checkpoint and ends where the uninterrupted one did
    killed = run(args("resumed"), tmp_path, processes=2, kill_at="recover.saved:1")
    assert killed.returncode != 0 and (tmp_path / "resumed" / "checkpoints" / "checkpoint-4").exists()
    ok(run(args("resumed"), tmp_path, processes=2))
    resumed = json.loads((tmp_path / "resumed" / "train_log.json").read_text())
    assert resumed["resumed_from"].endswith("checkpoint-4") and resumed["steps"] == 8
    np.testing.assert_allclose([p["loss"] for p in resumed["loss_curve"]], [p["loss"] for p in two["loss_curve"]],
                               rtol=1e-5)

    # FSDP2 (gloo on CPU): the same curve again, and rank 0 rebuilds the whole trained model to merge it
    ok(run([*args("fsdp"), "--fsdp"], tmp_path, processes=2))
    sharded = json.loads((tmp_path / "fsdp" / "train_log.json").read_text())
    np.testing.assert_allclose([p["loss"] for p in sharded["loss_curve"]], [p["loss"] for p in one["loss_curve"]],
                               rtol=2e-3)
    assert sharded["merge_max_logit_diff"] < 1e-4 and sharded["zeros_after_merge"] >= sharded["zeros_kept"]
    from safetensors.torch import load_file

    a, b = (load_file(tmp_path / d / "merged" / "model.safetensors") for d in ("two", "fsdp"))
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) < 1e-3

    bad = run(["recover", sparse, "--data", data, "--out", "three", "--batch-size", 4, "--micro-batch-size", 4],
              tmp_path, processes=2)
    assert bad.returncode != 0 and "multiple of micro_batch_size (4) x 2 processes" in bad.stdout + bad.stderr


def test_two_process_evaluation_equals_one(tmp_path, tiny_model_dir, data):
    tasks = write_fixtures(tmp_path / "tasks", rows=9)  # odd counts: ranks get unequal shares
    text = tmp_path / "text.txt"
    text.write_text(" ".join(json.loads(line)["output"] for line in data.read_text().splitlines()))

    def args(out):
        return ["evaluate", tiny_model_dir, "--tasks", "arc_easy,piqa", "--task-dir", tasks, "--ppl", text,
                "--ppl-seqlen", 32, "--response-ppl", data, "--response-ppl-limit", 25, "--demo-skills",
                "--demo-questions", 11, "--dtype", "fp32", "--out", out]

    ok(run(args("one.json"), tmp_path))
    log = ok(run(args("two.json"), tmp_path, processes=2))
    assert log.count("results -> two.json") == 1  # rank 0 alone writes and prints
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one["processes"] == 1 and two["processes"] == 2  # (with 2, lm-eval's requests are split, then gathered)
    (a,), (b,) = one["models"].values(), two["models"].values()
    for task in ("arc_easy", "piqa"):
        assert b["tasks"][task]["n"] == a["tasks"][task]["n"] == 9
        assert b["tasks"][task]["items"] == a["tasks"][task]["items"]  # every question, in document order
        assert b["tasks"][task]["acc"] == a["tasks"][task]["acc"]
    for kind in ("perplexity", "response_perplexity"):
        (x,), (y,) = a[kind].values(), b[kind].values()
        assert y["items"]["tokens"] == x["items"]["tokens"]
        np.testing.assert_allclose(y["items"]["nll"], x["items"]["nll"], rtol=1e-5)
        assert y["ppl"] == pytest.approx(x["ppl"], rel=1e-6)
    assert b["demo_skills"] == a["demo_skills"]


def test_paser_run_under_a_launcher_matches_one_process(tmp_path, tiny_model_dir):
    """The whole pipeline with 2 processes: rank 0 prunes and writes, both score, train (DDP) and evaluate."""
    import yaml

    tasks = write_fixtures(tmp_path / "tasks", rows=5)
    config = {
        "model": str(tiny_model_dir), "dtype": "fp32",
        "prune": {"method": "magnitude", "sparsity": 0.5, "calib_samples": 4, "heldout_samples": 2, "seq_len": 48},
        "data": {"source": "demo", "limit": 60},
        "select": {"methods": ["paser", "random"], "budget": 0.2, "max_length": 64, "clusters": 3},
        "recover": {"method": "end-to-end",  # auto would pick blockwise+kd in one process and end-to-end in two
                    "epochs": 1, "batch_size": 4, "micro_batch_size": 2, "cutoff_len": 64, "lr": 0.001,
                    "lora_dropout": 0.0, "group_by_length": False},
        "evaluate": {"tasks": ["arc_easy"], "task_dir": str(tasks), "limit": 5, "response_ppl": ["demo-heldout"],
                     "response_ppl_limit": 20, "batch_size": 8}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    ok(run(["run", "run.yaml", "--out", "one"], tmp_path, cache="cache1"))
    log = ok(run(["run", "run.yaml", "--out", "two"], tmp_path, processes=2, cache="cache2"))
    assert log.count("report: two/report.html") == 1
    for arm in ("paser", "random"):
        picked = [(tmp_path / d / "select" / arm / "s0" / "selected.jsonl").read_text() for d in ("one", "two")]
        assert [json.loads(x)["paser"]["index"] for x in picked[0].splitlines()] == \
            [json.loads(x)["paser"]["index"] for x in picked[1].splitlines()]
        curves = [[p["loss"] for p in json.loads((tmp_path / d / "recover" / arm / "s0" / "train_log.json").read_text())
                   ["loss_curve"]] for d in ("one", "two")]
        np.testing.assert_allclose(curves[1], curves[0], rtol=2e-3)
    results = [json.loads((tmp_path / d / "evaluate" / "results.json").read_text()) for d in ("one", "two")]
    assert results[1]["processes"] == 2
    for label, entry in results[0]["models"].items():
        other = results[1]["models"][label]
        assert other["tasks"]["arc_easy"]["n"] == entry["tasks"]["arc_easy"]["n"] == 5
        (x,), (y,) = entry["response_perplexity"].values(), other["response_perplexity"].values()
        assert y["ppl"] == pytest.approx(x["ppl"], rel=2e-3), label
    record = json.loads((tmp_path / "two" / "run.json").read_text())
    assert [s["stage"] for s in record["stages"]][:2] == ["prune", "select/paser/s0"]


@pytest.mark.slow
def test_two_process_scoring_on_the_embedded_model_over_pool_records(tmp_path):
    from conftest import shared_path

    pool = shared_path("instruct", "pool.jsonl")
    from paser.models import DEFAULT_MODEL, load_model

    magnitude_prune_copy(*load_model(DEFAULT_MODEL, dtype="fp32"), tmp_path / "pruned")
    with open(pool, encoding="utf-8") as src:
        (tmp_path / "data.jsonl").write_text("".join(line for _, line in zip(range(64), src)))
    args = ["select", "--original", DEFAULT_MODEL, "--pruned", tmp_path / "pruned", "--data", "data.jsonl",
            "--budget", 16, "--method", "paser", "--dtype", "fp32", "--max-length", 128, "--no-ccg"]
    # one thread in each process either way: the kernels then sum in the same order (fp32 to the last bit)
    ok(run(["--threads", "1", *args, "--out", "one"], tmp_path, cache="cache1"))
    ok(run([*args, "--out", "two"], tmp_path, processes=2, cache="cache2"))
    single, double = (pd.read_parquet(tmp_path / d / "scores.parquet") for d in ("one", "two"))
    assert len(single) == 64
    for column in ("jsd", "loss_original", "loss_pruned"):
        np.testing.assert_allclose(double[column], single[column], rtol=0, atol=1e-6)


def test_two_process_blockwise_shares_the_batches_and_auto_keeps_it(tmp_path, tiny_model_dir, data):
    """Block-wise under torchrun: each process trains the block on its part of every batch, gradients summed: the
    same steps, errors and weights as one process (to rounding), and auto keeps block-wise + KD under the launcher."""
    from paser.models import load_model

    sparse = magnitude_prune_copy(*load_model(tiny_model_dir, dtype="fp32"), tmp_path / "sparse")

    def args(out):
        return ["recover", sparse, "--data", data, "--out", out, "--teacher", tiny_model_dir, "--dtype", "fp32",
                "--block-epochs", 4, "--block-batch-tokens", 256, "--limit", 64, "--cutoff-len", 64, "--epochs", 1,
                "--batch-size", 8, "--micro-batch-size", 4, "--no-group-by-length", "--lora-dropout", 0]

    ok(run(args("one"), tmp_path))
    ok(run(args("two"), tmp_path, processes=2))
    one, two = (json.loads((tmp_path / d / "train_log.json").read_text()) for d in ("one", "two"))
    assert one["method"] == two["method"] == "blockwise+kd"  # auto, under the launcher too
    a, b = one["blockwise"], two["blockwise"]
    assert a["processes"] == 1 and b["processes"] == 2 and a["trained_tokens"] == b["trained_tokens"]
    assert b["steps"] == a["steps"]
    for x, y in zip(a["blocks"], b["blocks"]):
        assert y["loss_after"] < y["loss_before"] and y["zeros_after"] == y["zeros_before"] > 0
        assert y["loss_before"] == pytest.approx(x["loss_before"], rel=1e-4)
        assert y["loss_after"] == pytest.approx(x["loss_after"], rel=1e-3)
    from safetensors.torch import load_file

    w1, w2 = (load_file(tmp_path / d / "stage-blockwise" / "merged" / "model.safetensors") for d in ("one", "two"))
    assert max((w1[k] - w2[k]).abs().max().item() for k in w1) < 1e-4
    assert not (tmp_path / "two" / "stage-blockwise" / "blockwise" / "streams").exists()
