"""``original``: self-distilled targets, the original model's own answers to the selected prompts.

Recovery restores what pruning took from *this* model, so it trains toward what the original model says
(Self-Data Distillation, Thangarasa et al. 2024, arXiv 2410.09982) rather than toward answers other models
and people wrote. The original (``teacher``, or the model ``paser prune`` recorded) answers each prompt in the
training template:

- greedy by default (``target_do_sample`` with ``target_temperature`` / ``target_top_p`` to sample), at most
  ``target_max_new_tokens`` new tokens (default ``cutoff_len``, so the training cutoff, not generation, decides
  where a long answer ends);
- batched (``target_batch_size``), with a progress bar;
- cached per prompt under ``$PASER_CACHE/targets/``, keyed by the original's weights, the dtype and the generation
  settings: a killed run resumes where it stopped, and another selection that shares prompts reuses them;
- an **empty** answer (the original ends at once) keeps the record's reference answer, since an empty target
  teaches nothing but to stop; a **truncated** one (no end token within the limit) is kept as it is, and the
  end-of-sequence token is still appended in training like for every target. Both are counted.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import torch
from pydantic import Field

from .. import distributed
from ..cache import cache_root, stable_hash
from ..data import PromptFormatter, Record
from ..errors import ConfigError
from ..generate import generate
from ..models import check_compatible, load_model, model_fingerprint
from ..options import option
from .base import TARGETS, Target

log = logging.getLogger(__name__)


def _read_answers(path: Path) -> dict[str, dict[str, Any]]:
    """Answers stored so far, by prompt key (a line cut by a kill is ignored)."""
    answers: dict[str, dict[str, Any]] = {}
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
                answers[row["prompt"]] = row
            except (ValueError, KeyError, TypeError):
                continue
    return answers


@dataclass
class OriginalAnswersOptions:
    target_max_new_tokens: Annotated[int, Field(ge=1)] | None = option(
        None, "original targets: new tokens at most (default: --cutoff-len).")
    target_do_sample: bool = option(
        False, "original targets: sample (--target-temperature, --target-top-p) instead of greedy decoding.")
    target_temperature: Annotated[float, Field(gt=0)] = option(1.0, "original targets with --target-do-sample: temperature.")
    target_top_p: Annotated[float, Field(gt=0, le=1)] = option(1.0, "original targets with --target-do-sample: nucleus top-p.")
    target_batch_size: Annotated[int, Field(ge=1)] = option(16, "original targets: prompts per generation batch.")


@dataclass
class AnswerSettings(OriginalAnswersOptions):
    """Everything :meth:`OriginalAnswers.build` reads: a recovery config has these fields; another caller (fidelity's
    held-out answers) builds one."""

    teacher: str | None = None
    cutoff_len: int = 256
    template: str = "auto"
    seed: int = 0


@TARGETS.register("original")
class OriginalAnswers(Target):
    """The original model's own answers to the prompts, generated once and cached."""
    needs_original = True
    keeps_answers = False
    options = OriginalAnswersOptions
    reads = frozenset({"teacher", "cutoff_len", "template", "seed"})

    def build(self, records: Sequence[Record], settings: Any, tokenizer: Any, dtype: str
              ) -> tuple[list[Record], dict[str, Any]]:
        original_spec = settings.teacher
        if not original_spec:
            raise ConfigError("targets 'original' needs the original model (--teacher, or a pruned folder whose "
                              "prune_report.json names it)")
        max_new = settings.target_max_new_tokens or settings.cutoff_len
        generation = {"max_new_tokens": max_new, "do_sample": settings.target_do_sample,
                      "temperature": settings.target_temperature, "top_p": settings.target_top_p,
                      "template": settings.template}
        formatter = PromptFormatter(tokenizer, template=settings.template, max_length=None)
        prompts = [formatter.prompt_ids(r) for r in records]
        keys = [stable_hash(p) for p in prompts]
        store = cache_root() / "targets" / stable_hash("original-answers-v1", model_fingerprint(original_spec), dtype,
                                                       generation) / "answers.jsonl"
        answers = _read_answers(store)
        missing = sorted({k: i for i, k in enumerate(keys) if k not in answers}.values())
        t0 = time.perf_counter()
        if missing and distributed.is_main():
            log.info("targets: the original model answers %d prompts (%d cached)", len(missing),
                     len(records) - len(missing))
            model, original_tokenizer = load_model(original_spec, dtype=dtype, device=distributed.device())
            check_compatible(tokenizer, original_tokenizer, None, None)
            store.parent.mkdir(parents=True, exist_ok=True)
            if settings.target_do_sample:
                torch.manual_seed(settings.seed)

            def keep(indices: list[int], batch: list[Any]) -> None:
                rows = [{"prompt": keys[missing[i]], "text": a.text, "tokens": a.tokens, "finished": a.finished}
                        for i, a in zip(indices, batch)]
                with store.open("a", encoding="utf-8") as handle:  # one whole line per answer: resumable
                    handle.write("".join(json.dumps(r) + "\n" for r in rows))
                for row in rows:
                    answers[row["prompt"]] = row

            generate(model.eval(), tokenizer, [prompts[i] for i in missing], max_new, settings.target_batch_size,
                     settings.target_do_sample, settings.target_temperature, settings.target_top_p, progress=True,
                     on_batch=keep)
            del model
        distributed.barrier()
        if not distributed.is_main():
            answers = _read_answers(store)
        seconds = time.perf_counter() - t0
        out, empty, truncated, tokens = _answered(records, keys, answers)
        return out, {"targets": "original", "original": str(original_spec), "generation": generation,
                     "generated_records": len(missing), "cached_records": len(records) - len(missing),
                     "generated_tokens": int(sum(answers[keys[i]]["tokens"] for i in missing)),
                     "target_tokens": tokens, "generation_seconds": round(seconds, 2),
                     "empty_kept_reference": empty, "truncated": truncated, "cache": str(store)}


def _answered(records: Sequence[Record], keys: list[str], answers: dict[str, dict]
              ) -> tuple[list[Record], int, int, int]:
    """Each record with the original's answer as its output (an empty answer keeps the reference); with how many
    were empty, cut at the token limit, and the answers' tokens."""
    out, empty, truncated, tokens = [], 0, 0, 0
    for record, key in zip(records, keys):
        answer = answers[key]
        if not answer["text"].strip():
            empty += 1
            out.append(record)
            continue
        truncated += not answer["finished"]
        tokens += answer["tokens"]
        out.append(replace(record, output=answer["text"]))
    return out, empty, truncated, tokens
