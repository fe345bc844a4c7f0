"""Demo skills: greedy answers to the held-out demo questions, exact match after
:func:`paser.demo_data.normalize_answer` (first non-empty line, lower case, surrounding quotes, backticks
and a final period stripped, runs of spaces collapsed); accuracy per skill and their mean.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import Field

from .. import distributed
from ..data import Record, iter_dict_records
from ..demo_data import SKILLS, demo_records, normalize_answer
from ..generate import generate_answers
from .base import MEASUREMENTS, EvalContext, LoadedModel, Measurement, option


def skill_accuracy(records: Sequence[Record], answers: Sequence[str]) -> dict[str, dict[str, float]]:
    """Exact match per skill after :func:`paser.demo_data.normalize_answer`; ``records`` carry
    ``skill`` and ``answer`` in ``raw``. Returns ``{skill: {"acc", "n"}}`` plus ``"mean"`` over skills."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for record, answer in zip(records, answers, strict=True):
        hits[record.raw["skill"]].append(normalize_answer(answer) == normalize_answer(record.raw["answer"]))
    table = {skill: {"acc": sum(h) / len(h), "n": len(h)} for skill, h in sorted(hits.items())}
    table["mean"] = {"acc": sum(v["acc"] for v in table.values()) / len(table), "n": len(records)}
    return table


def demo_heldout(per_skill: int | None = None, seed: int = 0) -> list[Record]:
    """The built-in held-out demo questions, the first ``per_skill`` of every skill (all when None)."""

    heldout = demo_records(seed)["heldout"]
    chosen = [r for skill in SKILLS for r in [x for x in heldout if x["skill"] == skill][:per_skill]]
    return list(iter_dict_records(chosen, source="demo heldout"))


@dataclass
class DemoSkillsOptions:
    demo_skills: bool = option(False, "Exact-match accuracy per skill on the built-in held-out demo set.")
    demo_questions: Annotated[int, Field(ge=1)] | None = option(None, "Held-out demo questions per skill (default: all 40).")


@MEASUREMENTS.register("demo_skills")
class DemoSkills(Measurement):
    """Exact match on the held-out demo questions (``demo_skills``, ``demo_questions``)."""

    key = "demo_skills"
    cache_kind = "demo"
    options = DemoSkillsOptions

    def enabled(self, config: Any) -> bool:
        return bool(config.demo_skills)

    def prepare(self, ctx: EvalContext) -> list[str]:
        ctx.inputs[self.name] = demo_heldout(ctx.config.demo_questions)
        return [""]

    def settings(self, ctx: EvalContext, item: str) -> dict[str, Any]:
        return {"questions": ctx.config.demo_questions}

    def measure(self, ctx: EvalContext, model: LoadedModel, item: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        demo = ctx.inputs[self.name]
        answers = distributed.map_sharded(demo, lambda part: generate_answers(
            model.model, model.tokenizer, part, max_new_tokens=24, batch_size=ctx.config.batch_size * 4))
        shown: dict[str, int] = defaultdict(int)
        examples = []  # what exact match saw, two per skill
        for record, answer in zip(demo, answers):
            if shown[record.raw["skill"]] < 2:
                shown[record.raw["skill"]] += 1
                examples.append({"skill": record.raw["skill"], "question": record.user_text,
                                 "reference": record.raw["answer"], "answer": answer})
        return {"demo_skills": skill_accuracy(demo, answers), "demo_answer_examples": examples,
                "demo_skills_seconds": round(time.perf_counter() - t0, 2)}

    def store(self, entry: dict[str, Any], item: str, value: dict[str, Any]) -> None:
        entry.update(value)

    def summary(self, value: dict[str, Any]) -> Any:
        return "done"

    def results_info(self, ctx: EvalContext, items: list[str]) -> dict[str, Any]:
        return {"demo_skills": True}

    def columns(self, results: dict) -> list[str]:
        return ["demo skills acc"] if results.get("demo_skills") else []

    def cells(self, results: dict, entry: dict) -> list[str]:
        return [f"{100 * entry['demo_skills']['mean']['acc']:.2f}"] if results.get("demo_skills") else []
