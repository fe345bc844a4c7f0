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


def apply_masks(model: torch.nn.Module, masks: dict[str, torch.Tensor]) -> None:
    apply_masks_to(dict(model.named_modules()), masks)


@torch.no_grad()
def apply_masks_to(modules: dict[str, torch.nn.Module], masks: dict[str, torch.Tensor]) -> None:
    for name, mask in masks.items():
        weight = modules[name].weight
        weight.masked_fill_(mask if mask.device == weight.device else mask.to(weight.device), 0.0)



class KeepZeros:
    """The pruned zeros of a model's (or one block's) sparse linear layers, kept exact while every weight trains:
    the pruned positions get zero gradient (so Adam without weight decay never moves them) and are re-zeroed after
    each optimizer step (a guard beside the masked gradients). One helper for end-to-end and block-wise training."""

    def __init__(self, model: torch.nn.Module, masks: dict[str, torch.Tensor] | None = None,
                 device: torch.device | str | None = None):
        """``masks``: the zeros found earlier (e.g. before a LoRA wrap or a reload); default: ``model``'s own.
        ``device``: where the masks live (the training device saves a copy per step; default the CPU)."""
        self.modules = dict(model.named_modules())
        masks = sparsity_masks(model) if masks is None else masks
        self.masks = {name: mask if device is None else mask.to(device) for name, mask in masks.items()}

    def __len__(self) -> int:
        return len(self.masks)

    def mask_gradients(self) -> None:
        for name, zeros in self.masks.items():
            keep = (~zeros).to(self.modules[name].weight.device)
            self.modules[name].weight.register_hook(lambda grad, keep=keep: grad * keep.to(grad.dtype))

    def restore(self) -> None:
        """Put the zeros back (after an optimizer step, or a LoRA merge)."""
        apply_masks_to(self.modules, self.masks)

    def zeros(self) -> int:
        """The exact zeros the sparse layers hold now."""
        return sum(int((self.modules[name].weight == 0).sum()) for name in self.masks)

    def kept(self) -> dict[str, int]:
        """The zeros pruning left (``zeros_kept``) and those there now (``zeros_after_merge``): equal when none moved."""
        return {"sparse_layers": len(self.masks), "zeros_kept": int(sum(m.sum().item() for m in self.masks.values())),
                "zeros_after_merge": self.zeros()}
