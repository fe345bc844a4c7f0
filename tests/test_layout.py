"""The source tree reads as the stages it runs, and no module imports one above it: data -> prune -> selection ->
recovery -> evaluate -> export -> pipeline -> cli, over a foundation every stage may use."""

import ast
from pathlib import Path

import paser

ROOT = Path(paser.__file__).parent
LAYERS = [  # each entry may import its own layer and those before it, never one after
    {"errors", "faults", "cache", "registry", "options", "runtime", "distributed", "recipes"},
    {"demo_data", "data", "models", "sparsity", "generate"},
    {"passes", "teacher"},
    {"prune"},
    {"selection"},
    {"objectives", "targets"},
    {"recovery"},
    {"evaluate"},
    {"compare", "export", "report"},
    {"pipeline"},
    {"cli", "__main__", "__init__"},
]
RANK = {name: i for i, layer in enumerate(LAYERS) for name in layer}


def _imports():
    """(importing top-level module, imported top-level module, file) for every import between two of paser's."""
    for path in ROOT.rglob("*.py"):
        parts = path.relative_to(ROOT.parent).with_suffix("").parts
        package = parts[:-1]  # a relative import starts from the folder the file is in
        source = parts[1] if len(parts) > 1 else "__init__"
        for node in ast.walk(ast.parse(path.read_text())):
            targets = []
            if isinstance(node, ast.ImportFrom) and node.level:
                base = list(package[: len(package) - node.level + 1])
                targets = [".".join(base + [node.module])] if node.module else \
                    [".".join(base + [alias.name]) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("paser."):
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("paser.")]
            for target in targets:
                name = target.split(".")[1] if "." in target else "__init__"
                if name != source:
                    yield source, name, path.relative_to(ROOT)


def test_every_module_has_a_layer():
    tops = {p.stem if p.is_file() else p.name for p in ROOT.iterdir()
            if (p.suffix == ".py") or (p.is_dir() and (p / "__init__.py").exists())}
    assert tops == set(RANK), (tops - set(RANK), set(RANK) - tops)


def test_no_module_imports_one_above_it():
    upward = sorted({f"{file}: {a} imports {b}" for a, b, file in _imports() if RANK[b] > RANK[a]})
    assert not upward, upward


def test_the_top_level_holds_the_stages_not_their_parts():
    assert not {"select", "score", "cluster", "embed", "allocate", "ccg", "strategies", "recover", "distill",
                "adapters"} & {p.stem for p in ROOT.iterdir()}
