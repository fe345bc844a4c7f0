"""The CLI is generated from the library configs: every declared field of prune, select, recover, evaluate and
export is one option (or argument) with the config's default, help and choices; nothing is listed by hand."""

import dataclasses

import pytest
import typer

from paser.cli import app


def _commands():
    from paser.evaluate.runner import EvaluateBase, measurement_fields
    from paser.export import ExportConfig
    from paser.options import cli_fields
    from paser.prune import PruneConfig
    from paser.recovery import RecoverBase, recover_options_owners
    from paser.selection.select import SelectBase
    from paser.selection.strategies import STRATEGIES

    return {"prune": (PruneConfig, cli_fields(PruneConfig)),
            "select": (SelectBase, cli_fields(SelectBase, STRATEGIES.items())),
            "recover": (RecoverBase, cli_fields(RecoverBase, recover_options_owners())),
            "evaluate": (EvaluateBase, cli_fields(EvaluateBase) + measurement_fields()),
            "export": (ExportConfig, cli_fields(ExportConfig))}


@pytest.mark.parametrize("name", ["prune", "select", "recover", "evaluate", "export"])
def test_every_config_field_is_one_cli_parameter_with_its_default_and_choices(name):
    from paser.options import choices

    config, fields = _commands()[name]
    command = typer.main.get_command(app).commands[name]
    params = {p.name: p for p in command.params}
    declared = {f.name for f, _ in fields}
    assert declared <= set(params), f"{name}: no option for {sorted(declared - set(params))}"
    assert set(params) - declared <= {"recipe", "help"}, f"{name}: options not declared on the config"
    for f, tp in fields:
        param = params[f.name]
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            assert param.required, f.name
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        assert param.default == default or (param.default in ((), []) and default in ([], None)), (f.name, param.default)
        assert f.metadata.get("help"), f"{name} --{f.name} has no help"
        for choice in choices(config, f.name, tp):
            if not choice.endswith("-test"):  # throw-away registrations of other tests come after the CLI is built
                assert choice in param.help, (f.name, choice)


def test_configs_exclude_only_what_they_say_is_config_only():
    from paser.selection.select import SelectBase

    command = typer.main.get_command(app).commands["select"]
    assert "cache_dir" not in {p.name for p in command.params} and {"cache_dir"} == SelectBase.CONFIG_ONLY


def test_the_cli_runs_the_library_config_with_a_generated_option(tmp_path):
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, ["select", "--original", "m", "--pruned", "m", "--data", "demo", "--out",
                                      str(tmp_path), "--budget", "3", "--dtype", "fp64"])
    assert result.exit_code != 0 and "dtype must be" in (result.output + str(result.exception))


def test_a_registered_plugin_describes_itself_in_help():
    """A new objective is listed in ``--loss``'s help with its own docstring's first line, written nowhere else."""
    from paser.objectives import OBJECTIVES, Objective
    from paser.options import choices_help
    from paser.recovery import RecoverBase

    @OBJECTIVES.register("test-only-loss")
    class TestOnly(Objective):
        """Nothing but a test's loss.

        The rest of the docstring stays out of --help."""

    try:
        text = choices_help(RecoverBase, "loss", str)
        assert "test-only-loss: Nothing but a test's loss |" not in text
        assert text.endswith("test-only-loss: Nothing but a test's loss.") and "kd: Distil" in text
        assert "stays out" not in text
    finally:
        OBJECTIVES.unregister("test-only-loss")
