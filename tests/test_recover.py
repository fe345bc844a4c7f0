import json

import pytest
import torch
from transformers import TrainerCallback

from paser.data import PromptFormatter, Record
from paser.errors import ConfigError
from paser.recovery import DEFAULT_LR, RecoverConfig, fields_read, resolve_recovery, run_recovery
from paser.recovery.data import IGNORE_INDEX, collate_for_training, labels_for


def test_loss_positions_are_exactly_the_response_tokens(tiny_tokenizer):
    formatter = PromptFormatter(tiny_tokenizer)
    encoded = [formatter.encode(Record("Reverse the word.", "planet", "tenalp", {})),
               formatter.encode(Record("Say hi.", "", "hi", {}))]
    batch = collate_for_training([{"input_ids": e.input_ids, "labels": labels_for(e)} for e in encoded],
                                 tiny_tokenizer.pad_token_id)
    for row, e in enumerate(encoded):
        carries_loss = (batch["labels"][row] != IGNORE_INDEX).nonzero().flatten().tolist()
        start = len(e.prompt_ids)
        assert carries_loss == list(range(start, start + len(e.response_ids)))
        assert batch["labels"][row, carries_loss].tolist() == e.response_ids
        assert batch["attention_mask"][row].sum() == len(e.input_ids)
    # the loss the model computes ignores prompt and padding: equals the mean NLL over response tokens
    from tiny import make_tiny_llama

    model = make_tiny_llama(tiny_tokenizer)
    with torch.no_grad():
        out = model(**batch)
        logp = out.logits.log_softmax(-1)
    nll = [-logp[r, t - 1, batch["labels"][r, t]] for r in range(2) for t in range(batch["labels"].shape[1])
           if batch["labels"][r, t] != IGNORE_INDEX]
    assert out.loss.item() == pytest.approx(torch.stack(nll).mean().item(), rel=1e-5)


def small_config(tmp_path, model, **overrides):
    data = tmp_path / "train.jsonl"
    if not data.exists():
        from paser.demo_data import demo_records

        data.write_text("".join(json.dumps(r) + "\n" for r in demo_records()["train"][:48]))
    base = dict(model=str(model), data=str(data), out=tmp_path / "rec", epochs=3, lr=5e-3, batch_size=8,
                micro_batch_size=4, dtype="fp32", save_steps=2, cutoff_len=64)
    # the base settings a method (as given, or as auto may choose) reads; every override stays, read or not
    read = fields_read(RecoverConfig(**(base | overrides)))
    return RecoverConfig(**({k: v for k, v in base.items() if k in read} | overrides))


def test_recovery_trains_merges_and_keeps_zeros(tmp_path, sparse_tiny):
    from paser.models import load_model

    before, _ = load_model(str(sparse_tiny))
    zeros_before = {n: (m.weight == 0) for n, m in before.named_modules() if isinstance(m, torch.nn.Linear)
                    and ".layers." in f".{n}"}
    log = run_recovery(small_config(tmp_path, sparse_tiny))
    assert log["steps"] == 18  # 48 records / 8 per step x 3 epochs
    losses = [p["loss"] for p in log["loss_curve"]]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # training loss falls
    merged, _ = load_model(str(tmp_path / "rec" / "merged"))
    modules = dict(merged.named_modules())
    changed = 0
    for name, zeros in zeros_before.items():
        after = modules[name].weight
        assert torch.equal(after == 0, zeros), name  # exactly the pruned zeros, no more, no fewer
        changed += int(not torch.equal(after, dict(before.named_modules())[name].weight))
    assert changed > 0  # the merge did change the kept weights
    assert (tmp_path / "rec" / "adapter" / "adapter_config.json").exists()
    saved = json.loads((tmp_path / "rec" / "train_log.json").read_text())
    assert {"loss_curve", "tokens_per_s", "seconds", "peak_memory_gb"} <= set(saved)


class _Interrupt(TrainerCallback):
    def __init__(self, at_step):
        self.at_step = at_step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.at_step:
            raise KeyboardInterrupt


def test_resume_ends_at_the_same_step_count(tmp_path, tiny_model_dir):
    config = small_config(tmp_path, tiny_model_dir, epochs=2)
    with pytest.raises(KeyboardInterrupt):
        run_recovery(config, callbacks=[_Interrupt(at_step=5)])
    assert (tmp_path / "rec" / "checkpoints" / "checkpoint-4").exists()
    partial = tmp_path / "rec" / "checkpoints" / "checkpoint-8"  # a later save cut short by a kill: no trainer state
    partial.mkdir()
    (partial / "adapter_model.safetensors").write_bytes(b"")
    counter = _CountSteps()
    log = run_recovery(small_config(tmp_path, tiny_model_dir, epochs=2, resume=True), callbacks=[counter])
    assert log["resumed_from"].endswith("checkpoint-4")
    assert log["steps"] == 12  # the same as an uninterrupted run: 48 / 8 x 2
    assert counter.steps == 8  # only the steps after the checkpoint were trained again
    assert [p["step"] for p in log["loss_curve"]] == list(range(1, 13))


class _CountSteps(TrainerCallback):
    steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def test_bad_recovery_config(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="multiple of micro_batch_size"):
        run_recovery(small_config(tmp_path, tiny_model_dir, batch_size=6, micro_batch_size=4))


def test_masked_lora_gradients_match_autograd():
    from paser.recovery.adapters import _MaskedLowRank

    torch.manual_seed(0)
    x = torch.randn(2, 5, 6, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(4, 6, dtype=torch.float64)
    weight[weight.abs() < 0.6] = 0
    a = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    b = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, a, b: _MaskedLowRank.apply(x, weight, a, b, 0.7), (x, a, b))
    # and it is the masked update, no more: y = x (W + s * mask * BA)^T
    y = _MaskedLowRank.apply(x, weight, a, b, 0.7)
    expected = x @ (weight + 0.7 * (weight != 0) * (b @ a)).t()
    assert torch.allclose(y, expected)


@pytest.mark.parametrize("mode", ["masked", "off"])
def test_masked_lora_merges_into_exactly_the_trained_model(tmp_path, sparse_tiny, mode):
    from paser.models import load_model

    log = run_recovery(small_config(tmp_path, sparse_tiny, epochs=2, sparse_lora=mode))
    assert log["sparse_lora"] == mode and log["zeros_after_merge"] == log["zeros_kept"] > 0
    if mode == "masked":
        assert log["merge_max_logit_diff"] < 1e-5  # the shipped model is the trained model
    else:
        assert log["merge_max_logit_diff"] > 1e-3  # re-masking after the merge throws training away
    merged, _ = load_model(str(tmp_path / "rec" / "merged"), dtype="fp32")
    before, _ = load_model(str(sparse_tiny), dtype="fp32")
    for (name, m), (_, b) in zip(merged.named_modules(), before.named_modules()):
        if isinstance(m, torch.nn.Linear) and ".layers." in f".{name}":
            assert torch.equal(m.weight == 0, b.weight == 0), name


def test_kd_loss_is_the_forward_kl():
    from paser.recovery.trainer import kd_loss

    torch.manual_seed(0)
    student, teacher = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    positions = torch.tensor([[True, False, True], [False, True, True]])
    p = (teacher / 2).softmax(-1)
    q = (student / 2).softmax(-1)
    kl = (p * (p.log() - q.log())).sum(-1)[positions].mean() * 4
    assert kd_loss(student, teacher, positions, temperature=2.0).item() == pytest.approx(kl.item(), rel=1e-6)
    assert kd_loss(teacher, teacher, positions).item() == pytest.approx(0.0, abs=1e-6)


def test_distillation_and_mix_log_each_term(tmp_path, sparse_tiny, tiny_model_dir):
    with pytest.raises(ConfigError, match="loss 'kd' needs the original model: give --teacher"):
        resolve_recovery(small_config(tmp_path, sparse_tiny, loss="kd", method="end-to-end"))
    log = run_recovery(small_config(tmp_path, sparse_tiny, epochs=1, loss="mix", kd_alpha=0.5,
                                    teacher=str(tiny_model_dir)))
    curve = log["loss_curve"]
    assert all({"nll", "kd"} <= set(p) for p in curve)
    for p in curve:  # the logged loss is the mix of the logged terms (per-step means)
        assert p["loss"] == pytest.approx(0.5 * p["kd"] + 0.5 * p["nll"], rel=2e-3)
    kd = run_recovery(small_config(tmp_path, sparse_tiny, epochs=1, loss="kd", teacher=str(tiny_model_dir),
                                   out=tmp_path / "kd"))
    assert [p["loss"] for p in kd["loss_curve"]] == pytest.approx([p["kd"] for p in kd["loss_curve"]], rel=2e-3)
    assert kd["zeros_after_merge"] == kd["zeros_kept"]


def test_auto_loss_distils_from_the_original_that_prune_recorded(tmp_path, tiny_model_dir):
    pruned = tmp_path / "pruned"
    pruned.mkdir()

    def resolved(**overrides):
        got = resolve_recovery(RecoverConfig(model=str(pruned), data="d.jsonl", out=tmp_path / "o",
                                             **({"loss": "auto", "method": "end-to-end"} | overrides))).config
        return got.loss, got.teacher

    assert resolved() == ("nll", None)  # no original known: the reference answers alone
    (pruned / "prune_report.json").write_text(json.dumps({"config": {"model": str(tiny_model_dir)}}))
    assert resolved() == ("kd", str(tiny_model_dir))
    default = resolve_recovery(RecoverConfig(model=str(pruned), data="d.jsonl", out=tmp_path / "o",
                                             method="end-to-end")).config
    assert (default.loss, default.teacher) == ("kd", str(tiny_model_dir))  # auto is the default
    assert resolved(teacher="other") == ("kd", "other")  # an explicit teacher wins
    assert resolved(loss="nll") == ("nll", None)  # an explicit loss stays
    (pruned / "prune_report.json").write_text(json.dumps({"config": {"model": str(tmp_path / "moved")}}))
    assert resolved() == ("nll", None)  # the recorded original is gone: no teacher, said in the log


def test_learning_rate_defaults_to_the_adapters_and_an_explicit_one_stays(tmp_path):
    def lr(**overrides):
        return resolve_recovery(RecoverConfig(model=str(tmp_path / "pruned"), data="d.jsonl", out=tmp_path / "o",
                                              method="end-to-end", loss="nll", **overrides)).config.lr

    assert RecoverConfig(model="m", data="d", out="o").lr is None  # nothing given: decided by the adapter
    assert (lr(), lr(adapter="full")) == (DEFAULT_LR["lora"], DEFAULT_LR["full"]) == (1e-3, 1e-4)
    assert (lr(lr=3e-4), lr(adapter="full", lr=2e-5)) == (3e-4, 2e-5)
    with pytest.raises(ConfigError, match="lr"):
        RecoverConfig(model="m", data="d", out="o", lr=0).validate()


def test_the_paper_recipe_trains_at_its_own_rate_unless_one_is_given():
    from paser.pipeline import load_config
    from paser.recipes import apply_recipe

    paper = apply_recipe("paper", "recover", {"lr": None, "loss": "auto", "epochs": 1})
    assert (paper["lr"], paper["loss"], paper["epochs"]) == (1e-4, "nll", 1)  # not paser's 1e-3
    assert apply_recipe("paper", "recover", {"lr": 2e-4})["lr"] == 2e-4
    assert "lr" not in apply_recipe("paper", "select", {"budget": 0.2})
    # in a run, an arm of the recipe shares the config's rate where it sets one, else takes the paper's
    arms = ["arms=[{name: random, method: random}, {name: paper, recipe: paper}]", "baseline=random"]
    assert {a["name"]: a["recover"].get("lr") for a in load_config("demo", arms).arms} == {"random": None, "paper": 1e-4}
    shared = load_config("demo", [*arms, "recover.lr=0.0002"])
    assert {a["name"]: a["recover"].get("lr") for a in shared.arms} == {"random": None, "paper": None}
    assert shared.recover["lr"] == 2e-4


def test_full_parameter_recovery_keeps_zeros(tmp_path, sparse_tiny):
    from paser.models import load_model

    log = run_recovery(small_config(tmp_path, sparse_tiny, epochs=1, adapter="full", lr=1e-3))
    assert log["zeros_after_merge"] == log["zeros_kept"] > 0 and log["merge_max_logit_diff"] == 0.0
    merged, _ = load_model(str(tmp_path / "rec" / "merged"), dtype="fp32")
    before, _ = load_model(str(sparse_tiny), dtype="fp32")
    changed = [n for (n, m), (_, b) in zip(merged.named_parameters(), before.named_parameters()) if not torch.equal(m, b)]
    assert len(changed) > 10  # every kind of weight trains, not just adapters
    assert not (tmp_path / "rec" / "adapter").exists()


def test_teacher_cache_with_the_whole_vocabulary_equals_the_live_teacher(tmp_path, sparse_tiny, tiny_model_dir,
                                                                        monkeypatch):
    monkeypatch.setenv("PASER_CACHE", str(tmp_path / "cache"))
    common = dict(epochs=1, loss="kd", teacher=str(tiny_model_dir))
    live = run_recovery(small_config(tmp_path, sparse_tiny, out=tmp_path / "live", **common))
    cached = run_recovery(small_config(tmp_path, sparse_tiny, out=tmp_path / "cached", teacher_cache="topk",
                                       teacher_topk=100_000, **common))
    assert [p["kd"] for p in cached["loss_curve"]] == pytest.approx([p["kd"] for p in live["loss_curve"]], rel=1e-4)
    assert list((tmp_path / "cache" / "teacher").glob("*.npz"))
    small = run_recovery(small_config(tmp_path, sparse_tiny, out=tmp_path / "k8", teacher_cache="topk",
                                      teacher_topk=8, **common))
    first_live, first_small = live["loss_curve"][0]["kd"], small["loss_curve"][0]["kd"]
    assert first_small <= first_live + 1e-4  # the bucketed KL never exceeds the full one
    with pytest.raises(ConfigError, match="temperature 1"):
        small_config(tmp_path, sparse_tiny, teacher_cache="topk", kd_temperature=2.0, **common).validate()


def test_masked_lora_merge_is_exact_in_bf16_too(tmp_path, sparse_tiny):
    masked = run_recovery(small_config(tmp_path, sparse_tiny, epochs=1, dtype="bf16"))
    plain = run_recovery(small_config(tmp_path, sparse_tiny, epochs=1, dtype="bf16", sparse_lora="off",
                                      out=tmp_path / "off"))
    # one rounding of the effective weight, as the forward pass did it: the merged model is the trained one
    assert masked["merge_max_logit_diff"] <= 0.05 * plain["merge_max_logit_diff"]
    assert masked["zeros_after_merge"] == masked["zeros_kept"]


def test_a_new_objective_is_one_registered_class(tmp_path, sparse_tiny, tiny_model_dir):
    """The recovery trainer asks the objective for the loss: a throw-away objective registered here trains."""
    from paser.objectives import OBJECTIVES, Objective

    assert OBJECTIVES.names() == ("nll", "kd", "mix", "rho", "kd-features")

    @OBJECTIVES.register("quarter_mix_test")
    class QuarterMix(Objective):
        terms = frozenset({"kd", "nll"})

        def loss(self, terms, config):
            return 0.25 * terms["kd"] + 0.75 * terms["nll"]

    try:
        log = run_recovery(small_config(tmp_path, sparse_tiny, epochs=1, loss="quarter_mix_test",
                                        teacher=str(tiny_model_dir)))
    finally:
        OBJECTIVES.unregister("quarter_mix_test")
    for p in log["loss_curve"]:
        assert p["loss"] == pytest.approx(0.25 * p["kd"] + 0.75 * p["nll"], rel=2e-3)
    with pytest.raises(ConfigError, match="loss must be one of"):
        RecoverConfig(model=str(sparse_tiny), data="d.jsonl", out=tmp_path / "o", loss="quarter_mix_test").validate()


def test_rho_trains_on_the_tokens_the_student_lost_most_against_the_original():
    """rho's loss is the mean student NLL over the 60% of tokens with the largest excess over the original's."""
    from paser.objectives import OBJECTIVES

    student = torch.tensor([2.0, 0.5, 3.0, 1.0, 4.0])
    teacher = torch.tensor([1.0, 0.45, 0.5, 0.7, 3.95])  # excess: 1.0, 0.05, 2.5, 0.3, 0.05
    loss = OBJECTIVES.get("rho").loss({"token_nll": student, "teacher_token_nll": teacher}, None)
    assert loss.item() == pytest.approx((3.0 + 2.0 + 1.0) / 3)  # ceil(0.6 * 5) = 3 tokens: excess 2.5, 1.0, 0.3


def test_rho_recovery_runs_with_the_live_teacher(tmp_path, sparse_tiny, tiny_model_dir):
    log = run_recovery(small_config(tmp_path, sparse_tiny, epochs=1, loss="rho", teacher=str(tiny_model_dir)))
    assert log["steps"] > 0 and all({"nll", "kd"} <= set(p) for p in log["loss_curve"])
    assert log["zeros_after_merge"] == log["zeros_kept"]


def test_an_objective_without_the_teacher_trains_as_itself(tmp_path, sparse_tiny):
    """No objective is silently replaced by plain NLL: one that reads only the student's NLL but returns zero
    leaves every weight where it was, where NLL itself moves them."""
    from safetensors.torch import load_file

    from paser.objectives import OBJECTIVES, Objective

    @OBJECTIVES.register("frozen_test")
    class Frozen(Objective):
        terms = frozenset({"nll"})

        def loss(self, terms, config):
            return 0.0 * terms["nll"]

    def moved(loss):
        out = tmp_path / loss
        run_recovery(small_config(tmp_path, sparse_tiny, epochs=1, loss=loss, adapter="full", out=out))
        before, after = load_file(str(sparse_tiny / "model.safetensors")), load_file(str(out / "merged" / "model.safetensors"))
        return sum(int(not torch.equal(before[k], after[k])) for k in before)

    try:
        assert moved("frozen_test") == 0
    finally:
        OBJECTIVES.unregister("frozen_test")
    assert moved("nll") > 0


def test_an_objective_asks_for_terms_that_exist():
    from paser.objectives import OBJECTIVES, Objective

    with pytest.raises(ValueError, match="unknown terms"):
        @OBJECTIVES.register("typo_test")
        class Typo(Objective):
            terms = frozenset({"kl"})


def test_feature_distillation_logs_its_terms_and_needs_the_live_teacher(tmp_path, sparse_tiny, tiny_model_dir):
    log = run_recovery(small_config(tmp_path, sparse_tiny, epochs=1, loss="kd-features", teacher=str(tiny_model_dir),
                                    feature_weight=0.5))
    for p in log["loss_curve"]:
        assert p["loss"] == pytest.approx(p["kd"] + 0.5 * p["features"], rel=2e-3)
    with pytest.raises(ConfigError, match="hidden states"):
        small_config(tmp_path, sparse_tiny, loss="kd-features", teacher=str(tiny_model_dir), teacher_cache="topk").validate()
