"""Block-wise recovery for any decoder: each block is called with the arguments the model's own forward gives it
(captured, not rebuilt), so the block-by-block forward equals the model's forward for every family paser lists as
parity-tested, and block-wise recovery runs on each and moves the pruned model toward the original."""

import pytest
import torch

SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
         "num_key_value_heads": 2}
FAMILIES = {  # tiny random configs: 3 blocks, sequences longer than the sliding windows, GQA where the family has it
    "llama": ("LlamaConfig", {}),
    "mistral": ("MistralConfig", {"sliding_window": 8}),
    "qwen2": ("Qwen2Config", {}),
    "qwen3": ("Qwen3Config", {"head_dim": 16}),
    "gemma2": ("Gemma2Config", {"head_dim": 16, "sliding_window": 8}),
    "gemma3_text": ("Gemma3TextConfig", {"head_dim": 16, "sliding_window": 8}),
    "phi3": ("Phi3Config", {}),
    "olmo2": ("Olmo2Config", {}),
    "granite": ("GraniteConfig", {"embedding_multiplier": 2.0, "residual_multiplier": 0.5, "logits_scaling": 2.0}),
    "phi": ("PhiConfig", {"num_key_value_heads": 4}),
    "stablelm": ("StableLmConfig", {}),
    "cohere": ("CohereConfig", {}),
    "starcoder2": ("Starcoder2Config", {}),
    "gpt_neox": ("GPTNeoXConfig", {"num_key_value_heads": None}),
    "falcon": ("FalconConfig", {"num_key_value_heads": None, "intermediate_size": None}),
    "gpt2": ("GPT2Config", {"n_embd": 64, "n_layer": 3, "n_head": 4, "n_inner": 128, "hidden_size": None,
                            "intermediate_size": None, "num_hidden_layers": None, "num_attention_heads": None,
                            "num_key_value_heads": None}),
    "opt": ("OPTConfig", {"ffn_dim": 128, "word_embed_proj_dim": 64, "intermediate_size": None,
                          "num_key_value_heads": None}),
}
# recovered end to end in the test below (GPT-2's Conv1D layers are not among the layers paser prunes)
RECOVERED = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "olmo2", "granite", "opt")


def _tiny(family, tokenizer, directory, seed=0):
    import transformers
    from transformers import AutoModelForCausalLM

    name, extra = FAMILIES[family]
    fields = {k: v for k, v in {**SHAPE, **extra}.items() if v is not None}  # None: a field the family names otherwise
    config = getattr(transformers, name)(
        vocab_size=len(tokenizer), max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False, **fields)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        model.lm_head.weight.normal_(0, 0.5)  # distributions that differ visibly
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return model


def _batch(tokenizer):
    from paser.data import pad_right

    torch.manual_seed(1)
    rows = [torch.randint(4, len(tokenizer), (n,)).tolist() for n in (24, 13, 19)]  # padded; longer than the windows
    return pad_right(rows, tokenizer.pad_token_id)


def _blockwise_logits(directory, model, ids, attention, same_call=False):
    """(the model's logits, the logits of paser's block loop): each block read from the checkpoint and called with
    its captured arguments (``same_call``: block 0's for every block), one at a time; the last block's output then
    goes through the model's own code after the blocks (final norm, head, soft-capping, scaling)."""
    from paser.recovery.layers import LayerReader, call_block, decoder_layers

    reader = LayerReader(str(directory), "cpu")
    hidden, calls = reader.capture(ids, attention)
    with torch.no_grad():
        for layer in range(reader.n_layers):
            hidden = call_block(reader.block(layer, torch.float32), hidden, calls[0 if same_call else layer])
        expected = model(input_ids=ids, attention_mask=attention).logits
        last = decoder_layers(model, reader.n_layers)[2][-1]
        swap = last.register_forward_hook(lambda m, i, out: (hidden, *out[1:]) if isinstance(out, tuple) else hidden)
        try:
            got = model(input_ids=ids, attention_mask=attention).logits
        finally:
            swap.remove()
    return expected, got


def test_the_parity_tested_list_is_what_this_file_tests():
    from paser.recovery.layers import PARITY_TESTED

    assert set(PARITY_TESTED) == set(FAMILIES)


@pytest.mark.parametrize("family", FAMILIES)
def test_the_block_by_block_forward_equals_the_models(family, tiny_tokenizer, tmp_path):
    model = _tiny(family, tiny_tokenizer, tmp_path / family)
    ids, attention = _batch(tiny_tokenizer)
    expected, got = _blockwise_logits(tmp_path / family, model, ids, attention)
    real = attention.bool()
    assert (got[real] - expected[real]).abs().max().item() < 1e-4, family


def test_each_block_gets_its_own_arguments(tiny_tokenizer, tmp_path):
    """Gemma 2 alternates sliding-window and full attention: block 0's arguments given to every block do not
    reproduce the forward (the check above would fail if the capture were shared)."""
    from paser.recovery.layers import LayerReader

    model = _tiny("gemma2", tiny_tokenizer, tmp_path / "g")
    ids, attention = _batch(tiny_tokenizer)
    calls = LayerReader(str(tmp_path / "g"), "cpu").capture(ids, attention)[1]
    assert calls[0][1]["attention_mask"] is not calls[1][1]["attention_mask"]
    expected, got = _blockwise_logits(tmp_path / "g", model, ids, attention, same_call=True)
    real = attention.bool()
    assert (got[real] - expected[real]).abs().max().item() > 1e-3


def _prune_in_place(directory):
    """Magnitude 50% of every decoder linear weight, saved back (what paser prune --method magnitude does)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory)
    with torch.no_grad():
        for name, module in model.named_modules():
            if isinstance(module, torch.nn.Linear) and "layers" in name:
                w = module.weight
                w[w.abs() <= w.abs().flatten().kthvalue(w.numel() // 2).values] = 0
    model.save_pretrained(directory)


def _kl(student_dir, original, ids, attention):
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    with torch.no_grad():
        p = original(input_ids=ids, attention_mask=attention).logits.log_softmax(-1)
        q = student(input_ids=ids, attention_mask=attention).logits.log_softmax(-1)
    real = attention.bool()
    return (p.exp() * (p - q)).sum(-1)[real].mean().item()


@pytest.mark.parametrize("family", RECOVERED)
def test_blockwise_recovery_moves_every_family_toward_the_original(family, tiny_tokenizer, tmp_path, monkeypatch):
    import json

    from paser.demo_data import demo_records
    from paser.recovery import RecoverConfig, run_recovery

    monkeypatch.setenv("PASER_CACHE", str(tmp_path / "cache"))
    original = _tiny(family, tiny_tokenizer, tmp_path / "original")
    _tiny(family, tiny_tokenizer, tmp_path / "pruned")
    _prune_in_place(tmp_path / "pruned")
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in demo_records()["train"][100:164]))
    log = run_recovery(RecoverConfig(model=str(tmp_path / "pruned"), data=str(data), out=tmp_path / "rec",
                                     method="blockwise", teacher=str(tmp_path / "original"), dtype="fp32",
                                     cutoff_len=48, block_batch_tokens=256))
    assert all(b["loss_after"] < b["loss_before"] for b in log["blocks"]), log["blocks"]
    assert all(b["zeros_after"] == b["zeros_before"] > 0 for b in log["blocks"])
    ids, attention = _held_out_text(tiny_tokenizer)
    before, after = _kl(tmp_path / "pruned", original, ids, attention), _kl(tmp_path / "rec" / "merged", original,
                                                                            ids, attention)
    assert after < before, (family, before, after)


def _held_out_text(tokenizer):
    """Demo records recovery did not train on, as a padded batch (text like the training data's)."""
    from paser.data import pad_right
    from paser.demo_data import demo_records

    rows = [tokenizer(r["instruction"] + " " + r["output"])["input_ids"][:48] for r in demo_records()["train"][40:56]]
    return pad_right(rows, tokenizer.pad_token_id)
