"""The README and docs/ cannot drift from the CLI: every ``paser`` command they show names a real subcommand,
options that subcommand accepts, shipped configs that exist and, for ``paser run NAME --arms``, arms of that config."""

import re
import shlex
from pathlib import Path

import pytest
import typer

from paser.cli import app

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def shown_commands(text: str) -> list[str]:
    """Every ``paser ...`` invocation in fenced code blocks (continuation lines joined, comments dropped) and in
    inline code spans."""
    commands = []
    for block in re.findall(r"```(?:bash|sh|console)?\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split("  #")[0].split(" # ")[0]
            match = re.search(r"(?:^|\s|-m )paser (.*)", line)
            if match and not line.lstrip().startswith(("$", "error:", "#")):
                commands.append(match.group(1).strip())
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    commands += [m.group(1) for m in re.finditer(r"`paser ([^`]+)`", text)]
    return commands


def check(command: str, cli) -> list[str]:
    """What is wrong with one shown command line (empty when it parses)."""
    try:
        tokens = shlex.split(command)
    except ValueError:
        tokens = command.split()
    global_flags = {opt for p in cli.params for opt in (*p.opts, *p.secondary_opts)}
    while tokens and tokens[0] in global_flags:  # paser --debug / --threads N before the subcommand
        tokens = tokens[2:] if tokens[0] == "--threads" else tokens[1:]
    if not tokens or tokens[0].startswith("-") or tokens[0] == "...":
        return []  # `paser --help`, `paser --threads N ...`
    name, args = tokens[0], tokens[1:]
    if "|" in name:  # `paser prune|select|recover`: each of them
        return [error for each in name.split("|") for error in check(" ".join([each, *args]), cli)]
    if name not in cli.commands:
        return [f"no subcommand {name!r}"]
    sub = cli.commands[name]
    accepted = {opt for p in sub.params for opt in (*p.opts, *p.secondary_opts)} | {"--help"}
    errors = [f"paser {name}: no option {flag}" for flag in (a.split("=")[0] for a in args if a.startswith("--"))
              if flag not in accepted]
    if name == "run" and args and not args[0].startswith("-"):
        errors += check_run(args)
    return errors


def check_run(args: list[str]) -> list[str]:
    import yaml

    from paser.pipeline.schema import SHIPPED_CONFIGS, shipped_config_text

    target = args[0]
    if target.endswith((".yaml", ".yml")) or "/" in target or target.isupper() or target == "...":
        return []  # the reader's own config
    if target not in SHIPPED_CONFIGS:
        return [f"paser run {target}: no shipped config of that name ({sorted(SHIPPED_CONFIGS)})"]
    if "--arms" not in args:
        return []
    # the arms as written (not load_config: that checks the data paths, absent where ../shared/data is)
    known = {arm["name"] for arm in yaml.safe_load(shipped_config_text(target)).get("arms", [])}
    asked = args[args.index("--arms") + 1].split(",")
    return [f"paser run {target}: no arm {arm!r}" for arm in asked if arm not in known and arm != "..."]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_command_shown_in_the_docs_parses(page):
    cli = typer.main.get_command(app)
    errors = [f"{page.name}: `paser {c}`: {e}" for c in shown_commands(page.read_text()) for e in check(c, cli)]
    assert not errors, "\n".join(errors)


def test_the_docs_check_finds_a_misspelt_flag_and_an_unknown_arm():
    cli = typer.main.get_command(app)
    shown = shown_commands("```bash\npaser recover pruned/ --data sel.jsonl --ouput rec/   # typo\n```\n"
                           "and `paser run tokens --arms random,randmo`")
    assert shown == ["recover pruned/ --data sel.jsonl --ouput rec/", "run tokens --arms random,randmo"]
    assert check(shown[0], cli) == ["paser recover: no option --ouput"]
    assert check(shown[1], cli) == ["paser run tokens: no arm 'randmo'"]
    assert check("recover pruned/ --data sel.jsonl --out rec/", cli) == []


def test_every_page_the_readme_links_exists():
    readme = (ROOT / "README.md").read_text()
    linked = re.findall(r"\]\(([^)#]+)\)", readme)
    assert linked and all((ROOT / link).exists() for link in linked), [link for link in linked
                                                                       if not (ROOT / link).exists()]
