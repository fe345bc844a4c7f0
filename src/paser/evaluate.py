"""Evaluation: zero-shot tasks through lm-evaluation-harness, perplexity, and the built-in demo skills.

- Zero-shot multiple choice (``boolq piqa hellaswag winogrande arc_easy arc_challenge openbookqa``):
  with ``task_dir``, the package's task configs (``paser/tasks/<task>.yaml``) read ``<task_dir>/<task>.jsonl``
  offline as lm-eval tasks named ``paser_<task>``; without it, lm-eval's own hub tasks of the same names.
  Metrics: acc and acc_norm with their standard errors, and n.
- Text perplexity (WikiText-2 protocol of Wanda/SparseGPT): the whole file tokenised once, cut into
  non-overlapping windows of ``ppl_seqlen`` tokens (the remainder dropped), exp of the mean token NLL.
- Response perplexity of instruction data: exp of the mean NLL of response tokens given the prompt
  (same template as selection and recovery).
- Demo skills: greedy answers to the held-out demo questions, exact match after
  :func:`paser.demo_data.normalize_answer` (first non-empty line, lower case, surrounding quotes,
  backticks and a final period stripped, runs of spaces collapsed).

Each model is loaded once; tasks, tokenised text and encoded records are built once for all models.
"""

from __future__ import annotations

import json
import logging
import math
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from . import faults
from .cache import package_versions, stable_hash, write_json, write_text
from .data import PromptFormatter, Record, load_records, pad_right
from .demo_data import SKILLS, demo_records, normalize_answer
from .errors import ConfigError, DataError

log = logging.getLogger(__name__)

ZERO_SHOT_TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
LOCAL_TASK_PREFIX = "paser_"
REQUIRED_FIELDS = {task: ("question", "choices", "label") for task in ZERO_SHOT_TASKS}
REQUIRED_FIELDS["boolq"] = ("question", "choices", "label", "context")
REQUIRED_FIELDS["winogrande"] = ("choices", "label", "context_options", "continuation")
# The metric each task shows in the table (LLM-Pruner/Wanda convention); results.json keeps both.
TABLE_METRIC = {"boolq": "acc", "piqa": "acc", "winogrande": "acc", "hellaswag": "acc_norm",
                "arc_easy": "acc", "arc_challenge": "acc_norm", "openbookqa": "acc_norm"}


@dataclass
class EvaluateConfig:
    """What to measure; defaults are the CLI's."""

    models: list[str]
    out: str | Path = "results.json"
    tasks: list[str] = field(default_factory=lambda: list(ZERO_SHOT_TASKS))
    task_dir: str | Path | None = None  # one <task>.jsonl per task; None: lm-eval's hub tasks
    limit: int | None = None  # examples per task
    ppl: list[str] = field(default_factory=list)  # plain text files
    ppl_seqlen: int = 1024
    ppl_windows: int | None = None  # the first N windows of each perplexity text (None: all)
    response_ppl: list[str] = field(default_factory=list)  # instruction data sources
    response_ppl_limit: int | None = None  # the first N records of each source (None: all)
    response_max_length: int = 512
    demo_skills: bool = False
    demo_questions: int | None = None  # held-out questions per skill (None: all)
    batch_size: int = 8
    dtype: str = "auto"
    labels: list[str] | None = None  # display names for the table (default: the model specs)
    bad_records: str = "skip"  # unusable records in --response-ppl sources: skip (reported) | error

    def validate(self) -> None:
        """Check everything that does not need a model: task names and files, text files, numbers."""
        if not self.models:
            raise ConfigError("name at least one model to evaluate")
        if self.labels is not None and len(self.labels) != len(self.models):
            raise ConfigError(f"{len(self.labels)} labels for {len(self.models)} models")
        unknown = [t for t in self.tasks if t not in ZERO_SHOT_TASKS]
        if unknown:
            raise ConfigError(f"unknown task(s) {', '.join(unknown)}; known: {', '.join(ZERO_SHOT_TASKS)}")
        for name in ("limit", "response_ppl_limit", "demo_questions", "ppl_windows"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1, not {value}")
        if self.ppl_seqlen < 2 or self.batch_size < 1:
            raise ConfigError("ppl_seqlen must be >= 2 and batch_size >= 1")
        if self.task_dir is not None:
            for task in self.tasks:
                check_task_file(Path(self.task_dir) / f"{task}.jsonl", task)
        for path in self.ppl:
            if not Path(path).is_file():
                raise ConfigError(f"perplexity text file not found: {path}")
        if self.bad_records not in ("skip", "error"):
            raise ConfigError(f"bad_records must be skip or error, not '{self.bad_records}'")
        if not (self.tasks or self.ppl or self.response_ppl or self.demo_skills):
            raise ConfigError("nothing to evaluate: give tasks, --ppl, --response-ppl or --demo-skills")


# ------------------------------------------------------------------------------------ zero-shot tasks
def check_task_file(path: Path, task: str) -> int:
    """Validate a local task file; the first bad record is named by line and field. Returns the row count."""
    if not path.is_file():
        raise ConfigError(f"task '{task}': {path} not found (task_dir needs one <task>.jsonl per task)")
    rows = 0
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                doc = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(path, number, None, f"malformed JSON ({exc.msg})") from None
            for name in REQUIRED_FIELDS[task]:
                if name not in doc:
                    raise DataError(path, number, name, "missing")
            choices = doc["choices"]
            if not isinstance(choices, list) or len(choices) < 2:
                raise DataError(path, number, "choices", "must be a list of at least 2 strings")
            label = doc["label"]
            if not isinstance(label, int) or not 0 <= label < len(choices):
                raise DataError(path, number, "label", f"must be an index into choices, not {label!r}")
            if task == "winogrande" and len(doc["context_options"]) != len(choices):
                raise DataError(path, number, "context_options", "needs one context per choice")
            rows += 1
    if not rows:
        raise ConfigError(f"task '{task}': {path} has no records")
    return rows


def write_task_configs(task_dir: str | Path, tasks: Sequence[str], dest: str | Path) -> dict[str, str]:
    """Write lm-eval task configs ``paser_<task>.yaml`` reading ``task_dir/<task>.jsonl`` into ``dest``.

    ``lm_eval --include_path DEST --tasks paser_arc_easy ...`` runs the same tasks. Returns task -> name.
    """
    import yaml

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    names = {}
    for task in tasks:
        config = yaml.safe_load(resources.files("paser").joinpath("tasks", f"{task}.yaml").read_text())
        name = LOCAL_TASK_PREFIX + task
        config.update(task=name, dataset_path="json", test_split="test",
                      dataset_kwargs={"data_files": {"test": str((Path(task_dir) / f"{task}.jsonl").resolve())}})
        (dest / f"{name}.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
        names[task] = name
    return names


def load_tasks(tasks: Sequence[str], task_dir: str | Path | None) -> dict[str, Any]:
    """Build lm-eval Task objects once (datasets read, documents prepared); returns task -> Task."""
    from lm_eval.tasks import TaskManager

    if not tasks:
        return {}
    if task_dir is None:
        names = {t: t for t in tasks}
        manager = TaskManager()
    else:
        include = tempfile.mkdtemp(prefix="paser-tasks-")
        names = write_task_configs(task_dir, tasks, include)
        manager = TaskManager(include_path=include, include_defaults=False)  # indexing lm-eval's own tasks takes ~20 s
    loaded = manager.load(list(names.values()))["tasks"]
    by_name = {getattr(t, "task_name", None) or t.config.task: t for t in loaded.values()}
    return {task: by_name[names[task]] for task in tasks}


def run_task(lm: Any, task: Any, limit: int | None) -> dict:
    """One lm-eval task on a wrapped model: acc, acc_norm (with stderr), n and seconds."""
    from lm_eval.evaluator import evaluate

    name = task.config.task
    t0 = time.perf_counter()
    results = evaluate(lm=lm, task_dict={"tasks": {name: task}, "groups": {}}, limit=limit, log_samples=True,
                       bootstrap_iters=1000, verbosity="WARNING")
    seconds = time.perf_counter() - t0
    if results is None:  # a rank other than 0 under a launcher: rank 0 holds the gathered results
        return {}
    metrics = results["results"][name]
    row = {}
    for metric in ("acc", "acc_norm"):
        if f"{metric},none" in metrics:
            row[metric] = metrics[f"{metric},none"]
            stderr = metrics.get(f"{metric}_stderr,none")
            row[f"{metric}_stderr"] = stderr if isinstance(stderr, float) else None
    samples = results.get("n-samples", {}).get(name, {})
    row["n"] = samples.get("effective", samples.get("original"))
    row["seconds"] = round(seconds, 2)
    logged = sorted(results.get("samples", {}).get(name, []), key=lambda s: s["doc_id"])
    # per-question scores, in document order: what paired comparisons between models resample
    row["items"] = {metric: [float(s[metric]) for s in logged] for metric in ("acc", "acc_norm")
                    if logged and metric in logged[0]}
    return row


# ------------------------------------------------------------------------------------------ perplexity
def perplexity(model: Any, sequences: Sequence[Sequence[int]], batch_size: int = 8, progress: bool = False) -> float:
    """exp(mean NLL) over every predicted token of the sequences (right-padded batches)."""
    nll, count = sequence_nll(model, sequences, batch_size, progress)
    return math.exp(sum(nll) / max(sum(count), 1))


@torch.no_grad()
def sequence_nll(model: Any, sequences: Sequence[Sequence[int]], batch_size: int = 8,
                 progress: bool = False) -> tuple[list[float], list[int]]:
    """Per sequence: the summed NLL of its predicted tokens and their count (perplexity's per-item parts)."""
    from .score import summed_nll

    sums: list[float] = []
    counts: list[int] = []
    starts = range(0, len(sequences), batch_size)
    for start in tqdm(starts, desc="perplexity", disable=not progress, leave=False):
        ids, mask = pad_right(sequences[start:start + batch_size], 0)
        predicts = torch.zeros_like(mask, dtype=torch.bool)
        predicts[:, :-1] = mask[:, 1:].bool()  # position t predicts token t + 1 where that token is real
        batch_sums, batch_counts = summed_nll(model, ids, mask, predicts, ids[:, 1:][mask[:, 1:].bool()])
        sums.extend(batch_sums.tolist())
        counts.extend(batch_counts.tolist())
    return sums, counts


def text_windows(tokenizer: Any, text: str, seqlen: int) -> list[list[int]]:
    """Non-overlapping windows of ``seqlen`` tokens over the whole text; the short remainder is dropped."""
    ids = tokenizer(text)["input_ids"]
    windows = [ids[i:i + seqlen] for i in range(0, len(ids) - seqlen + 1, seqlen)]
    if not windows:
        raise ConfigError(f"text has {len(ids)} tokens, fewer than one window of {seqlen}")
    return windows


def response_perplexity(model: Any, encoded: Sequence[Any], pad_id: int, batch_size: int = 8,
                        progress: bool = False) -> float:
    """exp(mean NLL of the response tokens given their prompts) over all records."""
    nll, count = response_nll(model, encoded, pad_id, batch_size, progress)
    return math.exp(sum(nll) / max(sum(count), 1))


@torch.no_grad()
def response_nll(model: Any, encoded: Sequence[Any], pad_id: int, batch_size: int = 8,
                 progress: bool = False) -> tuple[list[float], list[int]]:
    """Per record (input order): the summed NLL of its response tokens given the prompt, and their count."""
    from .score import collate, summed_nll

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


# ----------------------------------------------------------------------------------------- demo skills
@torch.no_grad()
def generate_answers(model: Any, tokenizer: Any, records: Sequence[Record], max_new_tokens: int = 32,
                     batch_size: int = 16, template: str = "auto", progress: bool = True) -> list[str]:
    """Greedy answers to each record's prompt (formatted with the same template as training)."""
    formatter = PromptFormatter(tokenizer, template=template, max_length=None)
    prompts = [formatter.prompt_ids(r) for r in records]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    answers: list[str] = [""] * len(prompts)
    pad = tokenizer.pad_token_id
    device = next(model.parameters()).device
    for start in tqdm(range(0, len(order), batch_size), desc="generate", disable=not progress, leave=False):
        idx = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in idx)
        # Left padding, so every prompt ends where generation starts.
        ids = torch.tensor([[pad] * (width - len(prompts[i])) + prompts[i] for i in idx], device=device)
        mask = torch.tensor([[0] * (width - len(prompts[i])) + [1] * len(prompts[i]) for i in idx], device=device)
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=pad, eos_token_id=tokenizer.eos_token_id)
        for row, i in enumerate(idx):
            answers[i] = tokenizer.decode(out[row, width:], skip_special_tokens=True)
    return answers


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
    from .data import iter_dict_records

    heldout = demo_records(seed)["heldout"]
    chosen = [r for skill in SKILLS for r in [x for x in heldout if x["skill"] == skill][:per_skill]]
    return list(iter_dict_records(chosen, source="demo heldout"))


# ------------------------------------------------------------------------------------------ the table
def table_rows(results: dict) -> tuple[list[str], list[list[str]]]:
    """The side-by-side table: models as rows; zero-shot metrics, their mean, perplexities and demo
    skills as columns. Returns ``(header, rows)`` of formatted cells."""
    tasks = results["tasks"]
    columns = [f"{t} ({TABLE_METRIC[t]})" for t in tasks] + (["mean acc"] if tasks else [])
    columns += [f"ppl {Path(p).name}" for p in results["ppl_files"]]
    columns += [f"response ppl {Path(p).name}" for p in results["response_ppl_files"]]
    columns += ["demo skills acc"] if results["demo_skills"] else []
    rows = []
    for label, entry in results["models"].items():
        accs = [entry["tasks"][task].get(TABLE_METRIC[task]) for task in tasks]
        cells = [f"{100 * value:.2f}" if value is not None else "-" for value in accs]
        if tasks:
            cells.append(f"{100 * sum(accs) / len(accs):.2f}" if None not in accs else "-")
        cells += [f"{entry['perplexity'][p]['ppl']:.2f}" for p in results["ppl_files"]]
        cells += [f"{entry['response_perplexity'][p]['ppl']:.2f}" for p in results["response_ppl_files"]]
        if results["demo_skills"]:
            cells.append(f"{100 * entry['demo_skills']['mean']['acc']:.2f}")
        rows.append([label, *cells])
    return ["model", *columns], rows


def results_table(results: dict) -> str:
    """:func:`table_rows` as markdown."""
    header, rows = table_rows(results)
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def _tokenizer_key(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return stable_hash(backend.to_str() if backend is not None else sorted(tokenizer.get_vocab().items()))


class _PartsCache:
    """One JSON file per finished (model, measurement), beside the results file, keyed by the model's
    weights and everything that decides the figure: a killed or repeated evaluation redoes only what
    is missing, and a model whose every measurement is there is not even loaded."""

    def __init__(self, out: Path, dtype: str):
        self.dir = out.parent / f".{out.stem}-parts"
        self.dtype = dtype

    def path(self, model_key: str, kind: str, name: str, settings: dict[str, Any]) -> Path:
        return self.dir / f"{kind}-{stable_hash(model_key, kind, name, settings, self.dtype)}.json"

    def get(self, path: Path) -> dict | None:
        try:
            return json.loads(path.read_text(encoding="utf-8"))["value"]
        except (FileNotFoundError, ValueError, KeyError):
            return None

    def put(self, path: Path, value: Any) -> None:
        from . import distributed

        if distributed.is_main():
            write_json(path, {"value": value})
            faults.reached("evaluate.saved")


def _evaluate_model(spec: str, label: str, config: EvaluateConfig, dtype: str, parts: _PartsCache,
                    tasks: dict[str, Any], texts: dict[str, str], response_records: dict[str, list[Record]],
                    demo: list[Record], windows_cache: dict, encoded_cache: dict) -> dict[str, Any]:
    """Every measurement of one model, each taken from ``parts`` when it was finished before."""
    from .cache import file_fingerprint
    from .models import load_model, model_fingerprint

    t_model = time.perf_counter()
    model_key = model_fingerprint(spec)
    plan: list[tuple[str, str, Path]] = []  # (kind, name, part file)
    for task in tasks:
        plan.append(("tasks", task, parts.path(model_key, "task", task, {
            "limit": config.limit, "batch_size": config.batch_size, "task_dir": str(config.task_dir),
            "file": file_fingerprint(Path(config.task_dir) / f"{task}.jsonl") if config.task_dir else None})))
    for path in texts:
        plan.append(("perplexity", path, parts.path(model_key, "ppl", path, {
            "file": file_fingerprint(path), "seqlen": config.ppl_seqlen, "windows": config.ppl_windows})))
    for source, records in response_records.items():
        plan.append(("response_perplexity", source, parts.path(model_key, "response", source, {
            "data": stable_hash([(r.instruction, r.input, r.output) for r in records]),
            "max_length": config.response_max_length})))
    if demo:
        plan.append(("demo_skills", "", parts.path(model_key, "demo", "", {"questions": config.demo_questions})))
    entry: dict[str, Any] = {"spec": spec, "tasks": {}, "perplexity": {}, "response_perplexity": {}}
    done = {path: value for _, _, path in plan if (value := parts.get(path)) is not None}
    if done:
        log.info("%s: %d of %d measurements already finished (%s)", label, len(done), len(plan), parts.dir)
    model = tokenizer = lm = None
    for kind, name, path in plan:
        value = done.get(path)
        if value is None:
            if model is None:
                log.info("evaluating %s", label)
                from . import distributed

                model, tokenizer = load_model(spec, dtype=dtype, device=distributed.device())
                model.eval()
            value, lm = _measure(kind, name, model, tokenizer, lm, config, tasks, texts, response_records, demo,
                                 windows_cache, encoded_cache)
            parts.put(path, value)
        if kind == "demo_skills":
            entry.update(value)
        else:
            entry[kind][name] = value
        shown = {k: v for k, v in value.items() if k != "items"} if kind != "demo_skills" else "done"
        log.info("%s %s %s: %s", label, kind, name, shown)  # per-item values stay in results.json
    entry["seconds"] = round(time.perf_counter() - t_model, 2)
    entry["from_earlier_run"] = len(done)
    return entry


def _measure(kind: str, name: str, model: Any, tokenizer: Any, lm: Any, config: EvaluateConfig,
             tasks: dict[str, Any], texts: dict[str, str], response_records: dict[str, list[Record]],
             demo: list[Record], windows_cache: dict, encoded_cache: dict) -> tuple[Any, Any]:
    """One measurement of a loaded model; returns it and the (lazily built) lm-eval wrapper."""
    t0 = time.perf_counter()
    if kind == "tasks":
        if lm is None:
            from lm_eval.models.huggingface import HFLM

            lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=config.batch_size)
            _data_parallel(lm)
        return run_task(lm, tasks[name], config.limit), lm
    tok_key = _tokenizer_key(tokenizer)
    if kind == "perplexity":
        max_positions = getattr(model.config, "max_position_embeddings", None) or config.ppl_seqlen
        seqlen = min(config.ppl_seqlen, max_positions)
        key = (tok_key, name, seqlen)
        if key not in windows_cache:
            windows_cache[key] = text_windows(tokenizer, texts[name], seqlen)
        windows = windows_cache[key][:config.ppl_windows] if config.ppl_windows else windows_cache[key]
        nll, count = _sharded_nll(lambda part: sequence_nll(model, part, max(1, config.batch_size // 4), progress=True),
                                  windows)
        return {"ppl": math.exp(sum(nll) / max(sum(count), 1)), "windows": len(windows), "seqlen": seqlen,
                "seconds": round(time.perf_counter() - t0, 2), "items": {"nll": nll, "tokens": count}}, lm
    if kind == "response_perplexity":
        records = response_records[name]
        key = (tok_key, name)
        if key not in encoded_cache:
            formatter = PromptFormatter(tokenizer, max_length=config.response_max_length)
            encoded_cache[key] = formatter.encode_all(records)
        encoded = encoded_cache[key]
        nll, count = _sharded_nll(lambda part: response_nll(model, part, tokenizer.pad_token_id, config.batch_size,
                                                            progress=True), encoded,
                                  [len(e.input_ids) for e in encoded])
        return {"ppl": math.exp(sum(nll) / max(sum(count), 1)), "records": len(records),
                "seconds": round(time.perf_counter() - t0, 2), "items": {"nll": nll, "tokens": count}}, lm
    from . import distributed

    answers = distributed.map_sharded(demo, lambda part: generate_answers(model, tokenizer, part, max_new_tokens=24,
                                                                         batch_size=config.batch_size * 4))
    shown: dict[str, int] = defaultdict(int)
    examples = []  # what exact match saw, two per skill
    for record, answer in zip(demo, answers):
        if shown[record.raw["skill"]] < 2:
            shown[record.raw["skill"]] += 1
            examples.append({"skill": record.raw["skill"], "question": record.user_text,
                             "reference": record.raw["answer"], "answer": answer})
    return {"demo_skills": skill_accuracy(demo, answers), "demo_answer_examples": examples,
            "demo_skills_seconds": round(time.perf_counter() - t0, 2)}, lm


def _data_parallel(lm: Any) -> None:
    """Under a launcher, make lm-eval's evaluator split each task's requests across the processes and gather
    the per-question results on rank 0 (what it does for a model it loads itself; paser passes its own)."""
    from . import distributed

    if distributed.launched():
        from accelerate import Accelerator

        lm._rank, lm._world_size = distributed.rank(), distributed.world_size()
        lm.accelerator = Accelerator(cpu=not torch.cuda.is_available())


def _sharded_nll(measure: Any, items: Sequence[Any], lengths: Sequence[int] | None = None,
                 ) -> tuple[list[float], list[int]]:
    """Per-item (NLL sum, token count) from ``measure`` over each rank's share of ``items``, in input order."""
    from . import distributed

    def pairs(part: list[Any]) -> list[tuple[float, int]]:
        nll, count = measure(part)
        return list(zip(nll, count))

    merged = distributed.map_sharded(items, pairs, lengths)
    return [p[0] for p in merged], [p[1] for p in merged]


def run_evaluation(config: EvaluateConfig) -> dict:
    """Evaluate every model; writes ``config.out`` (JSON) and a markdown table beside it; returns the results."""
    from . import distributed
    from .models import resolve_dtype_name

    config.validate()
    started = time.perf_counter()
    dtype = resolve_dtype_name(config.dtype)
    # Data is read (and validated) before any model loads.
    response_records = {src: load_records(src, limit=config.response_ppl_limit, bad_records=config.bad_records)
                        for src in config.response_ppl}
    demo = demo_heldout(config.demo_questions) if config.demo_skills else []
    t0 = time.perf_counter()
    tasks = load_tasks(config.tasks, config.task_dir)
    task_build_seconds = time.perf_counter() - t0
    texts = {path: Path(path).read_text(encoding="utf-8") for path in config.ppl}
    labels = config.labels or list(config.models)
    windows_cache: dict[tuple, list] = {}
    encoded_cache: dict[tuple, list] = {}

    results: dict[str, Any] = {
        "config": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(config).items()},
        "versions": package_versions("paser", "torch", "transformers", "lm-eval", "peft"),
        "dtype": dtype, "limit": config.limit, "tasks": list(config.tasks),
        "task_source": str(config.task_dir) if config.task_dir else "lm-eval hub tasks",
        "ppl_files": list(config.ppl), "ppl_seqlen": config.ppl_seqlen, "ppl_windows": config.ppl_windows,
        "response_ppl_files": list(config.response_ppl), "demo_skills": config.demo_skills,
        "task_build_seconds": round(task_build_seconds, 2), "processes": distributed.world_size(), "models": {},
    }
    parts = _PartsCache(Path(config.out), dtype)
    for spec, label in zip(config.models, labels):
        entry = _evaluate_model(spec, label, config, dtype, parts, tasks, texts, response_records, demo,
                                windows_cache, encoded_cache)
        results["models"][label] = entry
    results["seconds"] = round(time.perf_counter() - started, 2)
    results["table"] = results_table(results) if distributed.is_main() else ""
    out = Path(config.out)
    if distributed.is_main():
        write_json(out, results)
        write_text(out.with_suffix(".md"), results["table"])
    distributed.barrier()
    return results
