"""Pruning. For now: in-place per-row magnitude pruning of the decoder's linear layers (a quick
baseline used by benchmarks and tests). Wanda, SparseGPT and Taylor structured pruning arrive with
``paser prune`` (issue 3)."""

from __future__ import annotations

import torch


@torch.no_grad()
def magnitude_prune_(model: torch.nn.Module, sparsity: float = 0.5) -> torch.nn.Module:
    """Zero the ``sparsity`` fraction of smallest-magnitude weights in each output row of every linear
    layer inside the decoder blocks (embeddings and LM head untouched). Returns the same model."""
    if not 0 < sparsity < 1:
        raise ValueError(f"sparsity must be in (0, 1), not {sparsity}")
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in f".{name}":
            weight = module.weight
            k = int(weight.shape[1] * sparsity)
            if k == 0:
                continue
            drop = weight.abs().float().topk(k, dim=1, largest=False).indices
            weight.scatter_(1, drop, 0.0)
    return model
