"""The original's own tokens: text the original model writes, added to what recovery trains on.

Recovery's data budget is the selected records; generated tokens are compute, not data (Shin et al., arXiv
2406.15524, and self-data distillation, arXiv 2410.09982: the dense model's own text kept paying where real data
ran out). With ``generated_tokens N`` the original writes about ``N`` tokens per real training token: for each
selected record in a seeded order, in turn, a sampled continuation of its prompt (a new answer) and of a prefix of
its whole text (the prompt and part of the answer, cut at a seeded point), each up to ``cutoff_len`` tokens in
all, until the budget is met. Each sample trains like a record: its prefix as the prompt, the continuation as the
response (the positions KD reads; block-wise reads every token).

Samples are cached per prefix under ``$PASER_CACHE/generated/`` (keyed by the original's weights, the dtype and
the sampling settings), written after every batch: a killed run resumes where it stopped, and a larger ``N``
reuses what a smaller one wrote. The train log's ``generated`` holds the tokens, the minutes and tokens/s.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .. import distributed
from ..cache import cache_root, stable_hash
from ..data import Encoded
from ..generate import generate
from ..models import load_model, model_fingerprint

log = logging.getLogger(__name__)

# read when generated_tokens > 0 (beside teacher, seed and cutoff_len): paser.recovery.reads
GENERATED_OPTIONS = frozenset({"generated_temperature", "generated_top_p", "generated_batch_size"})
MIN_NEW_TOKENS = 16  # a prefix leaves at least this many tokens to write


def prefixes(encoded: Sequence[Encoded], budget: int, cutoff: int, seed: int, start: int = 0
             ) -> list[list[int]]:
    """Prefixes to continue, about ``budget`` new tokens' worth at most (each leaves ``cutoff - len`` to write):
    records in a seeded order, each giving its prompt, then its text cut at a seeded point, in turn.
    ``start``: how many were planned before (a later round continues the same sequence)."""
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(encoded), generator=generator).tolist()
    out, room, k = [], 0, 0
    while room < budget:
        record = encoded[order[(k // 2) % len(order)]]
        if k % 2 == 0:
            prefix = list(record.prompt_ids)
        else:
            cut = int(torch.randint(1, max(2, len(record.response_ids)), (1,), generator=generator))
            prefix = list(record.prompt_ids) + list(record.response_ids[:cut])
        k += 1
        prefix = prefix[: max(1, cutoff - MIN_NEW_TOKENS)]
        if k > start:
            out.append(prefix)
            room += cutoff - len(prefix)
        if k > start + 64 * max(len(encoded), 1):
            break  # records too long to leave room: what could be planned
    return out


def self_generated(config: Any, encoded: Sequence[Encoded], tokenizer: Any, dtype: str) -> tuple[list[Encoded], dict]:
    """The original's samples for ``encoded`` (the real training records) and what they cost."""
    real = sum(len(e.input_ids) for e in encoded)
    budget = round(config.generated_tokens * real)
    if budget <= 0:
        return [], {}
    settings = {"temperature": config.generated_temperature, "top_p": config.generated_top_p, "seed": config.seed,
                "cutoff": config.cutoff_len}
    store = cache_root() / "generated" / stable_hash("generated-v1", model_fingerprint(config.teacher), dtype,
                                                     settings) / "samples.jsonl"
    done = _read(store)
    t0, model, samples, written, planned = time.perf_counter(), None, [], 0, 0
    while written < budget and distributed.is_main():
        batch = prefixes(encoded, budget - written, config.cutoff_len, config.seed, planned)
        if not batch:
            break
        planned += len(batch)
        keys = [stable_hash(p) for p in batch]
        missing = [i for i, key in enumerate(keys) if key not in done]
        if missing:
            model = model or _load(config, dtype)
            _write(model, tokenizer, [batch[i] for i in missing], [keys[i] for i in missing], config, store, done)
        for prefix, key in zip(batch, keys):
            new = done[key]["ids"][: min(config.cutoff_len - len(prefix), budget - written)]
            if new:
                samples.append(Encoded(prefix, list(new) + ([tokenizer.eos_token_id] if done[key]["finished"] else [])))
                written += len(new)
    del model
    samples, written = distributed.all_gather((samples, written) if distributed.is_main() else None)[0]  # rank 0's
    seconds = time.perf_counter() - t0
    info = {"tokens_per_real_token": config.generated_tokens, "real_tokens": real, "budget": budget,
            "generated_tokens": written, "samples": len(samples),  # the original's tokens (end-of-sequence not counted)
            "seconds": round(seconds, 2), "cache": str(store), **settings}
    log.info("generated: %s tokens in %d samples from the original (%.0f s)", f"{info['generated_tokens']:,}",
             len(samples), seconds)
    return samples, info


def _load(config: Any, dtype: str) -> Any:
    log.info("generated: the original (%s) writes about %.3g tokens per real token", config.teacher,
             config.generated_tokens)
    model, _ = load_model(config.teacher, dtype=dtype, device=distributed.device())
    return model.eval()


def _write(model: Any, tokenizer: Any, batch: list[list[int]], keys: list[str], config: Any, store: Path,
           done: dict[str, dict]) -> None:
    """Sample continuations of ``batch``, appending each batch's to ``store`` as it finishes (resumable)."""
    store.parent.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed + len(done))
    started, count = time.perf_counter(), [0]

    def keep(indices: list[int], answers: list[Any]) -> None:
        rows = [{"key": keys[i], "ids": list(a.ids), "finished": a.finished} for i, a in zip(indices, answers)]
        with store.open("a", encoding="utf-8") as handle:
            handle.write("".join(json.dumps(r) + "\n" for r in rows))
        for row in rows:
            done[row["key"]] = row
        count[0] += sum(len(r["ids"]) for r in rows)
        log.debug("generated: %.0f tokens/s", count[0] / max(time.perf_counter() - started, 1e-9))

    longest = max(config.cutoff_len - len(p) for p in batch)
    generate(model, tokenizer, batch, max_new_tokens=max(MIN_NEW_TOKENS, longest), batch_size=config.generated_batch_size,
             do_sample=True, temperature=config.generated_temperature, top_p=config.generated_top_p, progress=True,
             on_batch=keep)


def _read(store: Path) -> dict[str, dict]:
    """Samples written so far, by prefix key (a line cut by a kill is ignored)."""
    done: dict[str, dict] = {}
    if store.is_file():
        for line in store.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                done[row["key"]] = row
            except (ValueError, KeyError):
                continue
    return done
