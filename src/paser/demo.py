"""``paser demo``: the embedded default model on the built-in demo data."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .data import iter_dict_records
from .demo_data import SKILLS, demo_records, export_demo_data, normalize_answer
from .evaluate import generate_answers
from .models import DEFAULT_MODEL, load_model

log = logging.getLogger(__name__)


def run_quick_demo(out: str | Path, seed: int = 0, questions_per_skill: int = 2) -> dict:
    """Load the embedded model, export the demo data into ``out`` and answer held-out questions.

    Returns ``{"load_seconds", "data": {split: path}, "answers": [...]}``.
    """
    out = Path(out)
    paths = export_demo_data(out / "data", seed=seed)
    t0 = time.perf_counter()
    model, tokenizer = load_model(DEFAULT_MODEL, dtype="fp32")
    load_seconds = time.perf_counter() - t0
    heldout = demo_records(seed)["heldout"]
    chosen = [r for skill in SKILLS for r in [x for x in heldout if x["skill"] == skill][:questions_per_skill]]
    records = list(iter_dict_records(chosen, source="demo heldout"))
    answers = generate_answers(model, tokenizer, records, max_new_tokens=24, batch_size=len(records))

    table = Table(title=f"{DEFAULT_MODEL} (dense) on held-out demo questions")
    for column in ("skill", "question", "reference", "model answer", "ok"):
        table.add_column(column, overflow="fold")
    rows = []
    for record, answer in zip(records, answers):
        ok = normalize_answer(answer) == normalize_answer(record.raw["answer"])
        rows.append({"skill": record.raw["skill"], "question": record.user_text, "answer": answer, "correct": ok})
        table.add_row(record.raw["skill"], record.user_text, record.raw["answer"], answer.strip(), "yes" if ok else "no")
    console = Console()
    console.print(table)
    console.print(f"model loaded in {load_seconds:.1f} s; demo data written to {paths['train'].parent}")
    console.print("The full prune -> select -> recover -> evaluate demo arrives with 'paser run' (issue 5).")
    return {"load_seconds": load_seconds, "data": paths, "answers": rows}
