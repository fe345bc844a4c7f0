"""Evaluation: exact-match accuracy on the built-in demo skills (greedy decoding).

Zero-shot lm-eval tasks and perplexity arrive with issue 4.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .data import PromptFormatter, Record
from .demo_data import normalize_answer

log = logging.getLogger(__name__)


@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, records: Sequence[Record], max_new_tokens: int = 32,
                     batch_size: int = 16, template: str = "auto", progress: bool = True) -> list[str]:
    """Greedy answers to each record's prompt (formatted with the same template as training)."""
    formatter = PromptFormatter(tokenizer, template=template, max_length=None)
    prompts = [formatter.prompt_ids(r) for r in records]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    answers: list[str] = [""] * len(prompts)
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress, leave=False):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        # Left padding, so every prompt ends where generation starts.
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx], device=device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        for row, i in enumerate(idx):
            answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True)
    return answers


def skill_accuracy(records: Sequence[Record], answers: Sequence[str]) -> dict[str, dict[str, float]]:
    """Exact match per skill after :func:`paser.demo_data.normalize_answer`; ``records`` carry
    ``skill`` and ``answer`` in ``raw``. Returns ``{skill: {"acc", "n"}}`` plus ``"mean"`` over skills."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for record, answer in zip(records, answers, strict=True):
        hits[record.raw["skill"]].append(normalize_answer(answer) == normalize_answer(record.raw["answer"]))
    table = {skill: {"acc": sum(h) / len(h), "n": len(h)} for skill, h in sorted(hits.items())}
    table["mean"] = {"acc": sum(v["acc"] for v in table.values()) / len(table), "n": len(records)}
    return table
