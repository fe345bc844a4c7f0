"""Response perplexity of instruction data: exp of the mean NLL of the response tokens given the prompt
(the same template as selection and recovery), over every record of each source (``response_ppl``; the
first ``response_ppl_limit`` records; ``response_max_length`` tokens at most). Per-record NLL sums and
token counts are kept for the paired bootstrap.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from ..cache import stable_hash
from ..data import PromptFormatter, load_records
from ..passes import collate, summed_nll
from .base import MEASUREMENTS, EvalContext, LoadedModel, Measurement, Metric, exp_of_first, measured_items, option, short_name
from .text_perplexity import sharded_nll, tokenizer_key


def response_perplexity(model: Any, encoded: Sequence[Any], pad_id: int, batch_size: int = 8,
                        progress: bool = False) -> float:
    """exp(mean NLL of the response tokens given their prompts) over all records."""
    nll, count = response_nll(model, encoded, pad_id, batch_size, progress)
    return math.exp(sum(nll) / max(sum(count), 1))


@torch.no_grad()
def response_nll(model: Any, encoded: Sequence[Any], pad_id: int, batch_size: int = 8,
                 progress: bool = False) -> tuple[list[float], list[int]]:
    """Per record (input order): the summed NLL of its response tokens given the prompt, and their count."""

    sums = [0.0] * len(encoded)
    counts = [0] * len(encoded)
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].input_ids))
    for start in tqdm(range(0, len(order), batch_size), desc="response perplexity", disable=not progress,
                      leave=False):
        rows = order[start:start + batch_size]
        batch_sums, batch_counts = summed_nll(model, *collate([encoded[i] for i in rows], pad_id))
        for row, i in enumerate(rows):
            sums[i], counts[i] = float(batch_sums[row]), int(batch_counts[row])
    return sums, counts


def encoded_records(ctx: EvalContext, model: LoadedModel, source: str, records: Sequence[Any]) -> list[Any]:
    """The records of one source encoded for this model's tokenizer, built once for all models."""
    key = ("encoded", tokenizer_key(model.tokenizer), source)
    if key not in ctx.caches:
        formatter = PromptFormatter(model.tokenizer, max_length=ctx.config.response_max_length)
        ctx.caches[key] = formatter.encode_all(records)
    return ctx.caches[key]


@dataclass
class ResponsePerplexityOptions:
    response_ppl: list[str] = option(factory=list, help=
        "Instruction data whose response perplexity to measure (repeatable), e.g. demo-heldout.")
    response_ppl_limit: Annotated[int, Field(ge=1)] | None = option(None,
        "Use the first N records of each --response-ppl source.")
    response_max_length: Annotated[int, Field(ge=2)] = option(512,
        "--response-ppl, --fidelity-prompts: tokens per record at most (prompt + response).")
    bad_records: Literal["skip", "error"] = option("skip",
        "--response-ppl, --fidelity-prompts sources: skip unusable records (reported) | error: stop at the first.")


@MEASUREMENTS.register("response_perplexity")
class ResponsePerplexity(Measurement):
    """Perplexity of reference answers (``response_ppl``, ``response_ppl_limit``, ``response_max_length``)."""

    key = "response_perplexity"
    cache_kind = "response"
    data_sources = ("response_ppl",)
    options = ResponsePerplexityOptions

    def enabled(self, config: Any) -> bool:
        return bool(config.response_ppl)

    def prepare(self, ctx: EvalContext) -> list[str]:
        config = ctx.config
        ctx.inputs[self.name] = {src: load_records(src, limit=config.response_ppl_limit, bad_records=config.bad_records)
                                 for src in config.response_ppl}
        return list(config.response_ppl)

    def settings(self, ctx: EvalContext, item: str) -> dict[str, Any]:
        records = ctx.inputs[self.name][item]
        return {"data": stable_hash([(r.instruction, r.input, r.output) for r in records]),
                "max_length": ctx.config.response_max_length}

    def measure(self, ctx: EvalContext, model: LoadedModel, item: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        records = ctx.inputs[self.name][item]
        encoded = encoded_records(ctx, model, item, records)
        pad = model.tokenizer.pad_token_id
        nll, count = sharded_nll(lambda part: response_nll(model.model, part, pad, ctx.config.batch_size,
                                                           progress=True), encoded,
                                 [len(e.input_ids) for e in encoded])
        return {"ppl": math.exp(sum(nll) / max(sum(count), 1)), "records": len(records),
                "seconds": round(time.perf_counter() - t0, 2), "items": {"nll": nll, "tokens": count}}

    def results_info(self, ctx: EvalContext, items: list[str]) -> dict[str, Any]:
        return {"response_ppl_files": items}

    def columns(self, results: dict) -> list[str]:
        return [f"response ppl {short_name(p)}" for p in results.get("response_ppl_files") or []]

    def cells(self, results: dict, entry: dict) -> list[str]:
        return [f"{entry['response_perplexity'][p]['ppl']:.2f}" for p in results.get("response_ppl_files") or []]

    def metrics(self, results: dict) -> list[Metric]:
        return [Metric(f"response ppl {short_name(source)}", ((self.key, source, "nll", "tokens"),), False, exp_of_first)
                for source in measured_items(results, self.key)]
