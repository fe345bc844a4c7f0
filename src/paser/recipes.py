"""Named recipes: bundles of selection and recovery settings that stay fixed whatever the defaults become.

``paper``: PASER exactly as He et al. describe it: NMF clusters on the diffusion map, CDS allocation
(n_k proportional to a cluster's mean JSD), IES ranking with a hard top-k, the concept-consistency graph
with the paper's conflict rule, and LoRA recovery on the reference answers (NLL) at lr 1e-4 (LLM-Pruner's LoRA
setting, which the paper's experiments follow), merged with the pruned zeros re-applied afterwards.

A recipe's settings override a config's; its ``unset`` settings fill only what the caller left unset (None), so
a study that gives every arm one learning rate keeps it; anything else stays as given.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "paper": {
        "select": {"method": "paser", "cluster_method": "nmf", "allocation": "cds", "score": "jsd", "ccg": True,
                   "ccg_rule": "paper", "within": "top", "rank": "ies", "drop_original_loss_above": None},
        "recover": {"method": "end-to-end", "adapter": "lora", "loss": "nll", "sparse_lora": "off"},
        "unset": {"lr": 1e-4},  # paser's own default (1e-3) is not the paper's
    },
}


def recipe_settings(name: str, stage: str) -> dict[str, Any]:
    """The ``select``, ``recover`` or ``unset`` settings of recipe ``name``."""
    if name not in RECIPES:
        raise ConfigError(f"unknown recipe '{name}' (known: {', '.join(RECIPES)})")
    return dict(RECIPES[name].get(stage, {}))


def apply_recipe(name: str, stage: str, settings: dict[str, Any], defaults: dict[str, Any] | None = None
                 ) -> dict[str, Any]:
    """``settings`` under recipe ``name``: its ``stage`` settings override them, its ``unset`` ones fill their Nones.
    ``defaults`` (each setting's default, as the CLI has them): a setting the caller gave away from its default that
    the recipe sets otherwise is an error naming both, never overridden in silence."""
    if defaults is not None:
        clash = [(k, v) for k, v in recipe_settings(name, stage).items()
                 if k in settings and settings[k] != defaults.get(k) and settings[k] != v]
        if clash:
            flags = ", ".join(f"--{k.replace('_', '-')} {settings[k]}" for k, _ in clash)
            fixed = ", ".join(f"{k} {v}" for k, v in clash)
            raise ConfigError(f"--recipe {name} sets {fixed}; you gave {flags}: drop "
                              f"{'it' if len(clash) == 1 else 'them'} or the recipe")
    unset = {k: v for k, v in recipe_settings(name, "unset").items() if k in settings and settings[k] is None}
    return {**settings, **recipe_settings(name, stage), **unset}
