"""``paser`` command line: a thin typer layer over the library (nothing here that the API lacks)."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import sys
import types
import typing
from pathlib import Path
from typing import Any

import click
import typer
import yaml
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from . import distributed
from .errors import PaserError

# Each command imports the library where it runs: `paser --help` reads only the option declarations and starts
# in about 2 s, not the 5 s that torch, transformers and peft take to load.

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
    threads: int | None = typer.Option(None, "--threads", help="CPU threads for torch (default: the CPUs this process may use). Warns when another heavy job is running."),
) -> None:
    _state["debug"] = debug
    _state["threads"] = threads

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
def prune(**settings: Any) -> None:
    """Prune a model: wanda and sparsegpt (llmcompressor one-shot), magnitude, taylor (structured).

    Unstructured methods zero weights (or N:M groups); taylor removes the least salient MLP channels and
    key/value head groups of every decoder layer (LLM-Pruner style) and shrinks the config. Writes a
    plain Hugging Face model directory with the tokenizer and prune_report.json (per-layer sparsity,
    parameters, perplexity before/after on held-out calibration samples, time, memory).
    """
    from .prune import PruneConfig, run_prune

    report = run_prune(PruneConfig(**settings))
    typer.echo(f"{report['method']}: sparsity {report['achieved_sparsity']:.4f} of decoder linear weights; "
               f"perplexity {report['perplexity_before']:.2f} -> {report['perplexity_after']:.2f}; "
               f"{report['seconds']:.0f}s -> {settings['out']}")


# ----------------------------------------------------------------------------------------------- select
# (registered below with every selection method's options)
def select(
    recipe: str | None = typer.Option(None, help="A named recipe whose settings override the options: paper (the PASER paper exactly)."),
    **settings: Any,  # SelectBase's fields and every selection method's declared options (Strategy.options)
) -> None:
    """Select recovery data with PASER, its ablations, or a baseline (random, full, perplexity, loss_gap, ifd, nuggets, dsir).

    Embeddings, clusters and model scores are cached (PASER_CACHE, default ~/.cache/paser), so a new
    budget, K, method or CCG setting recomputes no model scores.
    """
    from .recipes import apply_recipe
    from .selection import SelectConfig, check_options_belong, run_selection

    settings["target_sources"] = settings.get("target_sources") or None
    settings = apply_recipe(recipe, "select", settings, _defaults(SelectConfig)) if recipe else settings
    check_options_belong(settings["method"], settings)
    result = run_selection(SelectConfig(**settings))
    if distributed.is_main():  # one table, not one per process
        _print_selection(result.summary, Path(settings["out"]))


def _print_selection(summary: dict, out: Path) -> None:
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
# (registered below with every recovery method's, training target's and objective's options)
def recover(
    recipe: str | None = typer.Option(None, help="A named recipe whose settings override the options: paper (NLL LoRA at lr 1e-4 unless --lr, zeros re-applied after the merge)."),
    **settings: Any,  # RecoverBase's fields and every method's, target's and objective's declared options
) -> None:
    """Recover a pruned model on selected data toward the original: block by block against the original's block
    outputs, then end-to-end KD (--method auto, the default, where the original is known and the blocks keep its
    shapes), or end-to-end alone (masked LoRA or all weights; KD from the original, NLL, or another objective).

    Writes OUT/merged (a plain model directory that keeps every pruned zero) and OUT/train_log.json (loss curve per
    term or per block, tokens/s, seconds, peak memory; end-to-end: OUT/adapter and merge_max_logit_diff, how far the
    merged model's logits are from the trained model's).
    """
    from .recipes import apply_recipe
    from .recovery import RecoverConfig, run_recovery

    settings = apply_recipe(recipe, "recover", settings, _defaults(RecoverConfig)) if recipe else settings
    train_log = run_recovery(RecoverConfig(**settings))
    if not distributed.is_main():
        return
    for warning in train_log.get("resolved", {}).get("warnings", []):
        typer.secho(f"warning: {warning}", fg=typer.colors.YELLOW, err=True)
    curve = train_log["loss_curve"]
    first, last = (curve[0]["loss"], curve[-1]["loss"]) if curve else (float("nan"), float("nan"))
    typer.echo(f"{train_log['steps']} steps in {train_log['seconds']:.0f}s ({train_log['tokens_per_s']} tok/s); "
               f"loss {first:.3g} -> {last:.3g}; merged model: {settings['out']}/merged")


# --------------------------------------------------------------------------------------------- evaluate
# (registered below with every measurement's options)
def evaluate(**settings: Any) -> None:  # EvaluateBase's fields and every measurement's declared options
    """Evaluate models side by side: zero-shot tasks (lm-eval), perplexity, demo skills, fidelity to the original.

    Each model is loaded once; tasks and tokenised text are built once for all models. Writes
    results.json (metrics with stderr and n, versions, dtype, limit, wall time per task) and results.md.
    """
    from .evaluate import EvaluateConfig, run_evaluation

    settings = {name: [x.strip() for v in value for x in str(v).split(",") if x.strip()] if isinstance(value, list)
                else value for name, value in settings.items()}  # list options: repeated or comma-separated
    settings["labels"] = settings["labels"] or None
    results = run_evaluation(EvaluateConfig(**settings))
    if distributed.is_main():
        typer.echo(results["table"])
        typer.echo(f"{results['seconds']:.0f}s; results -> {settings['out']}")


def _defaults(config: type) -> dict[str, Any]:
    """Each field's default (the CLI's): what tells an option the user gave from one left alone."""
    return {f.name: f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
            for f in dataclasses.fields(config)}


def _cli_type(declared: Any) -> Any:
    """The plain type a typer option needs for a declared field type (bounds and choices stay declared and are
    checked by paser.options.check_declared)."""

    origin, args = typing.get_origin(declared), typing.get_args(declared)
    if origin is typing.Annotated:
        return _cli_type(args[0])
    if origin in (typing.Union, types.UnionType):
        kinds = [a for a in args if a is not type(None)]
        inner = _cli_type(kinds[0]) if len(kinds) == 1 else str  # e.g. str | Path
        return inner | None if len(kinds) < len(args) else inner
    if origin is list:
        return list[str]
    if origin is typing.Literal:
        return type(args[0])
    return declared


def _with_declared_options(command: Any, config: type, fields: list[tuple[Any, Any]],
                           notes: dict[str, str] | None = None) -> Any:
    """``command``'s signature with one typer parameter per declared field (name, type, default, help, choices), in
    place of its ``**settings``: the CLI is built from the same declarations as the library config."""

    from .options import choices_help

    signature = inspect.signature(command)
    params = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in signature.parameters.values()
              if p.kind is not inspect.Parameter.VAR_KEYWORD]
    for f, declared in fields:
        cli_type, cli = _cli_type(declared), f.metadata.get("cli")
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        default = ... if default is dataclasses.MISSING else default
        help = f.metadata.get("help", "") + choices_help(config, f.name, declared) + (notes or {}).get(f.name, "")
        if cli == "argument":
            param = typer.Argument(default, help=help)
        else:
            flag = cli or "--" + f.name.replace("_", "-")
            decls = [f"{flag}/--no-{flag[2:]}"] if cli_type is bool else [flag]
            param = typer.Option(default, *decls, help=help)
        params.append(inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=cli_type, default=param))
    params.sort(key=lambda p: not isinstance(p.default, typer.models.ArgumentInfo))  # arguments first
    command.__signature__ = signature.replace(parameters=params)
    return command


def _register_declared_commands() -> None:
    """prune, select, recover, evaluate and export, each built from its library config's declared fields."""
    from .evaluate.runner import EvaluateBase, measurement_fields
    from .export import ExportConfig
    from .options import cli_fields
    from .prune import PruneConfig
    from .recovery import RecoverBase, recover_options_owners
    from .selection import STRATEGIES, SelectBase

    commands = [(prune, PruneConfig, cli_fields(PruneConfig)),
                (select, SelectBase, cli_fields(SelectBase, STRATEGIES.items())),
                (recover, RecoverBase, cli_fields(RecoverBase, recover_options_owners())),
                (evaluate, EvaluateBase, cli_fields(EvaluateBase) + measurement_fields()),
                (export, ExportConfig, cli_fields(ExportConfig))]
    notes = {"recover": _read_by_notes()}
    for command, config, fields in commands:
        app.command(name=command.__name__)(_with_declared_options(command, config, fields, notes.get(command.__name__)))


def _read_by_notes() -> dict[str, str]:
    """``paser recover``'s options that not every method reads, each with who reads it (from the declarations that
    also refuse such an option when nothing chosen reads it)."""
    from .recovery import readers

    owners = readers()
    everyone = {who for names in owners.values() for who in names if who.startswith("method ")}
    notes = {}
    for name, who in owners.items():
        if everyone <= set(who):
            continue
        kinds: dict[str, list[str]] = {}
        for entry in who:
            kind, _, owner = entry.partition(" ")
            kinds.setdefault(kind, []).append(owner)
        notes[name] = " Read by " + "; ".join(f"{kind} {', '.join(names)}" for kind, names in kinds.items()) + "."
    return notes



# ----------------------------------------------------------------------------------------------- export
def export(**settings: Any) -> None:  # ExportConfig's fields
    """Export a pruned or recovered model as a deployable checkpoint: compressed-tensors quantized weights
    (llmcompressor; lm_head kept in full precision), its pruned zeros kept and checked.

    Writes OUT/export_report.json: size on disk before and after, each pruned layer's sparsity before and after
    (read back from the written folder), scheme, method, calibration records, time.
    """
    from .export import ExportConfig, run_export

    report = run_export(ExportConfig(**settings))
    size = report["size_bytes"]
    sparsity = report["sparsity"]
    kept = (f"; pruned layers {report['pruned_layers']}, min sparsity {sparsity['input_min']:.4f} -> {sparsity['output_min']:.4f}"
            if report["pruned_layers"] else "; no pruned layer")
    typer.echo(f"{report['format']}: weights {size['input_weights'] / 1e6:.1f} MB -> {size['output_weights'] / 1e6:.1f} MB "
               f"({size['weights_ratio']:.2f}x){kept}; {report['seconds']:.0f}s -> {settings['out']}")


_register_declared_commands()


# -------------------------------------------------------------------------------------------------- run
@app.command()
def run(
    config: Path = typer.Argument(..., help="Pipeline YAML config (sections model, prune or pruned, data, select, recover, evaluate, arms, seeds), or a shipped one by name: demo, compare, study, recovery, tokens."),
    out: Path | None = typer.Option(None, help="Run directory (default: the config's 'out')."),
    from_stage: str | None = typer.Option(None, "--from", help="Redo this stage (data, prune, select, recover, evaluate) and everything after it."),
    task_dir: Path | None = typer.Option(None, help="Replace the config's zero-shot task directory (evaluate.task_dir)."),
    ppl: list[Path] = typer.Option([], help="Replace the config's perplexity texts (evaluate.ppl); repeatable."),
    arms: str | None = typer.Option(None, help="Run only these arms (comma-separated names); a later full run reuses what they finished."),
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
    columns: str | None = typer.Option(None, help="Field mapping, e.g. instruction=question,output=answer or messages=conversations."),
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
    export_data: Path | None = typer.Option(None, help="Only write the built-in demo data (train.jsonl, heldout.jsonl) to this directory."),
    from_stage: str | None = typer.Option(None, "--from", help="Redo this stage and everything after it."),
) -> None:
    """The whole pipeline on the embedded SmolLM2-135M-Instruct and the built-in demo data.

    Wanda 50%; 20% of the data's training tokens recovered three ways: paser's default recipe (a random slice
    distilled from the original), the same slice on its reference answers (the baseline), and PASER's
    selection distilled the same way. Evaluation: held-out response perplexity and, when ../shared/data exists, WikiText-2
    perplexity and ARC-e / PIQA. Ends with the side-by-side table, the paired differences against random and
    OUT/report.html. A second run skips every stage that is up to date.
    """

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
