"""Greedy (or sampled) answers of a model to instruction prompts, formatted with the training template.

Used by the demo-skills measurement and by the original model's own answers (self-distilled targets and the
fidelity measurement's held-out answers).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from .data import PromptFormatter, Record


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
