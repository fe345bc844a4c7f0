"""Answers of a model to instruction prompts, formatted with the training template (left-padded batches).

Used by the demo-skills measurement (greedy, short) and by the original model's own answers, the
self-distilled training targets (:mod:`paser.targets.original`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from .data import PromptFormatter, Record


@dataclass(frozen=True)
class Answer:
    text: str
    tokens: int  # generated tokens, the end-of-sequence token excluded
    finished: bool  # ended with the end-of-sequence token (False: cut at max_new_tokens)
    ids: tuple[int, ...] = ()  # the generated token ids (end-of-sequence excluded)


@torch.no_grad()
def generate(model: Any, tokenizer: Any, prompts: Sequence[Sequence[int]], max_new_tokens: int = 32,
             batch_size: int = 16, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             progress: bool = True, on_batch: Any = None) -> list[Answer]:
    """Answers to tokenised prompts. Similar lengths share a batch; ``on_batch(indices, answers)`` is called
    after each batch (what a resumable caller stores)."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    answers: list[Answer | None] = [None] * len(prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    device = next(model.parameters()).device
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
    for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress, leave=False):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        # left padding, so every prompt ends where generation starts
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + list(prompts[i]) for i in idx], device=device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad,
                             eos_token_id=eos, **sampling)
        batch = []
        for row, i in enumerate(idx):
            new = out[row, width:].tolist()
            finished = eos in new
            if finished:
                new = new[:new.index(eos)]
            answers[i] = Answer(tokenizer.decode(new, skip_special_tokens=True), len(new), finished, tuple(new))
            batch.append(answers[i])
        if on_batch is not None:
            on_batch(idx, batch)
    return [a for a in answers if a is not None]


def generate_answers(model: Any, tokenizer: Any, records: Sequence[Record], max_new_tokens: int = 32,
                     batch_size: int = 16, template: str = "auto", progress: bool = True) -> list[str]:
    """Greedy answers to each record's prompt (formatted with the same template as training)."""
    formatter = PromptFormatter(tokenizer, template=template, max_length=None)
    prompts = [formatter.prompt_ids(r) for r in records]
    return [a.text for a in generate(model, tokenizer, prompts, max_new_tokens, batch_size, progress=progress)]
