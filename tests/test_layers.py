"""The package's three layers, as the tree shows them, hold: core knows no Dagster, private
Dagster imports sit in one adapter, nothing imports in a cycle, the CLI starts without Dagster."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).parent.parent / "backfill_assets"


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py")}


def test_the_database_core_imports_neither_dagster_nor_the_layers_above_it():
    for module, imported in MODULES.items():
        if module.startswith("backfill_assets.core"):
            above = {
                name
                for name in imported
                if name.split(".")[0] in {"dagster", "dagster_dbt"}
                or name.startswith(("backfill_assets.defs", "backfill_assets.tooling"))
            }
            assert not above, f"{module} imports {sorted(above)}"


def test_the_dagster_layer_does_not_import_the_tooling():
    for module, imported in MODULES.items():
        if module.startswith("backfill_assets.defs"):
            assert not {n for n in imported if n.startswith("backfill_assets.tooling")}, module


def test_private_dagster_imports_are_fenced_in_one_module():
    private = {
        m for m, imported in MODULES.items() if any(n.startswith("dagster._") for n in imported)
    }
    assert private == {"backfill_assets.defs.dagster_internals"}


def test_no_modules_import_each_other_in_a_cycle():
    graph = {
        module: {name for name in MODULES if name != module and name in imported}
        for module, imported in MODULES.items()
    }
    state: dict[str, str] = {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for target in graph[module]:
            if state.get(target) == "open":
                raise AssertionError(" -> ".join([*path, module, target]))
            if target not in state:
                visit(target, [*path, module])
        state[module] = "done"

    for module in graph:
        if module not in state:
            visit(module, [])


def test_the_cli_starts_without_loading_dagster_or_the_definitions():
    probe = (
        "import sys, backfill_assets.tooling.cli; "
        "print(sorted(m for m in ('dagster', 'dagster_dbt', 'backfill_assets.definitions') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
