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


def _string_constants(path) -> set[str]:
    return {node.value for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.Constant) and isinstance(node.value, str)}


def _modules_outside(folder: str | None = None):
    for path in sorted(PACKAGE.rglob("*.py")):
        if folder is None or path.parent.name != folder:
            yield path


def test_the_writer_side_and_the_registries_load_no_torch():
    """What writes and commits the table, the run directory's owner, the plan, and the
    seams' registries (read by the CLI before any work) import no torch."""
    modules = ("commit", "writer", "formats", "rundir", "plan", "keys", "night_diff",
               "night_table", "night_rows",
               "options", "config", "runtimes", "engines", "sources", "launchers")
    code = (f"import sys; import {', '.join('pipeline.' + m for m in modules)}; "
            "print(sorted(m for m in ('torch', 'torchvision') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=REPO, check=True)
    assert done.stdout.strip() == "[]"


def test_nothing_outside_runtimes_names_a_runtime():
    """Only the registry (pipeline.runtimes) is imported outside runtimes/, and no module
    there spells the name of a runtime with kernels of its own, or a precision only such a
    runtime offers: settings chooses among whatever is registered."""
    from pipeline import runtimes

    own = {name for name, r in runtimes.RUNTIMES.items() if r.own_kernels}
    only_theirs = {p for p in runtimes.precisions()
                   if set(runtimes.offering(p)) <= own}
    assert own and only_theirs  # OpenVINO, INT8: what the rule is about is registered
    graph = module_imports()
    for path in _modules_outside("runtimes"):
        parts = path.relative_to(REPO).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        particular = {i for i in graph[name]
                      if i.startswith("pipeline.runtimes.") and i.count(".") == 2
                      and i not in ("pipeline.runtimes.base",)
                      and i.rpartition(".")[2] not in runtimes.__all__}
        assert not particular, (name, particular)
        assert not (_string_constants(path) & (own | only_theirs)), name


def test_the_settings_name_no_runtime():
    """What a runtime costs and gives is its own to say (runtimes/): the settings' decisions
    and the measurements weigh whatever is registered, naming none but torch as built (the
    baseline). Only the --compile alias (config.py) and bench's compile stage name
    torch.compile."""
    for path in _modules_outside("runtimes"):
        names = {node.attr for node in ast.walk(ast.parse(path.read_text()))
                 if isinstance(node, ast.Attribute)} | {
                     node.id for node in ast.walk(ast.parse(path.read_text()))
                     if isinstance(node, ast.Name)}
        if path.name != "config.py" and path.parent.name != "bench":
            assert "COMPILED" not in names, path
        if path.name in ("settings.py", "tuning.py"):
            tree = ast.parse(path.read_text())
            keys = {id(k) for node in ast.walk(tree) if isinstance(node, ast.Dict)
                    for k in node.keys}  # a record's key (run.json's `compile`) is no choice
            spelled = {node.value for node in ast.walk(tree) if isinstance(node, ast.Constant)
                       and isinstance(node.value, str) and id(node) not in keys}
            assert not (spelled & set(runtimes_names())), path


def runtimes_names() -> list[str]:
    from pipeline import runtimes

    return list(runtimes.RUNTIMES)


def test_a_run_record_is_read_in_rundir_only():
    """run.json and summary.json are parsed by rundir.py (`recorded`, `finished_run`,
    `summary_of`): the commands that read a finished run name none of their keys' files."""
    for path in PACKAGE.rglob("*.py"):
        if path.name == "rundir.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(
                    node.func, "attr", None)) == "read_json":
                named = {getattr(a, "id", getattr(a, "attr", None)) for a in node.args}
                assert not named & {"RUN_FILE", "SUMMARY_FILE"}, path


def test_registries_are_followed_by_reading_not_by_strings():
    """No module is imported by a string a reader (or a tool) cannot follow."""
    for path in PACKAGE.rglob("*.py"):
        assert "import_module(" not in path.read_text(), path


def test_run_directory_file_names_are_spelled_in_rundir_only():
    """The run directory's names are rundir's; a table's own name is its format's."""
    from pipeline import rundir

    names = {value for key, value in vars(rundir).items()
             if key.isupper() and isinstance(value, str) and key != "TMP_MARK"}
    assert {"run.json", "plan.json", "parts", "quarantine.json"} <= names
    for path in PACKAGE.rglob("*.py"):
        if path.name == "rundir.py":
            continue
        assert not (_string_constants(path) & names), (path, _string_constants(path) & names)


def test_the_model_side_leans_on_no_later_stage():
    """Stages import earlier ones only: the classifier hands its Prediction over
    (pipeline.prediction) and knows nothing of how rows are written or committed."""
    graph = known(module_imports())
    later = {"pipeline.writer", "pipeline.commit", "pipeline.formats", "pipeline.labeller"}
    for name in ("pipeline.classifier", "pipeline.preprocess", "pipeline.decode",
                 "pipeline.loader"):
        assert not graph[name] & later, (name, graph[name] & later)


def test_a_cluster_engine_is_handed_the_labelling_and_says_only_where_it_runs():
    """What labels a shard on a worker, the queue of shards with deaths and poison, and
    the shared-directory check live in engines/cluster.py; a cluster engine's module
    imports neither the labeller nor the job, and keeps its own library's calls."""
    graph = known(module_imports())
    for engine in ("pipeline.engines.ray",):
        assert "pipeline.engines.cluster" in graph[engine]
        assert not graph[engine] & {"pipeline.labeller", "pipeline.job", "pipeline.plan"}


def test_every_module_can_be_imported_first():
    """Each module imported before any other of ours, in one interpreter with our modules
    forgotten between: a circle through a package's __init__ (importing
    pipeline.formats.base runs pipeline/formats/__init__.py, which the graph above does
    not see) breaks only the modules that start it. Optional libraries not installed
    are not counted."""
    names = sorted(set(module_imports()) - {"pipeline.__main__"})  # that one runs the CLI
    probe = (
        "import importlib, sys\n"
        f"names = {names!r}\n"
        "for name in names:\n"
        "    for loaded in [m for m in sys.modules if m.split('.')[0] == 'pipeline']:\n"
        "        del sys.modules[loaded]\n"
        "    try:\n"
        "        importlib.import_module(name)\n"
        "    except ImportError as error:\n"
        "        if 'partially initialized' in str(error) or (error.name or '').startswith(\n"
        "                'pipeline'):\n"
        "            print(f'{name}: {error}')\n")
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == ""
