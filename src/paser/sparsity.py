"""Pruned zeros: which linear layers are sparse, their zero masks, and putting the zeros back."""

from __future__ import annotations

import torch

SPARSE_LAYER_MIN_ZEROS = 0.01  # a linear layer with at least this fraction of zeros is treated as pruned


def is_sparse(weight: torch.Tensor) -> bool:
    return bool((weight == 0).float().mean().item() >= SPARSE_LAYER_MIN_ZEROS)


def sparsity_masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Zero masks of the linear layers that look pruned (>= 1% exact zeros)."""
    masks = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and is_sparse(module.weight):
            masks[name] = (module.weight == 0).cpu()
    return masks


@torch.no_grad()
def apply_masks(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        modules[name].weight.masked_fill_(mask.to(modules[name].weight.device), 0.0)


