"""Named recipes: bundles of selection and recovery settings that stay fixed whatever the defaults become.

``paper``: PASER exactly as He et al. describe it: NMF clusters on the diffusion map, CDS allocation
(n_k proportional to a cluster's mean JSD), IES ranking with a hard top-k, the concept-consistency graph
with the paper's conflict rule, and LoRA recovery on the reference answers (NLL), merged with the pruned
zeros re-applied afterwards. A recipe's settings override a config's; anything else stays as given.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {
        "select": {"method": "paser", "cluster_method": "nmf", "allocation": "cds", "score": "jsd", "ccg": True,
                   "ccg_rule": "paper", "within": "top", "rank": "ies", "drop_original_loss_above": None},
        "recover": {"adapter": "lora", "loss": "nll", "sparse_lora": "off"},
    },
}


def recipe_settings(name: str, stage: str) -> dict[str, Any]:
    """The ``select`` or ``recover`` settings of recipe ``name``."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe '{name}' (known: {', '.join(RECIPES)})")
    return dict(RECIPES[name][stage])
