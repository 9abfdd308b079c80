"""The package's shape: no import circles, and the run directory's owner loads no torch."""

from __future__ import annotations

import ast
import subprocess
import sys

from tests.conftest import REPO

PACKAGE = REPO / "pipeline"


def module_imports() -> dict[str, set[str]]:
    """Each pipeline module -> the pipeline modules it imports, inside functions too."""
    graph = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(
                    "pipeline"):
                imported.add(node.module)
                imported.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names if a.name.startswith("pipeline"))
        graph[name] = imported
    return {name: imported - {name} for name, imported in graph.items()}


def known(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Imports of modules (not of names from them), as a graph over the package."""
    return {name: {i for i in imported if i in graph} for name, imported in graph.items()}


def test_every_pipeline_import_names_a_module_or_a_name_in_one():
    """A module renamed away must not linger in an import (an editable install of another
    checkout can hide that from the tests, not from a fresh clone)."""
    graph = module_imports()
    for name, imported in graph.items():
        for target in imported:
            parent = target.rpartition(".")[0]
            assert target in graph or parent in graph, (name, target)


def test_no_module_imports_itself_back_through_others():
    graph = known(module_imports())
    assert len(graph) > 20  # the walk found the package

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for nxt in graph[start]:
            if nxt == target or (nxt not in seen and reaches(nxt, target, seen | {nxt})):
                return True
        return False

    assert [name for name in graph if reaches(name, name, {name})] == []


def test_the_run_directory_and_sources_load_no_torch():
    code = ("import sys, pipeline.rundir, pipeline.sources, pipeline.writer, "
            "pipeline.launchers; print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, check=True)
    assert done.stdout.strip() == "False"


def test_every_package_of_the_pipeline_is_installed():
    """`pip install .` (not -e) ships what pyproject names: each subpackage must match."""
    import fnmatch
    import tomllib

    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    include = config["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = [".".join(init.parent.relative_to(REPO).parts)
                for init in (REPO / "pipeline").rglob("__init__.py")]
    assert "pipeline.sources" in packages and "pipeline.backends" in packages
    for package in packages:
        assert any(fnmatch.fnmatchcase(package, pattern) for pattern in include), package
