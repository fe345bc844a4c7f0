"""Helpers shared by tests (kept out of conftest so they can be imported by name)."""

import copy
import importlib
import json
import sys
from pathlib import Path

import torch

from paser.evaluate import ZERO_SHOT_TASKS
from paser.prune import magnitude_prune_


def magnitude_prune_copy(model, tokenizer, directory: Path, sparsity: float = 0.5) -> Path:
    """Save a magnitude-pruned copy of ``model`` (with its tokenizer) as a Hugging Face directory."""
    pruned = magnitude_prune_(copy.deepcopy(model), sparsity)
    pruned.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def patch_everywhere(monkeypatch, target: str, replacement) -> None:
    """Replace ``paser.module.name`` in its module and in every paser module that imported it by name, so a test
    that forbids a call (a model load when the cache should serve) fails wherever the call is made from."""
    module_name, name = target.rsplit(".", 1)
    original = getattr(importlib.import_module(module_name), name)
    for module in [m for key, m in sys.modules.items() if key.startswith("paser") and m is not None]:
        if getattr(module, name, None) is original:
            monkeypatch.setattr(module, name, replacement)


def ok(result) -> str:
    """A finished subprocess's output, after asserting it succeeded (its output's tail as the message)."""
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


def write_demo_train(path: Path, n: int = 120) -> Path:
    """The first ``n`` demo training records as a JSONL file."""
    from paser.demo_data import demo_records

    path.write_text("".join(json.dumps(r) + "\n" for r in demo_records()["train"][:n]))
    return path


WORDS = ["the", "cat", "sat", "on", "a", "mat", "while", "two", "dogs", "ran", "over", "green", "hills", "to", "find",
         "red", "apples", "near", "old", "trees"]


def _sentence(rng, n):
    return " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (n,), generator=rng))


def write_fixtures(directory, rows=10):
    """10 rows of every task format, as in ../shared/data/eval (extra fields included, to be ignored)."""
    rng = torch.Generator().manual_seed(0)
    directory.mkdir(parents=True, exist_ok=True)
    for task in ZERO_SHOT_TASKS:
        with (directory / f"{task}.jsonl").open("w") as f:
            for i in range(rows):
                n_choices = 2 if task in ("boolq", "piqa", "winogrande") else 4
                doc = {"question": _sentence(rng, 6), "choices": [_sentence(rng, 3) for _ in range(n_choices)],
                       "label": i % n_choices, "query_raw": "ignored"}
                if task == "boolq":
                    doc["choices"] = ["no", "yes"]
                    doc["context"] = _sentence(rng, 20)
                if task == "winogrande":
                    doc["question"] = ""
                    doc["context_options"] = [_sentence(rng, 5) for _ in range(2)]
                    doc["continuation"] = _sentence(rng, 4)
                    doc["choices"] = [c + " " + doc["continuation"] for c in doc["context_options"]]
                f.write(json.dumps(doc) + "\n")
    return directory


def write_demo_data(path: Path, n: int) -> Path:
    """The first ``n`` built-in demo training records as a JSONL file (extra fields such as ``skill`` kept)."""
    from paser.demo_data import demo_records

    path.write_text("".join(json.dumps(r) + "\n" for r in demo_records()["train"][:n]))
    return path


def select_config(tmp_path, original, pruned, data, **overrides):
    """A SelectConfig on tiny models with its own cache; ``overrides`` win."""
    from paser.selection.select import SelectConfig

    base = dict(original=str(original), pruned=str(pruned), data=str(data), out=tmp_path / "out", method="paser", dtype="fp32",
                cache_dir=tmp_path / "cache")
    return SelectConfig(**(base | overrides))
