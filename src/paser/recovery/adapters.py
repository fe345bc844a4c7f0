"""Sparsity-exact LoRA: the low-rank update of a pruned linear layer is masked by the layer's keep-mask
during training, so ``W + mask * (B A) * s`` is what trains and exactly what is merged.

Form chosen: a peft LoRA layer (registered through peft's custom-module dispatch, so saving, loading and
``merge_and_unload`` stay peft's) whose forward runs one autograd function,

    y = x (W + s * mask * (B A))^T + bias,    mask = (W != 0),

with the effective weight formed per layer inside the function and *recomputed* in the backward pass
instead of saved: at any moment at most one layer's dense temporary exists, the keep-mask is never stored
(it is ``W != 0``), and nothing per-weight persists beyond what plain LoRA keeps. The backward pass needs
the dense gradient ``G = mask * (dy^T x)`` to reach ``A`` and ``B`` (``dB = s G A^T``, ``dA = s B^T G``),
one extra matmul of the layer's size per step: that is the price of exactness (plain LoRA's gradient
never touches the pruned positions it later loses). LoRA dropout is not applied in this form (a dropped
input on the low-rank path alone would need a second full matmul).

Layers with fewer than 1% zeros (dense ones, e.g. a structured-pruned model's) use peft's plain LoRA.
"""

from __future__ import annotations

from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.tuners_utils import check_adapters_to_merge

from ..sparsity import is_sparse


class _MaskedLowRank(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, lora_a, lora_b, scaling):
        effective = _effective_weight(weight, lora_a, lora_b, scaling).to(x.dtype)
        ctx.save_for_backward(x, weight, lora_a, lora_b)
        ctx.scaling = scaling
        return x @ effective.t()

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, lora_a, lora_b = ctx.saved_tensors
        s = ctx.scaling
        effective = _effective_weight(weight, lora_a, lora_b, s).to(grad_out.dtype)
        grad_x = grad_out @ effective
        del effective
        # the dense gradient of the masked update, in the activations' precision (bf16 matmuls are the fast
        # ones where the model runs in bf16), then in the adapter's for the low-rank products
        flat_grad = grad_out.reshape(-1, grad_out.shape[-1]).to(x.dtype)
        flat_x = x.reshape(-1, x.shape[-1])
        grad_w = (flat_grad.t() @ flat_x).to(lora_a.dtype).mul_(weight != 0)
        grad_b = (grad_w @ lora_a.t()).mul_(s)
        grad_a = (lora_b.t() @ grad_w).mul_(s)
        return grad_x, None, grad_a, grad_b, None


def _effective_weight(weight: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scaling: float) -> torch.Tensor:
    delta = (lora_b @ lora_a).mul_(scaling).mul_(weight != 0)
    return delta.add_(weight.to(delta.dtype))


class MaskedLoraLinear(LoraLinear):
    """peft's LoRA linear layer with the update masked to the base weight's non-zeros (see the module doc)."""

    def __init__(self, base_layer: Any, adapter_name: str, config: Any, **kwargs: Any) -> None:
        super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self.sparse = is_sparse(self.get_base_layer().weight)

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        delta = super().get_delta_weight(adapter)
        if self.sparse:
            delta = delta * (self.get_base_layer().weight != 0).to(delta.dtype)
        return delta

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Write exactly the effective weight the forward pass trained with, rounded once to the weight's
        dtype (adding a separately rounded delta would round twice: visible in bf16)."""

        names = check_adapters_to_merge(self, adapter_names)
        if not self.sparse or len(names) != 1 or self.lora_bias.get(names[0]):
            return super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        adapter = names[0]
        weight = self.get_base_layer().weight
        with torch.no_grad():
            effective = _effective_weight(weight, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                                          float(self.scaling[adapter]))
            if safe_merge and not torch.isfinite(effective).all():
                raise ValueError(f"NaNs detected in the merged weights; the adapter {adapter} seems broken")
            weight.data = effective.to(weight.dtype)
        self.merged_adapters.append(adapter)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        active = [a for a in self.active_adapters if a in self.lora_A]
        if not self.sparse or self.disable_adapters or self.merged or len(active) != 1 or kwargs.get("adapter_names"):
            return super().forward(x, *args, **kwargs)
        adapter = active[0]
        base = self.get_base_layer()
        y = _MaskedLowRank.apply(x, base.weight, self.lora_A[adapter].weight, self.lora_B[adapter].weight,
                                 float(self.scaling[adapter]))
        return y if base.bias is None else y + base.bias.to(y.dtype)


def lora_config(r: int, alpha: int, dropout: float, targets: Any, masked: bool) -> Any:
    """A peft ``LoraConfig``; with ``masked``, linear layers become :class:`MaskedLoraLinear`."""

    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0 if masked else dropout, target_modules=targets,
                        task_type="CAUSAL_LM")
    if masked:
        config._register_custom_module({torch.nn.Linear: MaskedLoraLinear})
    return config
