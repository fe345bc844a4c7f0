"""Helpers shared by tests (kept out of conftest so they can be imported by name)."""

import copy
from pathlib import Path

from paser.prune import magnitude_prune_


def magnitude_prune_copy(model, tokenizer, directory: Path, sparsity: float = 0.5) -> Path:
    """Save a magnitude-pruned copy of ``model`` (with its tokenizer) as a Hugging Face directory."""
    pruned = magnitude_prune_(copy.deepcopy(model), sparsity)
    pruned.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
