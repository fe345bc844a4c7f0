"""The block-by-block forward against each family's own, and block-wise recovery on each (tiny random models):
for every family of ``tests/test_layers.py``, the largest logit difference between the model's forward and paser's
block loop (captured arguments, one block at a time), and, for the families recovered there, the KL to the
original on held-out demo text before and after ``paser recover --method blockwise`` of a magnitude-50% copy.

    python bench/block_parity.py            # one JSON line per family

Uses the test's own builders, so the figures are those of the configurations the tests check.
"""

import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    import test_layers as families
    from paser.demo_data import demo_records
    from paser.recovery import RecoverConfig, run_recovery
    from tiny import make_tokenizer

    tokenizer = make_tokenizer()
    for family in families.FAMILIES:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            original = families._tiny(family, tokenizer, root / "original")
            ids, attention = families._batch(tokenizer)
            expected, got = families._blockwise_logits(root / "original", original, ids, attention)
            real = attention.bool()
            row = {"family": family, "max_logit_diff": (got[real] - expected[real]).abs().max().item()}
            if family in families.RECOVERED:
                families._tiny(family, tokenizer, root / "pruned")
                families._prune_in_place(root / "pruned")
                data = root / "train.jsonl"
                data.write_text("".join(json.dumps(r) + "\n" for r in demo_records()["train"][100:164]))
                run_recovery(RecoverConfig(model=str(root / "pruned"), data=str(data), out=root / "rec",
                                           method="blockwise", teacher=str(root / "original"), dtype="fp32",
                                           cutoff_len=48, block_batch_tokens=256))
                held_ids, held_attention = families._held_out_text(tokenizer)
                row.update(blockwise_ran=True,
                           kl_before=round(families._kl(root / "pruned", original, held_ids, held_attention), 4),
                           kl_after=round(families._kl(root / "rec" / "merged", original, held_ids, held_attention), 4))
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
