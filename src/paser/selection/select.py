"""Data selection: load and encode the pool once, then run a registered strategy over it.

Strategies (``paser.selection.strategies``): ``random`` (the default: a seeded slice, token-matched under a token budget;
with recovery's default distillation it is the only recipe that passed every equal-token testbed,
docs/fidelity.md), ``paser`` and its ablations, ``full``, ``perplexity``, ``loss_gap``, ``ifd``, ``nuggets``,
``dsir``. Every method sees the same pool (the records with a response
token within ``max_length``) and writes the same outputs.

Lifecycle (like DSIR's ``data_selection``): every expensive signal persists into the cache directory,
keyed by its inputs, and is computed only when a strategy asks for it. Embeddings depend on the records and
the embedder; clusters on the embeddings and the clustering settings; model scores on the models, the
records, the template and the dtype. So a new budget, K, allocation rule, method or CCG setting reuses
everything it can, and ``selection.json`` says ``"scores_from_cache": true``.

Python API::

    from paser.selection.select import SelectConfig, run_selection
    result = run_selection(SelectConfig(original="smollm2-135m-instruct", pruned="pruned/", method="paser",
                                        data="pool.jsonl", budget=0.2, out="sel/"))
    result.indices, result.summary["clusters"]
"""

from __future__ import annotations

import logging
import time
from dataclasses import MISSING, asdict, dataclass, field
from dataclasses import fields as dataclass_fields
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from .. import distributed
from ..cache import cache_root, package_versions, write_json, write_jsonl, write_parquet
from ..data import ColumnMap, PromptFormatter, Record, encode_records, load_records
from ..errors import ConfigError, DataError
from ..models import DTYPE_HELP, Dtype, check_compatible, load_tokenizer, resolve_dtype_name
from ..options import check_declared, joined_config, option
from .allocate import ALLOCATION_RULES
from .cluster import ClusterResult
from .embed import DEFAULT_EMBEDDER
from .score import SCORERS
from .strategies import STRATEGIES, SelectionContext, get_strategy
from .strategies.paser import CLUSTER_METHODS

log = logging.getLogger(__name__)

METHODS = tuple(STRATEGIES)


@dataclass
class SelectBase:
    """What every selection method reads; each method's own settings are declared on it (``Strategy.options``)
    and joined into :class:`SelectConfig` below. Defaults are the documented CLI defaults."""

    # The one field with no ``paser select`` option (YAML and the Python API only): the cache root has $PASER_CACHE.
    REGISTERED: ClassVar[dict[str, Any]] = {"method": STRATEGIES, "allocation": ALLOCATION_RULES, "score": SCORERS,
                                            "cluster_method": CLUSTER_METHODS}
    CONFIG_ONLY: ClassVar[frozenset[str]] = frozenset({"cache_dir"})

    original: str = option(help="Original (dense) model spec.")
    pruned: str = option(help="Pruned model spec (must share the original's tokenizer).")
    data: str = option(help="Instruction data: .jsonl/.json/.csv/.parquet, a hub dataset name, or 'demo'.")
    budget: float | None = option(None, "Records to select: a count, or a fraction of the data when below 1.")
    budget_tokens: float | None = option(None, "Training tokens to select instead (prompt + response within "
        "--max-length, what recovery trains on): a count, or a fraction of the pool's tokens when below 1. "
        "The method selects as for the largest record budget whose records fit.")
    out: str | Path | None = option(None, "Output directory: selected.jsonl, selection.json, scores.parquet.")
    method: str = option('random', "Selection method (random, distilled by paser recover's default loss, passed "
        "every equal-token testbed: docs/fidelity.md).")
    embedder: str = option(DEFAULT_EMBEDDER, "sentence-transformers model (default: the bundled all-MiniLM-L6-v2).")
    max_length: Annotated[int, Field(ge=8)] = option(256, "Tokens per sample (prompt + response) when scoring.")
    batch_size: Annotated[int, Field(ge=1)] = option(16, "Samples per scoring batch (length-bucketed).")
    dtype: Dtype = option("auto", DTYPE_HELP)
    score: str = option('jsd', "Degradation score (jsd: the paper's).")
    seed: int = option(0, "Seed for clustering, sampling inside clusters and the random baseline.")
    template: Literal["auto", "chat", "alpaca"] = option('auto', "Prompt template: auto (the tokenizer's chat template "
        "when it has one, else alpaca) | chat | alpaca.")
    columns: str | None = option(None, "Field mapping, e.g. instruction=question,output=answer.")
    duplicates: Literal["keep", "drop"] = option('keep', "keep | drop duplicate (instruction, input) pairs.")
    bad_records: Literal["skip", "error"] = option('skip', "skip: leave out unusable records (malformed, not UTF-8, "
        "empty or missing fields), count them by reason in selection.json | error: stop at the first.")
    limit: Annotated[int, Field(ge=1)] | None = option(None, "Use only the first N records of the data.")
    cache_dir: str | Path | None = None  # default: $PASER_CACHE or ~/.cache/paser
    ifd_model: Literal["original", "pruned"] = option('pruned', "ifd: the model whose response losses define IFD "
        "(original | pruned).")
    resident: Literal["both", "one"] = option('both', "both: the two models in memory together | one: the original "
        "alone first (its top-k log-probabilities stored), then the pruned alone; JSD over the top-k tokens "
        "and one tail bucket (error bounded, see docs/method.md).")
    topk: Annotated[int, Field(ge=1)] = option(64, "--resident one: log-probabilities kept per position.")
    device_map: str | None = option(None, "auto: spread each model over the GPUs and CPU memory (accelerate big-model "
        "loading), for models too big for one device.")

    def validate(self) -> None:
        """The declared choices and bounds (:func:`paser.options.check_declared`), then what relates fields."""
        check_declared(self)
        if self.budget is None and self.budget_tokens is None:
            raise ConfigError("give a budget: records (--budget) or training tokens (--budget-tokens)")
        for name in ("budget", "budget_tokens"):
            value = getattr(self, name)
            if value is None:
                continue
            if not value > 0:
                raise ConfigError(f"{name} must be positive (a count, or a fraction below 1), not {value}")
            if value >= 1 and value != int(value):
                raise ConfigError(f"{name} {value} is neither a fraction below 1 nor a whole count")
        if self.device_map is not None and distributed.launched():
            raise ConfigError("device_map spreads one copy of each model over the devices; under a launcher every "
                              "process holds its own copy: use one or the other")
        for _, strategy in STRATEGIES.items():  # each method checks its own options
            strategy.validate(self)

    def budget_count(self, n_records: int) -> int:
        count = round(self.budget * n_records) if self.budget < 1 else int(self.budget)
        return max(1, min(count, n_records))

    def token_budget(self, pool_tokens: int) -> int:
        count = round(self.budget_tokens * pool_tokens) if self.budget_tokens < 1 else int(self.budget_tokens)
        return max(1, min(count, pool_tokens))


SelectConfig = joined_config("SelectConfig", SelectBase, STRATEGIES.items(), __name__,
                             "Everything ``paser select`` needs: SelectBase's settings and every registered method's "
                             "own (its ``options``). Defaults are the documented CLI defaults.")


def _other_methods_options(method: str) -> dict[str, tuple[str, Any]]:
    """Option name -> (the method declaring it, its default), for every registered method but ``method``."""
    return {f.name: (owner, f.default_factory() if f.default_factory is not MISSING else f.default)
            for owner, strategy in STRATEGIES.items() if owner != method and strategy.options is not None
            for f in dataclass_fields(strategy.options)}


def other_methods_options(method: str) -> set[str]:
    """The option names that registered methods other than ``method`` declare (``method`` never reads them)."""
    return set(_other_methods_options(method))


def check_options_belong(method: str, given: dict[str, Any]) -> None:
    """A setting that another method declares, given away from its default, is an error naming its method: with
    ``random`` as the default, ``paser select --allocation cds`` would otherwise run random and ignore it.
    (Configs of ``paser run`` share one ``select`` section between arms of different methods, so only the CLI
    and API calls that name their own settings use this.)"""
    stray = [(f"--{name.replace('_', '-')}", owner) for name, (owner, default) in _other_methods_options(method).items()
             if name in given and given[name] != default]
    if stray:
        names = ", ".join(name for name, _ in stray)
        owners = sorted({owner for _, owner in stray})
        raise ConfigError(f"{names} {'applies' if len(stray) == 1 else 'apply'} to method {' / '.join(owners)}, not "
                          f"'{method}': add --method {owners[0]}")


@dataclass
class SelectionResult:
    indices: list[int]  # the selected records' positions in the input file (Record.index), in selection order
    records: list[Record]
    scores: pd.DataFrame  # per-sample table (scores, cluster, ies, selected)
    summary: dict[str, Any]  # what selection.json holds
    clusters: ClusterResult | None = None
    positions: list[int] = field(default_factory=list)  # the same records' rows in ``scores``


# ------------------------------------------------------------------------------------------ entry point
def run_selection(config: SelectConfig) -> SelectionResult:
    """Select ``config.budget`` records with ``config.method``; write outputs if ``config.out`` is set.

    Under ``accelerate launch`` / ``torchrun`` every process scores its share of the records (see
    :func:`paser.selection.score.batched_values`); each returns the same result and only rank 0 writes the outputs."""
    config.validate()
    started = time.perf_counter()
    timings: dict[str, float] = {}
    ctx, record_tokens, skipped = _selection_context(config, timings)
    t0 = time.perf_counter()
    strategy = get_strategy(config.method)
    if config.budget_tokens is None:
        positions, details = strategy.select(ctx)
    else:
        positions, details = select_within_tokens(strategy, ctx, record_tokens,
                                                  config.token_budget(int(record_tokens.sum())))
    timings["strategy"] = time.perf_counter() - t0
    selected = np.zeros(len(ctx.records), dtype=bool)
    selected[positions] = True
    ctx.table["selected"] = selected
    summary = {**_summary(config, ctx, positions, record_tokens, skipped), **details}
    records = ctx.records
    result = SelectionResult([records[i].index for i in positions], [records[i] for i in positions], ctx.table,
                             summary, ctx.info.get("cluster_result"), list(positions))
    writes = bool(config.out) and distributed.is_main()
    if writes:
        t0 = time.perf_counter()
        write_outputs(result, Path(config.out))
        timings["write"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - started
    summary["cost"]["seconds"] = round(timings["total"] - timings.get("write", 0.0), 2)
    summary["timings"] = {k: round(v, 3) for k, v in timings.items()}
    summary["versions"] = package_versions("paser", "torch", "transformers", "sentence-transformers",
                                           "scikit-learn", "scipy", "faiss-cpu", "yake")
    if writes:
        write_json(Path(config.out) / "selection.json", summary)
    distributed.barrier()  # the outputs exist for every process
    return result


def _selection_context(config: SelectConfig, timings: dict[str, float]) -> tuple[SelectionContext, np.ndarray, Any]:
    """The pool every method sees (records with a response token to score within max_length), its per-record
    table, the record budget, and each record's training tokens."""
    t0 = time.perf_counter()
    columns = ColumnMap.parse(config.columns) if config.columns else None
    records = load_records(config.data, columns, duplicates=config.duplicates, limit=config.limit,
                           bad_records=config.bad_records)
    skipped = records.skipped
    timings["load_data"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(config.original)
    check_compatible(tokenizer, load_tokenizer(config.pruned))
    formatter = PromptFormatter(tokenizer, template=config.template, max_length=config.max_length)
    records, encoded = encode_records(formatter, records, config.bad_records, skipped)
    timings["tokenize"] = time.perf_counter() - t0
    if not records:
        raise DataError(config.data, None, None, f"no usable records ({skipped.describe()})")
    record_tokens = np.array([len(e.input_ids) for e in encoded], dtype=np.int64)
    if config.budget_tokens is None:
        budget = config.budget_count(len(records))
        if config.budget >= 1 and config.budget > len(records):
            log.warning("budget %d exceeds the %d records: selecting all", int(config.budget), len(records))
    else:
        budget = max(1, min(len(records), round(config.token_budget(int(record_tokens.sum())) / record_tokens.mean())))
    table = pd.DataFrame({
        "index": [r.index for r in records],  # positions in the input file, so outputs join back
        "line": [r.number for r in records],
        "prompt_tokens": [len(e.prompt_ids) for e in encoded],
        "response_tokens": [len(e.response_ids) for e in encoded],
        "truncated": [e.truncated for e in encoded],
    })
    cache = Path(config.cache_dir) if config.cache_dir else cache_root()
    ctx = SelectionContext(config, records, encoded, tokenizer, formatter.fingerprint,
                           resolve_dtype_name(config.dtype), budget, cache, table, timings)
    return ctx, record_tokens, skipped


def _summary(config: SelectConfig, ctx: SelectionContext, positions: Any, record_tokens: np.ndarray,
             skipped: Any) -> dict:
    """selection.json's common part: budget, tokens, skipped records, cost, and the scores' distributions."""
    score = ctx.table["score"].to_numpy(np.float64) if "score" in ctx.table else None
    summary = {
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(config).items()},
        "method": config.method, "n_records": len(ctx.records), "budget": ctx.budget, "n_selected": len(positions),
        "tokens": {"budget": config.token_budget(int(record_tokens.sum())) if config.budget_tokens is not None else None,
                   "selected": int(record_tokens[positions].sum()), "pool": int(record_tokens.sum()),
                   "selected_response": int(ctx.table["response_tokens"].to_numpy()[positions].sum()),
                   "per_record": "prompt + response tokens within max_length (what recovery trains on)"},
        "skipped_records": skipped.summary(),
        "scores_from_cache": ctx.info.get("scores_from_cache"), "score": None,  # the strategy names its score
        "cost": {**ctx.cost, "seconds": None},
        "score_all": _describe(score) if score is not None else {},
        "score_selected": _describe(score[positions]) if score is not None else {},
    }
    if "jsd" in ctx.table:  # PASER's degradation signal, whatever the method, when it was computed
        jsd = ctx.table["jsd"].to_numpy(np.float64)
        summary["degradation"], summary["degradation_selected"] = _describe(jsd), _describe(jsd[positions])
    return summary


def select_within_tokens(strategy: Any, ctx: SelectionContext, record_tokens: np.ndarray, token_budget: int
                         ) -> tuple[list[int], dict[str, Any]]:
    """The strategy's selection for the largest record budget whose records hold at most ``token_budget`` training
    tokens (bisection over the record budget from ``ctx.budget``, the pool's mean-length guess; every signal is
    cached after the first call, so each step reruns only the strategy's ranking and allocation). A strategy that
    ignores the record budget (``full``) is cut to the longest prefix of its order that fits. ``ctx.budget`` ends
    as the record budget used, and the strategy's table columns are those of that run."""
    tokens_at: dict[int, int] = {}
    start_cost = dict(ctx.cost)
    runs: list[tuple[int, dict[str, int]]] = []  # (record budget, cost) of each run, in order

    def select_at(budget: int) -> tuple[list[int], dict[str, Any], dict[str, int]]:
        ctx.budget = budget
        before = dict(ctx.cost)
        positions, details = strategy.select(ctx)
        return list(positions), details, {k: ctx.cost[k] - before[k] for k in before}

    def run(budget: int) -> int:
        if budget not in tokens_at:
            positions, _, cost = select_at(budget)
            runs.append((budget, cost))
            tokens_at[budget] = int(record_tokens[positions].sum())
        return tokens_at[budget]

    low, high = 1, len(record_tokens)  # the answer lies in [low, high]; budget 1 is taken even when it is over
    guess = min(max(ctx.budget, low), high)
    while low < high:
        middle = guess if guess is not None else (low + high + 1) // 2
        guess = None
        if run(middle) <= token_budget:
            low = middle
        else:
            high = middle - 1
    run(low)
    # The selection's cost is what one run at the chosen budget costs from nothing. Signals computed once (pool
    # scores, embeddings) were charged to the first run only; a charge made on every run (a budget's own
    # scoring) shows again when the first budget is repeated: once-only = first run - its repeat.
    first_budget, first_cost = runs[0]
    repeat = select_at(first_budget)[2]
    positions, details, cost = select_at(low)  # the final run last: the table's columns are its
    ctx.cost.update({k: start_cost[k] + first_cost[k] - repeat[k] + cost[k] for k in start_cost})
    fits = int(np.searchsorted(np.cumsum(record_tokens[positions]), token_budget, side="right"))
    positions = positions[:max(fits, 1)]
    searched = {k: sum(run_cost[k] for _, run_cost in runs) for k in start_cost}
    return positions, {**details, "token_search": {"record_budgets_tried": len(tokens_at), "record_budget": low,
                                                   "all_runs_cost": searched}}


def _describe(values: np.ndarray) -> dict[str, float]:
    values = values[~np.isnan(values)]
    if len(values) == 0:
        return {}
    q = np.quantile(values, [0.1, 0.5, 0.9])
    return {"mean": float(values.mean()), "p10": float(q[0]), "median": float(q[1]), "p90": float(q[2])}


def _number(value: Any) -> float | None:
    return None if np.isnan(value) else float(value)  # (sampled scoring: no JSD where not scored exactly)


OUTPUT_FIELDS = {"cluster": int, "jsd": _number, "ies": _number, "rank": int, "score": _number, "scored_exactly": bool,
                 "scored_prefix": bool}


def write_outputs(result: SelectionResult, out: Path) -> None:
    """``selected.jsonl`` (records as given plus a ``paser`` object) and ``scores.parquet``."""
    table = result.scores
    fields = [(name, cast) for name, cast in OUTPUT_FIELDS.items() if name in table]

    def rows():
        for i, record in zip(result.positions, result.records):
            row = table.iloc[i]
            yield {**record.raw, "paser": {"index": record.index, "line": record.number,
                                           **{name: cast(row[name]) for name, cast in fields}}}

    write_jsonl(out / "selected.jsonl", rows())
    write_parquet(out / "scores.parquet", table)
