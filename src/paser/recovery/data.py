"""What every recovery method trains on: the selected records, validated, turned into their targets
(:mod:`paser.targets`), encoded in the training template and cut to the token budget; then, where asked, the
original's own samples beside them (:mod:`paser.recovery.generated`). End-to-end and block-wise
read the same :class:`TrainingData`, so the two see the very same tokens.

The fields of :class:`~paser.recovery.config.RecoverConfig` this reads are :data:`TRAINING_DATA_FIELDS`: every
method that calls :func:`training_data` declares them among what it reads (its resume key and stage hash hold them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..data import Encoded, PromptFormatter, encode_records, load_records, pad_right
from ..targets import TARGETS
from .generated import GENERATED_OPTIONS, self_generated

IGNORE_INDEX = -100  # the label of a position no loss reads (prompt and padding): the Trainer's and torch's value

TRAINING_DATA_FIELDS = frozenset({"data", "limit", "bad_records", "template", "cutoff_len", "targets",
                                  "max_train_tokens", "generated_tokens", *GENERATED_OPTIONS})


def within_tokens(encoded: Sequence[Encoded], max_tokens: int) -> tuple[list[Encoded], int]:
    """The longest prefix of ``encoded`` (selection order) whose tokens fit ``max_tokens`` (at least one record),
    and how many records were left out."""
    total, kept = 0, 0
    for e in encoded:
        if total + len(e.input_ids) > max_tokens and kept:
            break
        total += len(e.input_ids)
        kept += 1
    return list(encoded[:kept]), len(encoded) - kept


def labels_for(encoded: Encoded) -> list[int]:
    """Training labels: prompt positions masked, response tokens kept."""
    return [IGNORE_INDEX] * len(encoded.prompt_ids) + list(encoded.response_ids)


class Examples(torch.utils.data.Dataset):
    """The training records as the collator reads them (``record``: the row in the teacher's top-k store)."""

    def __init__(self, encoded: Sequence[Encoded], with_record: bool = False):
        self.items = [{"input_ids": e.input_ids, "labels": labels_for(e), **({"record": i} if with_record else {})}
                      for i, e in enumerate(encoded)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict:
        return self.items[i]


def collate_for_training(features: Sequence[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch; padding gets attention 0 and label -100."""
    ids, attention = pad_right([f["input_ids"] for f in features], pad_id)
    labels, _ = pad_right([f["labels"] for f in features], IGNORE_INDEX)
    batch = {"input_ids": ids, "labels": labels, "attention_mask": attention}
    if "record" in features[0]:  # which records: the teacher cache's rows
        batch["record"] = torch.tensor([f["record"] for f in features])
    return batch


@dataclass
class TrainingData:
    """The encoded training records, what the targets did and cost, and the records left out."""

    encoded: list[Encoded]
    target_info: dict[str, Any]
    skipped: Any


def read_records(config: Any) -> Any:
    """The training records, validated (before any model loads)."""
    return load_records(config.data, limit=config.limit, bad_records=config.bad_records)


def training_data(config: Any, records: Any, tokenizer: Any, dtype: str) -> TrainingData:
    """Records → targets → encodings, cut to ``max_train_tokens`` where given (shared by every recovery method)."""
    skipped = records.skipped
    formatter = PromptFormatter(tokenizer, template=config.template, max_length=config.cutoff_len)
    records, target_info = TARGETS.get(config.targets).build(records, config, tokenizer, dtype)
    records, encoded = encode_records(formatter, records, config.bad_records, skipped)
    if config.max_train_tokens is not None:
        encoded, target_info["dropped_for_token_budget"] = within_tokens(encoded, config.max_train_tokens)
    extra, generated = self_generated(config, encoded, tokenizer, dtype)  # beside the budget: compute, not data
    if generated:
        target_info["generated"] = generated
    return TrainingData([*encoded, *extra], target_info, skipped)
