"""``paser`` command line: a thin typer layer over the library (nothing here that the API lacks)."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any, Optional

import click
import typer

from . import distributed
from .errors import PaserError

app = typer.Typer(
    name="paser",
    help="PASER: select the instruction data that best recovers a pruned LLM, then recover and evaluate it.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)

_state = {"debug": False}
log = logging.getLogger("paser")


HEAVY_COMMANDS = {"prune", "select", "recover", "evaluate", "run", "demo"}  # the ones a busy CPU slows


@app.callback()
def _global_options(
    ctx: typer.Context,
    debug: bool = typer.Option(False, "--debug", help="Show full tracebacks on errors."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log debug messages."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Log warnings and errors only."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch (default: the CPUs this process may use). Warns when another heavy job is running."),
) -> None:
    _state["debug"] = debug
    _state["threads"] = threads
    from rich.console import Console
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]",
                        handlers=[RichHandler(console=Console(stderr=True), show_path=False, rich_tracebacks=debug)],
                        force=True)  # logs on stderr: stdout carries results (e.g. --show-config > run.yaml)
    for noisy in ("httpx", "urllib3", "filelock", "datasets", "sentence_transformers", "transformers"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))
    if not {"-h", "--help"} & set(sys.argv[1:]):  # help needs no torch
        from .runtime import configure_threads

        configure_threads(threads, warn_if_busy=ctx.invoked_subcommand in HEAVY_COMMANDS)


# ------------------------------------------------------------------------------------------------ prune
@app.command()
def prune(
    model: str = typer.Argument(..., help="Model spec: smollm2-135m-instruct, a local HF directory, a .gguf file or a hub id."),
    method: str = typer.Option("wanda", help="wanda | sparsegpt | magnitude (unstructured or N:M) | taylor (structured: MLP channels and head groups)."),
    sparsity: float = typer.Option(0.5, help="Fraction of weights (or, for taylor, of prunable channels/heads) to remove, in (0, 1)."),
    pattern: Optional[str] = typer.Option(None, help="N:M semi-structured pattern, e.g. 2:4 (wanda, sparsegpt, magnitude)."),
    calib_data: str = typer.Option("demo", help="Calibration data: any instruction source paser reads (formatted records packed into full windows), or a plain .txt file."),
    calib_samples: int = typer.Option(128, help="Number of calibration samples."),
    seq_len: int = typer.Option(256, help="Calibration sequence length in tokens."),
    heldout_samples: int = typer.Option(32, help="Further windows of the calibration source, not calibrated on, for the perplexity before/after."),
    out: Path = typer.Option(..., help="Output directory (a plain Hugging Face model directory)."),
    seed: int = typer.Option(0, help="Seed."),
) -> None:
    """Prune a model: wanda and sparsegpt (llmcompressor one-shot), magnitude, taylor (structured).

    Unstructured methods zero weights (or N:M groups); taylor removes the least salient MLP channels and
    key/value head groups of every decoder layer (LLM-Pruner style) and shrinks the config. Writes a
    plain Hugging Face model directory with the tokenizer and prune_report.json (per-layer sparsity,
    parameters, perplexity before/after on held-out calibration samples, time, memory).
    """
    from .prune import PruneConfig, run_prune

    report = run_prune(PruneConfig(model=model, out=out, method=method, sparsity=sparsity, pattern=pattern,
                                   calib_data=calib_data, calib_samples=calib_samples, seq_len=seq_len, seed=seed,
                                   heldout_samples=heldout_samples))
    typer.echo(f"{report['method']}: sparsity {report['achieved_sparsity']:.4f} of decoder linear weights; "
               f"perplexity {report['perplexity_before']:.2f} -> {report['perplexity_after']:.2f}; "
               f"{report['seconds']:.0f}s -> {out}")


# ----------------------------------------------------------------------------------------------- select
# (registered below with every selection method's options)
def select(
    original: str = typer.Option(..., help="Original (dense) model spec."),
    pruned: str = typer.Option(..., help="Pruned model spec (must share the original's tokenizer)."),
    data: str = typer.Option(..., help="Instruction data: .jsonl/.json/.csv/.parquet, a hub dataset name, or 'demo'."),
    budget: Optional[float] = typer.Option(None, help="Records to select: a count, or a fraction of the data when below 1."),
    budget_tokens: Optional[float] = typer.Option(None, help="Training tokens to select instead (prompt + response within --max-length, what recovery trains on): a count, or a fraction of the pool's tokens when below 1. The method selects as for the largest record budget whose records fit."),
    out: Path = typer.Option(..., help="Output directory: selected.jsonl, selection.json, scores.parquet."),
    method: str = typer.Option("random", help="random (the default: seeded, loads no model; distilled by paser recover's default loss it passed every equal-token testbed, docs/fidelity.md) | paser (capability clusters, IFD inside, concept filter) | full | perplexity | loss_gap | ifd | nuggets | dsir."),
    embedder: str = typer.Option("all-MiniLM-L6-v2", help="sentence-transformers model (default: the bundled all-MiniLM-L6-v2)."),
    score: str = typer.Option("jsd", help="Degradation score: jsd (paper) | loss_gap | pruned_loss."),
    max_length: int = typer.Option(256, help="Tokens per sample (prompt + response) when scoring."),
    template: str = typer.Option("auto", help="Prompt template: auto (the tokenizer's chat template when it has one, else alpaca) | chat | alpaca."),
    batch_size: int = typer.Option(16, help="Samples per scoring batch (length-bucketed)."),
    dtype: str = typer.Option("auto", help="auto | bf16 | fp32 for the model passes (auto: bf16 only where the hardware has native bf16; JSD itself is always fp32)."),
    seed: int = typer.Option(0, help="Seed for clustering, sampling inside clusters and the random baseline."),
    columns: Optional[str] = typer.Option(None, help="Field mapping, e.g. instruction=question,output=answer."),
    duplicates: str = typer.Option("keep", help="keep | drop duplicate (instruction, input) pairs."),
    limit: Optional[int] = typer.Option(None, help="Use only the first N records of the data."),
    bad_records: str = typer.Option("skip", help="skip: leave out unusable records (malformed, not UTF-8, empty or missing fields), count them by reason in selection.json | error: stop at the first."),
    ifd_model: str = typer.Option("pruned", help="ifd: the model whose response losses define IFD (original | pruned)."),
    resident: str = typer.Option("both", help="both: the two models in memory together | one: the original alone first (its top-k log-probabilities stored), then the pruned alone; JSD over the top-k tokens and one tail bucket (error bounded, see docs/method.md)."),
    topk: int = typer.Option(64, help="--resident one: log-probabilities kept per position."),
    device_map: Optional[str] = typer.Option(None, help="auto: spread each model over the GPUs and CPU memory (accelerate big-model loading), for models too big for one device."),
    recipe: Optional[str] = typer.Option(None, help="A named recipe whose settings override the options: paper (the PASER paper exactly)."),
    **declared: Any,  # every selection method's own declared options (Strategy.options)
) -> None:
    """Select recovery data with PASER, its ablations, or a baseline (random, full, perplexity, loss_gap, ifd, nuggets, dsir).

    Embeddings, clusters and model scores are cached (PASER_CACHE, default ~/.cache/paser), so a new
    budget, K, method or CCG setting recomputes no model scores.
    """
    from .recipes import apply_recipe
    from .select import SelectConfig, check_options_belong, run_selection

    settings = dict(
        original=original, pruned=pruned, data=data, budget=budget, budget_tokens=budget_tokens, out=out, method=method,
        embedder=embedder, score=score, max_length=max_length, template=template, batch_size=batch_size, dtype=dtype,
        seed=seed, columns=columns, duplicates=duplicates, limit=limit, bad_records=bad_records, ifd_model=ifd_model,
        resident=resident, topk=topk, device_map=device_map,
        **{k: v or None if k == "target_sources" else v for k, v in declared.items()})
    from . import distributed

    settings = apply_recipe(recipe, "select", settings) if recipe else settings
    check_options_belong(settings["method"], settings)
    result = run_selection(SelectConfig(**settings))
    if distributed.is_main():  # one table, not one per process
        _print_selection(result.summary, out)


def _print_selection(summary: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if "clusters" in summary:
        table = Table(title=f"PASER: K = {summary['k']}, allocation '{summary['allocation']}'")
        for column in ("cluster", "size", "CDS", "budget", "selected", "CCG rejected"):
            table.add_column(column, justify="right")
        for c in summary["clusters"]:
            table.add_row(str(c["cluster"]), str(c["size"]), f"{c['cds']:.4f}", str(c["budget"]), str(c["selected"]),
                          str(c["rejected"]))
        console.print(table)
    skipped = summary.get("skipped_records") or {}
    if skipped.get("total"):
        reasons = ", ".join(f"{n} {reason}" for reason, n in skipped["by_reason"].items())
        console.print(f"skipped {skipped['total']} bad record(s) ({reasons}); first at {skipped['examples'][0]['where']}")
    timings = ", ".join(f"{k} {v:.1f}s" for k, v in summary["timings"].items())
    cached = summary["scores_from_cache"]
    scores = "" if cached is None else f" (scores from cache: {cached})"
    tokens = summary["tokens"]
    within = f" (budget {tokens['budget']:,})" if tokens["budget"] is not None else ""
    console.print(f"{summary['method']}: selected {summary['n_selected']} of {summary['n_records']} records, "
                  f"{tokens['selected']:,} of {tokens['pool']:,} training tokens{within} "
                  f"-> {out}/selected.jsonl{scores}; {timings}")


# ---------------------------------------------------------------------------------------------- recover
# (registered below with every training target's and objective's options)
def recover(
    model: str = typer.Argument(..., help="Pruned model spec to recover."),
    data: str = typer.Option(..., help="Training data: selected.jsonl from 'paser select' or any source paser reads."),
    out: Path = typer.Option(..., help="Output directory: LoRA adapter, merged model, train_log.json."),
    epochs: float = typer.Option(2, help="Training epochs."),
    lr: Optional[float] = typer.Option(None, help="Peak learning rate (cosine schedule with warmup); default: 1e-3 for LoRA (a small slice trains few steps), 1e-4 for --adapter full."),
    lora_r: int = typer.Option(8, help="LoRA rank."),
    lora_alpha: int = typer.Option(16, help="LoRA alpha."),
    lora_dropout: float = typer.Option(0.05, help="LoRA dropout."),
    lora_targets: str = typer.Option("all-linear", help="LoRA target modules (peft syntax), e.g. all-linear or q_proj,v_proj."),
    cutoff_len: int = typer.Option(256, help="Maximum tokens per example."),
    template: str = typer.Option("auto", help="Prompt template: auto (the tokenizer's chat template when it has one, else alpaca) | chat | alpaca."),
    batch_size: int = typer.Option(64, help="Effective batch size (micro-batch x gradient accumulation)."),
    micro_batch_size: int = typer.Option(4, help="Examples per forward pass."),
    dtype: str = typer.Option("auto", help="auto (bf16 only where the hardware has native bf16) | bf16 | fp32."),
    resume: bool = typer.Option(True, help="Continue from the last checkpoint in OUT/checkpoints when it was made with the same settings and data (--no-resume starts afresh)."),
    warmup_ratio: float = typer.Option(0.05, help="Fraction of the optimizer steps spent warming up."),
    save_steps: int = typer.Option(50, help="Checkpoint every N optimizer steps (what --resume restarts from)."),
    seed: int = typer.Option(0, help="Seed for LoRA init, data order and dropout."),
    limit: Optional[int] = typer.Option(None, help="Train on the first N records only."),
    bad_records: str = typer.Option("skip", help="skip: leave out unusable records, count them in train_log.json | error: stop at the first."),
    adapter: str = typer.Option("lora", help="lora | full (every weight trains; pruned positions stay zero)."),
    sparse_lora: str = typer.Option("masked", help="masked: the LoRA update is masked to the pruned layer's non-zeros while training, so the merged model is the trained one | off: plain LoRA, zeros re-applied after the merge."),
    targets: str = typer.Option("reference", help="What to train toward: reference (the data's answers) | original (the original model's own answers to the prompts, generated once and cached; needs the original: --teacher or the one paser prune recorded)."),
    max_train_tokens: Optional[int] = typer.Option(None, help="Train on the records in order while their tokens (prompt + response within --cutoff-len) fit: keeps a token budget when --targets original changes the answers' lengths (paser run passes the selection's)."),
    loss: str = typer.Option("auto", help="auto: kd when the original model is known (--teacher, or the model paser prune started from, recorded in MODEL/prune_report.json), else nll | nll (the targets' answers) | kd (distil the teacher's next-token distributions) | mix (half each, --kd-alpha) | rho (NLL on the 60% of tokens the student lost most against the original)."),
    teacher: Optional[str] = typer.Option(None, help="The original, dense model: kd/mix/auto's teacher and original targets' author (default: the one recorded by paser prune)."),
    kd_temperature: float = typer.Option(1.0, help="kd/mix: softmax temperature of both distributions."),
    kd_positions: str = typer.Option("response", help="kd/mix: response | all (prompt positions too)."),
    teacher_cache: str = typer.Option("none", help="kd/mix: none (the teacher runs beside the student) | topk (its top-k log-probs computed once and stored; only the student stays in memory)."),
    teacher_topk: int = typer.Option(64, help="kd/mix with --teacher-cache topk: k."),
    fsdp: bool = typer.Option(False, "--fsdp", help="Under accelerate launch / torchrun: shard parameters, gradients and optimizer state across the processes (FSDP2), for models that do not fit one device."),
    group_by_length: bool = typer.Option(True, "--group-by-length/--no-group-by-length", help="Batch records of similar length (less padding); off: a seeded random order, identical for any number of processes."),
    recipe: Optional[str] = typer.Option(None, help="A named recipe whose settings override the options: paper (NLL LoRA at lr 1e-4 unless --lr, zeros re-applied after the merge)."),
    **declared: Any,  # every training target's and objective's declared options (their ``options``)
) -> None:
    """Recover a pruned model on selected data: LoRA (or all weights), NLL or distillation from the original,
    on the data's answers or the original model's own.

    Writes OUT/adapter (peft), OUT/merged (a plain model directory that keeps every pruned zero) and
    OUT/train_log.json (loss curve per term, tokens/s, seconds per step, peak memory, and
    merge_max_logit_diff: how far the merged model's logits are from the trained model's).
    """
    from .recover import RecoverConfig, run_recovery

    from .recipes import apply_recipe

    settings = dict(
        model=model, data=data, out=out, epochs=epochs, lr=lr, lora_r=lora_r, lora_alpha=lora_alpha,
        lora_dropout=lora_dropout, lora_targets=lora_targets, cutoff_len=cutoff_len, template=template, batch_size=batch_size,
        micro_batch_size=micro_batch_size, dtype=dtype, resume=resume, warmup_ratio=warmup_ratio,
        save_steps=save_steps, seed=seed, limit=limit, bad_records=bad_records, adapter=adapter,
        sparse_lora=sparse_lora, loss=loss, teacher=teacher, kd_temperature=kd_temperature,
        kd_positions=kd_positions, teacher_cache=teacher_cache, teacher_topk=teacher_topk,
        group_by_length=group_by_length, fsdp=fsdp, targets=targets, max_train_tokens=max_train_tokens, **declared)
    train_log = run_recovery(RecoverConfig(**(apply_recipe(recipe, "recover", settings) if recipe else settings)))
    from . import distributed

    if not distributed.is_main():
        return
    curve = train_log["loss_curve"]
    first, last = (curve[0]["loss"], curve[-1]["loss"]) if curve else (float("nan"), float("nan"))
    typer.echo(f"{train_log['steps']} steps in {train_log['seconds']:.0f}s ({train_log['tokens_per_s']} tok/s); "
               f"loss {first:.3f} -> {last:.3f}; merged model: {out}/merged")


# --------------------------------------------------------------------------------------------- evaluate
# (registered below with every measurement's options)
def evaluate(
    models: list[str] = typer.Argument(..., help="One or more model specs, compared side by side."),
    batch_size: int = typer.Option(8, help="Batch size."),
    dtype: str = typer.Option("auto", help="auto (bf16 only where the hardware has native bf16) | bf16 | fp32."),
    label: list[str] = typer.Option([], help="Display name per model, in order (default: the model specs)."),
    out: Path = typer.Option(Path("results.json"), help="Results file; a markdown table is written beside it (.md)."),
    **measured: Any,  # every registered measurement's declared options (paser.evaluate: Measurement.options)
) -> None:
    """Evaluate models side by side: zero-shot tasks (lm-eval), perplexity, demo skills, fidelity to the original.

    Each model is loaded once; tasks and tokenised text are built once for all models. Writes
    results.json (metrics with stderr and n, versions, dtype, limit, wall time per task) and results.md.
    """
    from .evaluate import EvaluateConfig, run_evaluation

    settings = {name: [x.strip() for v in value for x in str(v).split(",") if x.strip()] if isinstance(value, list)
                else value for name, value in measured.items()}  # list options: repeated or comma-separated
    results = run_evaluation(EvaluateConfig(models=list(models), batch_size=batch_size, dtype=dtype,
                                            labels=list(label) or None, out=out, **settings))
    from . import distributed

    if distributed.is_main():
        typer.echo(results["table"])
        typer.echo(f"{results['seconds']:.0f}s; results -> {out}")


def _cli_type(declared: Any) -> Any:
    """The plain type a typer option needs for a declared field type (bounds and choices stay declared and are
    checked by paser.options.check_declared)."""
    import types
    import typing

    origin, args = typing.get_origin(declared), typing.get_args(declared)
    if origin is typing.Annotated:
        return _cli_type(args[0])
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        inner = _cli_type(kinds[0]) if len(kinds) == 1 else str  # e.g. str | Path
        return Optional[inner] if len(kinds) < len(args) else inner
    if origin is list:
        return list[str]
    if origin is typing.Literal:
        return type(args[0])
    return declared


def _with_declared_options(command: Any, fields: list[tuple[Any, Any]]) -> Any:
    """``command``'s signature with one typer option per declared field (name, type, default, help), in place of
    its ``**kwargs``: the CLI is built from the same declarations as the library config."""
    import dataclasses
    import inspect

    signature = inspect.signature(command)
    params = [p for p in signature.parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
    for f, declared in fields:
        cli_type = _cli_type(declared)
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        flag = "--" + f.name.replace("_", "-")
        decls = [f"{flag}/--no-{flag[2:]}"] if cli_type is bool else [flag]
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=cli_type,
                                        default=typer.Option(default, *decls, help=f.metadata.get("help", ""))))
    command.__signature__ = signature.replace(parameters=params)
    return command


def _register_declared_commands() -> None:
    from .evaluate.runner import measurement_fields
    from .objectives import OBJECTIVES
    from .options import declared_fields
    from .recover import RecoverBase
    from .targets import TARGETS

    from .select import SelectBase
    from .strategies import STRATEGIES

    app.command(name="select")(_with_declared_options(select, declared_fields(SelectBase, STRATEGIES.items())))
    app.command(name="recover")(
        _with_declared_options(recover, declared_fields(RecoverBase, [*TARGETS.items(), *OBJECTIVES.items()])))
    app.command(name="evaluate")(_with_declared_options(evaluate, measurement_fields()))


_register_declared_commands()


# ----------------------------------------------------------------------------------------------- export
@app.command()
def export(
    model: str = typer.Argument(..., help="A model folder: paser prune's output, paser recover's OUT/merged, or any save_pretrained folder."),
    out: Path = typer.Option(..., help="Output folder (written whole or not at all): the checkpoint, its tokenizer, export_report.json."),
    format: str = typer.Option("w4a16", "--format", help="dense (plain tensors) | w4a16 (int4 weights, groups of 128) | w8a8 (int8 weights per channel, int8 activations per token): compressed-tensors, what vLLM serves."),
    method: str = typer.Option("rtn", help="rtn: round to nearest, no data, every zero stays zero | gptq: calibrated on --calib-data, pruned positions set back to zero."),
    calib_data: Optional[str] = typer.Option(None, help="--method gptq: instruction records (default: the recovery data in MODEL/../train_log.json)."),
    calib_samples: int = typer.Option(128, help="--method gptq: records to calibrate on."),
    seq_len: int = typer.Option(256, help="--method gptq: tokens per calibration record at most."),
) -> None:
    """Export a pruned or recovered model as a deployable checkpoint: compressed-tensors quantized weights
    (llmcompressor; lm_head kept in full precision), its pruned zeros kept and checked.

    Writes OUT/export_report.json: size on disk before and after, each pruned layer's sparsity before and after
    (read back from the written folder), scheme, method, calibration records, time.
    """
    from .export import ExportConfig, run_export

    report = run_export(ExportConfig(model=model, out=str(out), format=format, method=method, calib_data=calib_data,
                                     calib_samples=calib_samples, seq_len=seq_len))
    size = report["size_bytes"]
    sparsity = report["sparsity"]
    kept = (f"; pruned layers {report['pruned_layers']}, min sparsity {sparsity['input_min']:.4f} -> {sparsity['output_min']:.4f}"
            if report["pruned_layers"] else "; no pruned layer")
    typer.echo(f"{report['format']}: weights {size['input_weights'] / 1e6:.1f} MB -> {size['output_weights'] / 1e6:.1f} MB "
               f"({size['weights_ratio']:.2f}x){kept}; {report['seconds']:.0f}s -> {out}")


# -------------------------------------------------------------------------------------------------- run
@app.command()
def run(
    config: Path = typer.Argument(..., help="Pipeline YAML config (sections model, prune or pruned, data, select, recover, evaluate, arms, seeds), or a shipped one by name: demo, compare, study, recovery, tokens."),
    out: Optional[Path] = typer.Option(None, help="Run directory (default: the config's 'out')."),
    from_stage: Optional[str] = typer.Option(None, "--from", help="Redo this stage (data, prune, select, recover, evaluate) and everything after it."),
    task_dir: Optional[Path] = typer.Option(None, help="Replace the config's zero-shot task directory (evaluate.task_dir)."),
    ppl: list[Path] = typer.Option([], help="Replace the config's perplexity texts (evaluate.ppl); repeatable."),
    arms: Optional[str] = typer.Option(None, help="Run only these arms (comma-separated names); a later full run reuses what they finished."),
    set_values: list[str] = typer.Option([], "--set", help="Override a config value: SECTION.KEY=VALUE or KEY=VALUE (VALUE as YAML), e.g. select.budget=0.05; repeatable."),
) -> None:
    """Run data -> prune -> select -> recover -> evaluate from one config, resumably.

    Stages whose inputs are unchanged since the last run are skipped; a changed setting redoes its
    stage and everything downstream. With several arms and a baseline, the evaluation ends with a
    comparison (mean +/- std over seeds, paired 95% intervals against the baseline; one comparison per
    arm when the config's baseline lists several). Writes OUT/run.json and OUT/report.html and prints
    the tables.
    """
    from .pipeline import load_config, run_pipeline, with_arms

    pipeline_config = load_config(config, set_values, task_dir=str(task_dir) if task_dir else None,
                                  ppl=[str(p) for p in ppl])
    if arms:
        pipeline_config = with_arms(pipeline_config, [a.strip() for a in arms.split(",") if a.strip()])
    _finish_run(run_pipeline(pipeline_config, out=out, from_stage=from_stage))


def _finish_run(run: dict) -> None:
    from rich.console import Console

    if not run:  # a rank other than 0 under a launcher: rank 0 reports
        return
    out = Path(run["out"])
    console = Console()
    for stage in run["stages"]:
        earlier = stage.get("earlier_run") or {}
        status = (f"skipped (up to date; it took {earlier.get('seconds') or 0:.0f}s when it ran)" if stage["skipped"]
                  else f"{stage['seconds']:.0f}s, peak {stage['peak_rss_gb']:.2f} GB")
        console.print(f"  {stage['stage']}: {status}")
    from .compare import comparison_files

    results = out / "evaluate" / "results.md"
    for table in ([results] if results.exists() else []) + comparison_files(out / "evaluate", ".md"):
        typer.echo(table.read_text())
    typer.echo(f"{run['seconds']:.0f}s; report: {out / 'report.html'}; run record: {out / 'run.json'}")


# ----------------------------------------------------------------------------------------------- report
@app.command()
def report(run_dir: Path = typer.Argument(..., help="A 'paser run' output directory.")) -> None:
    """Rebuild RUN_DIR/report.html (self-contained: clusters, CDS and budgets, JSD, CCG, losses, evaluation)."""
    from .report import build_report

    typer.echo(str(build_report(run_dir)))


# --------------------------------------------------------------------------------------------- validate
@app.command()
def validate(
    data: str = typer.Argument(..., help="Instruction data: .jsonl/.json/.csv/.parquet, a hub dataset name, or 'demo'."),
    columns: Optional[str] = typer.Option(None, help="Field mapping, e.g. instruction=question,output=answer or messages=conversations."),
    duplicates: str = typer.Option("keep", help="keep | drop duplicate (instruction, input) pairs."),
    report: bool = typer.Option(False, "--report", help="List every bad record (file:line: field: problem) instead of stopping at the first; exit 1 if there is any."),
) -> None:
    """Check an instruction data file: the first bad record is named by file, line and field.

    With --report every bad record is listed, then a count per reason; the exit status is 1 when any
    record is bad (2 when the file cannot be read at all).
    """
    from .data import ColumnMap, SkippedRecords, iter_records

    column_map = ColumnMap.parse(columns) if columns else None
    if report:
        skipped = SkippedRecords(examples_per_reason=None)
        good = sum(1 for _ in iter_records(data, column_map, bad_records="skip", skipped=skipped))
        for example in skipped.examples:
            typer.echo(example["message"])
        reasons = ", ".join(f"{n} {reason}" for reason, n in skipped.counts.items())
        typer.echo(f"{data}: {good} valid records, {skipped.total} bad" + (f" ({reasons})" if reasons else ""))
        raise typer.Exit(1 if skipped.total else 0)
    from .data import load_records

    records = load_records(data, column_map, duplicates=duplicates)
    with_input = sum(1 for r in records if r.input)
    typer.echo(f"{data}: {len(records)} valid records ({with_input} with input)")


# ------------------------------------------------------------------------------------------------- demo
@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="Demo run directory."),
    show_config: bool = typer.Option(False, "--show-config", help="Print the demo's pipeline config (or --config NAME's) and stop."),
    config_name: str = typer.Option("demo", "--config", help="Which shipped config: demo, tokens (the equal-token study), compare (selection methods on a slice of the real pool), study (record-budget candidate recipes) or recovery (recovery objectives); run them with paser run NAME."),
    export_data: Optional[Path] = typer.Option(None, help="Only write the built-in demo data (train.jsonl, heldout.jsonl) to this directory."),
    from_stage: Optional[str] = typer.Option(None, "--from", help="Redo this stage and everything after it."),
) -> None:
    """The whole pipeline on the embedded SmolLM2-135M-Instruct and the built-in demo data.

    Wanda 50%; 20% of the data's training tokens recovered three ways: paser's default recipe (a random slice
    distilled from the original), the same slice on its reference answers (the baseline), and PASER's
    selection distilled the same way. Evaluation: held-out response perplexity and, when ../shared/data exists, WikiText-2
    perplexity and ARC-e / PIQA. Ends with the side-by-side table, the paired differences against random and
    OUT/report.html. A second run skips every stage that is up to date.
    """
    import yaml

    from .demo_data import export_demo_data
    from .pipeline import parse_config, run_pipeline, shipped_config_text

    if show_config:
        typer.echo(shipped_config_text(config_name))
        return
    if export_data is not None:
        for split, path in export_demo_data(export_data).items():
            typer.echo(f"{split}: {path}")
        return
    config = parse_config(yaml.safe_load(shipped_config_text(config_name)), where=f"{config_name} config")
    _finish_run(run_pipeline(config, out=out, from_stage=from_stage))


def _run_app() -> object:
    """The typer app, then the process group closed (see :func:`paser.distributed.shutdown`)."""
    try:
        rc = app(standalone_mode=False)
    except BaseException:
        distributed.shutdown(clean=False)  # a failed rank must not wait at a barrier the others never reach
        raise
    else:
        distributed.shutdown()
    return rc


def main() -> None:
    """Entry point: user errors become one line on stderr and exit code 2 (traceback with --debug)."""
    try:
        rc = _run_app()
    except PaserError as exc:
        if _state["debug"]:
            raise
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except click.exceptions.Abort:
        typer.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    sys.exit(rc if isinstance(rc, int) else 0)


if __name__ == "__main__":
    main()
