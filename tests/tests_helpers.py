"""Helpers shared by tests (kept out of conftest so they can be imported by name)."""

from pathlib import Path

import torch


def magnitude_prune_copy(model, tokenizer, directory: Path, sparsity: float = 0.5) -> Path:
    """Save a copy of ``model`` with the smallest ``sparsity`` of each decoder linear weight zeroed
    (per output row, as Wanda/magnitude baselines do); embeddings and LM head are kept."""
    import copy

    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in pruned.named_modules():
            if isinstance(module, torch.nn.Linear) and "layers." in name:
                w = module.weight
                k = int(w.shape[1] * sparsity)
                threshold = w.abs().kthvalue(k, dim=1, keepdim=True).values
                w.masked_fill_(w.abs() <= threshold, 0.0)
    pruned.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
