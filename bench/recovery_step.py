"""Recovery step time: plain LoRA vs sparsity-exact (masked) LoRA vs full-parameter, same batches.

Takes the embedded SmolLM2-135M-Instruct, 50% magnitude-pruned here (or ``--model DIR``), and times
``--steps`` optimizer steps (forward, backward, AdamW) on identical micro-batches of ``--batch`` x
``--seq`` random tokens, for each form in turn (alternated ``--repeats`` times so drift hits all alike),
after ``--warmup`` untimed steps. Prints one JSON line: seconds per step of each form and
``masked_over_plain`` (the requirement: at most 1.2).
"""

import argparse
import copy
import json
import time

import torch


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="a pruned model directory (default: magnitude 50% of the embedded model)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()

    from peft import get_peft_model

    from paser.models import DEFAULT_MODEL, load_model, resolve_dtype_name
    from paser.prune import magnitude_prune_
    from paser.recovery.adapters import lora_config

    dtype = resolve_dtype_name(args.dtype)
    if args.model:
        base, _ = load_model(args.model, dtype=dtype, tokenizer=False)
    else:
        base, _ = load_model(DEFAULT_MODEL, dtype=dtype, tokenizer=False)
        magnitude_prune_(base, 0.5)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), generator=gen)

    def build(form):
        model = copy.deepcopy(base)
        if form == "full":
            model.requires_grad_(True)
        else:
            model = get_peft_model(model, lora_config(args.rank, 2 * args.rank, 0.05, "all-linear", form == "masked"))
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch.optim.AdamW(params, lr=1e-5)

    def step(model, optimizer):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    forms = ("plain", "masked", "full")
    built = {form: build(form) for form in forms}
    seconds = {form: [] for form in forms}
    for form in forms:
        for _ in range(args.warmup):
            step(*built[form])
    for _ in range(args.repeats):
        for form in forms:
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step(*built[form])
            seconds[form].append((time.perf_counter() - t0) / args.steps)
    per_step = {form: round(min(v), 3) for form, v in seconds.items()}  # min over repeats: least disturbed
    print(json.dumps({"bench": "recovery_step", "dtype": dtype, "threads": torch.get_num_threads(),
                      "batch": args.batch, "seq": args.seq, "rank": args.rank, "seconds_per_step": per_step,
                      "masked_over_plain": round(per_step["masked"] / per_step["plain"], 3),
                      "full_over_plain": round(per_step["full"] / per_step["plain"], 3)}))


if __name__ == "__main__":
    main()
