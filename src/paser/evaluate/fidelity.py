"""Fidelity to the original model: how close a pruned or recovered model's next-token distributions are to
the uncompressed model it came from (Dutta et al. 2024, arXiv 2407.09141: KL and flips, not accuracy alone).

Two kinds of items: (a) every window of the perplexity texts (``ppl``, ``ppl_seqlen``, ``ppl_windows``: the
same windows as text perplexity), at every position; (b) held-out prompts (``fidelity_prompts``: instruction data
sources, the first ``fidelity_prompts_limit`` records) answered by the original model itself, greedily, at most
``fidelity_max_new_tokens`` tokens (generated once and cached like self-distilled targets,
:mod:`paser.targets.original`), at the answer's positions: how far a model is from the original on the
original's own answers. Prompts the original answers with nothing are left out. For both:

- mean per-token ``KL(original || model)`` over the whole vocabulary (exact; both models resident, one decoder
  pass each; lower is better; the original against itself is 0);
- top-1 agreement: the share of positions where both models' most likely next token is the same;
- in comparisons, the **share of the pruned model's KL that a model removed**,
  ``(KL_pruned - KL_model) / (KL_pruned - KL_original)`` with the dense and pruned models as references.

For models too large to hold two at once, ``fidelity_topk: k`` stores the original's top-k log-probabilities and
tail mass at every position once (cached by original, items, k and dtype; :mod:`paser.teacher`), then measures
each model alone against the store: the KL becomes ``KL_b`` over the k + 1 buckets (the top k and the tail), a
lower bound, ``KL = KL_b + p_T KL(p~ || q~)`` with ``p_T`` the original's mass outside its top k (exact at
k = vocabulary size; the gap is not bounded in general, so k should cover most of the mass; the measured
tail mass is reported as ``tail_mass``); top-1 agreement stays exact.

Per-item sums (KL, agreements, positions) are kept, so the paired bootstrap resamples windows and prompts like it
does for perplexity. Settings: ``fidelity_to`` (the original model; ``paser run`` passes its ``model`` and its
held-out answers' sources as prompts).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import numpy as np
from pydantic import Field

from .. import distributed
from ..cache import cache_root, file_fingerprint, stable_hash
from ..data import Encoded, PromptFormatter, load_records, pad_right
from ..errors import ConfigError
from ..models import check_compatible, load_model, model_fingerprint
from ..passes import collate, fidelity_sums, next_token_positions
from ..targets import TARGETS
from ..targets.original import AnswerSettings
from ..teacher import fidelity_against_store, stored_topk
from .base import MEASUREMENTS, EvalContext, LoadedModel, Measurement, Metric, first, measured_items, option, short_name
from .text_perplexity import evaluation_windows, sharded_nll


@dataclass
class FidelityOptions:
    fidelity_to: str | None = option(None,
        "The original model: per-token KL(original || model) and top-1 agreement on the --ppl windows and on "
        "--fidelity-prompts (exact over the vocabulary; both models resident).")
    fidelity_prompts: list[str] = option(factory=list, help=
        "--fidelity-to: held-out prompts (instruction data; repeatable) that the original answers greedily, "
        "once, cached; fidelity is measured on its answers.")
    fidelity_prompts_limit: Annotated[int, Field(ge=1)] | None = option(None,
        "--fidelity-prompts: the first N records of each source.")
    fidelity_max_new_tokens: Annotated[int, Field(ge=1)] = option(128,
        "--fidelity-prompts: the original's answers, new tokens at most.")
    fidelity_topk: Annotated[int, Field(ge=1)] | None = option(None,
        "--fidelity-to for models too large to hold two: the original's top-k log-probs stored once, each "
        "model measured alone; KL over the top k and the tail (a lower bound of the exact KL), top-1 "
        "agreement exact.")


@MEASUREMENTS.register("fidelity")
class Fidelity(Measurement):
    """KL to the original and top-1 agreement on the perplexity texts' windows."""

    options = FidelityOptions
    pipeline_options: ClassVar[dict[str, Any]] = {"fidelity": True}
    data_sources = ("fidelity_prompts",)

    def pipeline_settings(self, settings: dict[str, Any], original: str, final: bool) -> None:
        """Fidelity to the run's model unless ``fidelity: false``: on the perplexity texts' windows and on the
        original's answers to the held-out prompts (the ``response_ppl`` sources, as many records as
        ``response_ppl_limit`` takes, unless ``fidelity_prompts`` names some)."""
        fidelity = settings.pop("fidelity")
        if fidelity and not settings["fidelity_prompts"]:
            settings["fidelity_prompts"] = list(settings["response_ppl"])
            if settings["fidelity_prompts_limit"] is None:
                settings["fidelity_prompts_limit"] = settings["response_ppl_limit"]
        if not fidelity:
            settings["fidelity_prompts"] = []
        settings["fidelity_to"] = original if fidelity and (settings["ppl"] or settings["fidelity_prompts"]) else None

    key = "fidelity"

    def enabled(self, config: Any) -> bool:
        return bool(config.fidelity_to)

    def validate(self, config: Any) -> None:
        if not (config.ppl or config.fidelity_prompts):
            raise ConfigError("fidelity to the original is measured on the perplexity texts or on held-out prompts: "
                              "give --ppl or --fidelity-prompts as well")

    def prepare(self, ctx: EvalContext) -> list[str]:
        config = ctx.config
        ctx.inputs["fidelity_prompts"] = {
            source: load_records(source, limit=config.fidelity_prompts_limit, bad_records=config.bad_records)
            for source in config.fidelity_prompts}
        return [*config.ppl, *config.fidelity_prompts]

    def _generation(self, ctx: EvalContext) -> Any:
        """The original's greedy answers, generated and cached like the self-distilled targets."""

        return AnswerSettings(teacher=ctx.config.fidelity_to, target_max_new_tokens=ctx.config.fidelity_max_new_tokens,
                              cutoff_len=ctx.config.response_max_length, target_batch_size=ctx.config.batch_size * 2)

    def settings(self, ctx: EvalContext, item: str) -> dict[str, Any]:
        original = {"original": model_fingerprint(ctx.config.fidelity_to),
                    **({"topk": ctx.config.fidelity_topk} if ctx.config.fidelity_topk else {})}
        if item in ctx.inputs["fidelity_prompts"]:
            records = ctx.inputs["fidelity_prompts"][item]
            return {**original, "prompts": stable_hash([(r.instruction, r.input) for r in records]),
                    "max_new_tokens": ctx.config.fidelity_max_new_tokens, "max_length": ctx.config.response_max_length}
        return {**original, "file": file_fingerprint(item), "seqlen": ctx.config.ppl_seqlen,
                "windows": ctx.config.ppl_windows}

    def _original(self, ctx: EvalContext, model: LoadedModel) -> Any:
        if self.name not in ctx.inputs:
            ctx.inputs[self.name] = self._load_original(ctx, model)
        return ctx.inputs[self.name]

    def _load_original(self, ctx: EvalContext, model: LoadedModel) -> Any:
        original, tokenizer = load_model(ctx.config.fidelity_to, dtype=ctx.dtype, device=distributed.device())
        check_compatible(model.tokenizer, tokenizer, original, model.model)
        return original.eval()

    def _store(self, ctx: EvalContext, model: LoadedModel, item: str, encoded: list[Any]) -> Any:
        """The original's top-k store over ``encoded``: computed once (the original resident only for it)."""
        key = ("fidelity-topk", item)
        if key not in ctx.caches:
            ctx.caches[key] = stored_topk(model_fingerprint(ctx.config.fidelity_to),
                                          lambda: self._load_original(ctx, model), encoded,
                                          model.tokenizer.pad_token_id, ctx.config.fidelity_topk, ctx.dtype, cache_root())
        return ctx.caches[key]

    def _answered(self, ctx: EvalContext, model: LoadedModel, source: str) -> list[Any]:
        """The held-out prompts with the original's own answers, encoded (built once for all models)."""

        key = ("fidelity-answers", source)
        if key not in ctx.caches:
            records = ctx.inputs["fidelity_prompts"][source]
            answered, _ = TARGETS.get("original").build(records, self._generation(ctx), model.tokenizer, ctx.dtype)
            answered = [a for a, r in zip(answered, records) if a is not r]  # the original said nothing: left out
            ctx.caches[key] = PromptFormatter(model.tokenizer, max_length=ctx.config.response_max_length
                                              ).encode_all(answered)
        return ctx.caches[key]

    def measure(self, ctx: EvalContext, model: LoadedModel, item: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        if item in ctx.inputs["fidelity_prompts"]:  # the original's answers, at their positions
            items, count, batch = self._answered(ctx, model, item), "records", ctx.config.batch_size
            pad = model.tokenizer.pad_token_id

            def inputs(part: list[Any]) -> tuple[Any, Any, Any]:
                return collate(part, pad)[:3]
        else:  # perplexity windows, every position
            items, count, batch = evaluation_windows(ctx, model, item), "windows", max(1, ctx.config.batch_size // 4)

            def inputs(part: list[Any]) -> tuple[Any, Any, Any]:
                ids, mask = pad_right(part, 0)
                return ids, mask, next_token_positions(mask)

        if ctx.config.fidelity_topk:
            return self._measure_against_store(ctx, model, item, items, count, batch, t0)
        original = self._original(ctx, model)

        def sums(part: list[Any]) -> tuple[list[tuple[float, float]], list[int]]:
            rows: list[tuple[float, float]] = []
            counts: list[int] = []
            for start in range(0, len(part), batch):
                kl, agree, n = fidelity_sums(original, model.model, *inputs(part[start:start + batch]))
                rows += list(zip(kl.tolist(), agree.tolist()))
                counts += n.tolist()
            return rows, counts

        pairs, tokens = sharded_nll(sums, items, [len(getattr(x, "input_ids", x)) for x in items])
        kl, agree = [p[0] for p in pairs], [p[1] for p in pairs]
        total = max(sum(tokens), 1)
        return {"kl": sum(kl) / total, "top1_agreement": sum(agree) / total, count: len(items),
                "seconds": round(time.perf_counter() - t0, 2), "items": {"kl": kl, "agree": agree, "tokens": tokens}}

    def _measure_against_store(self, ctx: EvalContext, model: LoadedModel, item: str, items: list[Any], count: str,
                               batch: int, t0: float) -> dict[str, Any]:
        # a window predicts every token after its first: its first token is the "prompt", the rest the "response"
        encoded = items if count == "records" else [Encoded(list(w[:1]), list(w[1:])) for w in items]
        store = self._store(ctx, model, item, encoded)
        pad = model.tokenizer.pad_token_id

        def sums(part: list[int]) -> tuple[list[tuple[float, float]], list[int]]:
            rows: list[tuple[float, float]] = []
            counts: list[int] = []
            for start in range(0, len(part), batch):
                positions = part[start:start + batch]
                kl, agree, n = fidelity_against_store(model.model, store, [encoded[i] for i in positions], positions, pad)
                rows += list(zip(kl.tolist(), agree.tolist()))
                counts += n.tolist()
            return rows, counts

        pairs, tokens = sharded_nll(sums, list(range(len(encoded))), [len(e.input_ids) for e in encoded])
        kl, agree = [p[0] for p in pairs], [p[1] for p in pairs]
        total = max(sum(tokens), 1)
        tail = float(np.exp(store.log_tail.astype(np.float64)).mean()) if len(store.log_tail) else 0.0
        return {"kl": sum(kl) / total, "top1_agreement": sum(agree) / total, count: len(items),
                "topk": ctx.config.fidelity_topk, "tail_mass": tail,
                "seconds": round(time.perf_counter() - t0, 2), "items": {"kl": kl, "agree": agree, "tokens": tokens}}

    def results_info(self, ctx: EvalContext, items: list[str]) -> dict[str, Any]:
        return {"fidelity_to": ctx.config.fidelity_to, "fidelity_files": items}

    def columns(self, results: dict) -> list[str]:
        files = results.get("fidelity_files") or []
        return [c for p in files for c in (f"KL to original {short_name(p)}", f"top-1 agree {short_name(p)}")]

    def cells(self, results: dict, entry: dict) -> list[str]:
        return [c for p in results.get("fidelity_files") or []
                for c in (f"{entry['fidelity'][p]['kl']:.4f}", f"{100 * entry['fidelity'][p]['top1_agreement']:.2f}")]

    def metrics(self, results: dict) -> list[Metric]:
        out = []
        for path in measured_items(results, self.key):
            name = short_name(path)
            out.append(Metric(f"KL removed {name}", ((self.key, path, "kl", "tokens"),), True, first, share_of_gap=True))
            out.append(Metric(f"KL to original {name}", ((self.key, path, "kl", "tokens"),), False, first))
            out.append(Metric(f"top-1 agree {name}", ((self.key, path, "agree", "tokens"),), True, first))
        return out
