"""Text perplexity (the WikiText-2 protocol of Wanda/SparseGPT): the whole file tokenised once, cut into
non-overlapping windows of ``ppl_seqlen`` tokens (the remainder dropped; ``ppl_windows``: the first N),
exp of the mean token NLL. Per-window NLL sums and token counts are kept for the paired bootstrap, and the
comparison also reports the share of the pruned model's perplexity gap to the dense one that a model closed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar

from pydantic import Field

from .. import distributed
from ..cache import file_fingerprint
from ..errors import ConfigError
from ..passes import sequence_nll
from .base import MEASUREMENTS, EvalContext, LoadedModel, Measurement, Metric, exp_of_first, measured_items, option, short_name

log = logging.getLogger(__name__)


def text_windows(tokenizer: Any, text: str, seqlen: int) -> list[list[int]]:
    """Non-overlapping windows of ``seqlen`` tokens over the whole text; the short remainder is dropped."""
    ids = tokenizer(text)["input_ids"]
    windows = [ids[i:i + seqlen] for i in range(0, len(ids) - seqlen + 1, seqlen)]
    if not windows:
        raise ConfigError(f"text has {len(ids)} tokens, fewer than one window of {seqlen}")
    return windows


def tokenizer_key(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def evaluation_windows(ctx: EvalContext, model: LoadedModel, path: str) -> list[list[int]]:
    """The windows of one perplexity text for this model (its tokenizer, its context length), built once."""
    config = ctx.config
    max_positions = getattr(model.model.config, "max_position_embeddings", None) or config.ppl_seqlen
    seqlen = min(config.ppl_seqlen, max_positions)
    key = ("windows", tokenizer_key(model.tokenizer), path, seqlen)
    if key not in ctx.caches:
        ctx.caches[key] = text_windows(model.tokenizer, Path(path).read_text(encoding="utf-8"), seqlen)
    return ctx.caches[key][:config.ppl_windows] if config.ppl_windows else ctx.caches[key]


def sharded_nll(measure: Any, items: Sequence[Any], lengths: Sequence[int] | None = None,
                ) -> tuple[list[float], list[int]]:
    """Per-item (NLL sum, token count) from ``measure`` over each rank's share of ``items``, in input order."""

    def pairs(part: list[Any]) -> list[tuple[float, int]]:
        nll, count = measure(part)
        return list(zip(nll, count))

    merged = distributed.map_sharded(items, pairs, lengths)
    return [p[0] for p in merged], [p[1] for p in merged]


@dataclass
class TextPerplexityOptions:
    ppl: list[str] = option(factory=list, help="Plain text file to measure perplexity on (repeatable).")
    ppl_seqlen: Annotated[int, Field(ge=2)] = option(1024, "Perplexity window length in tokens (capped at the model's maximum).")
    ppl_windows: Annotated[int, Field(ge=1)] | None = option(None, "--ppl: the first N windows of each text (default: all).")


@MEASUREMENTS.register("perplexity")
class TextPerplexity(Measurement):
    """Perplexity of plain text files (``ppl``, ``ppl_seqlen``, ``ppl_windows``)."""

    key = "perplexity"
    cache_kind = "ppl"
    pipeline_options: ClassVar[dict[str, Any]] = {"skip_missing_ppl": False}

    def pipeline_settings(self, settings: dict[str, Any], original: str, final: bool) -> None:
        if settings.pop("skip_missing_ppl"):
            missing = [path for path in settings["ppl"] if not Path(path).is_file()]
            if missing and final:
                log.warning("perplexity text(s) %s skipped: not found", ", ".join(missing))
            settings["ppl"] = [path for path in settings["ppl"] if path not in missing]
    options = TextPerplexityOptions

    def enabled(self, config: Any) -> bool:
        return bool(config.ppl)

    def validate(self, config: Any) -> None:
        for path in config.ppl:
            if not Path(path).is_file():
                raise ConfigError(f"perplexity text file not found: {path}")

    def prepare(self, ctx: EvalContext) -> list[str]:
        return list(ctx.config.ppl)

    def settings(self, ctx: EvalContext, item: str) -> dict[str, Any]:
        return {"file": file_fingerprint(item), "seqlen": ctx.config.ppl_seqlen, "windows": ctx.config.ppl_windows}

    def measure(self, ctx: EvalContext, model: LoadedModel, item: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        windows = evaluation_windows(ctx, model, item)
        batch = max(1, ctx.config.batch_size // 4)
        nll, count = sharded_nll(lambda part: sequence_nll(model.model, part, batch, progress=True), windows)
        return {"ppl": math.exp(sum(nll) / max(sum(count), 1)), "windows": len(windows), "seqlen": len(windows[0]),
                "seconds": round(time.perf_counter() - t0, 2), "items": {"nll": nll, "tokens": count}}

    def results_info(self, ctx: EvalContext, items: list[str]) -> dict[str, Any]:
        return {"ppl_files": items, "ppl_seqlen": ctx.config.ppl_seqlen, "ppl_windows": ctx.config.ppl_windows}

    def columns(self, results: dict) -> list[str]:
        return [f"ppl {short_name(p)}" for p in results.get("ppl_files") or []]

    def cells(self, results: dict, entry: dict) -> list[str]:
        return [f"{entry['perplexity'][p]['ppl']:.2f}" for p in results.get("ppl_files") or []]

    def metrics(self, results: dict) -> list[Metric]:
        out = []
        for path in measured_items(results, self.key):
            part = ((self.key, path, "nll", "tokens"),)
            out.append(Metric(f"ppl {short_name(path)}", part, False, exp_of_first))
            out.append(Metric(f"ppl gap recovered {short_name(path)}", part, True, exp_of_first, share_of_gap=True))
        return out
