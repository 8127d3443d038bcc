"""Imports point one way: kernels → store → models & capture → data → jobs → interface → service.

Every module of ``vitcnn_store``, ``jobs`` and ``cluster`` is parsed with
:mod:`ast` (imports at the top, inside functions and under ``TYPE_CHECKING``
alike) and each import of one of our modules must go to the same or a lower
layer; some layers and packages must also stay clear of some libraries
(``docs/architecture.md`` explains the layers). Inside ``vitcnn_store`` only
the interface subpackage (``vitcnn_store/interface/``) may import ``jobs``, so
the folder-level circle vitcnn_store → jobs → vitcnn_store has one visible door;
and no layer holds an import cycle. The layer map below is the only place the
layers are written down for the code.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_PACKAGES = ("vitcnn_store", "jobs", "cluster")

# Lowest first: a module may import its own layer and any layer before it.
LAYERS = (
    "base",
    "kernels",
    "store",
    "models",
    "data",
    "jobs",
    "interface",
    "service",
    "deployment",
)

# Packages: every module inside takes the package's layer.
PACKAGE_LAYERS = {
    "vitcnn_store.analysis": "kernels",
    "vitcnn_store.store": "store",
    "vitcnn_store.models": "models",
    "vitcnn_store.data": "data",
    "jobs": "jobs",
    "vitcnn_store.interface": "interface",
    "vitcnn_store.serve": "service",
    "cluster": "deployment",
}
# Single modules (a new module of vitcnn_store/ must be added here, or the test fails).
MODULE_LAYERS = {
    "vitcnn_store._version": "base",
    "vitcnn_store.errors": "base",
    "vitcnn_store.defaults": "base",
    # The package root is the Python API: the store reader and the errors, and
    # ``extract`` through the interface (imported on first use, so
    # ``import vitcnn_store`` stays as light as the store).
    "vitcnn_store": "interface",
    "vitcnn_store.options": "base",
    # ``python -m vitcnn_store.cli``: the command's stable address, pointing into the interface.
    "vitcnn_store.cli": "interface",
}
# Inside vitcnn_store, only these packages may import ``jobs`` (the service and the
# package root reach the jobs through them).
JOBS_DOOR = ("vitcnn_store.interface",)
# The one import that points up: the CLI is every command's entry point, and it hands
# `vitcnn serve` to the service's command module (argparse only; FastAPI loads when a
# server starts).
ENTRY_POINTS = {("vitcnn_store.interface.cli", "vitcnn_store.serve.command")}
# What a layer must not know about, beyond the layers above it.
FORBIDDEN = {
    "kernels": {"zarr", "xarray", "ray", "dask", "distributed", "fsspec", "torch", "timm"},
    "store": {"torch", "timm", "ray"},
    "models": {"zarr", "ray"},
    "data": {"ray", "torch", "timm", "vitcnn_store.models"},
}
# What a package must not know, beyond its layer's rule: the analysis jobs read stored
# activations (no model, so no torch) and draw nothing (the interface draws).
FORBIDDEN_IN = {"jobs.analyze": {"torch", "timm", "matplotlib"}}


def _under(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def forbidden_for(module: str) -> set[str]:
    """The libraries and modules ``module`` must not import (its layer's and packages')."""
    out = set(FORBIDDEN.get(layer_of(module) or "", set()))
    for package, names in FORBIDDEN_IN.items():
        if _under(module, package):
            out |= names
    return out


def layer_of(module: str) -> str | None:
    """The layer of one of our modules (None when the map does not place it)."""
    if module in MODULE_LAYERS:
        return MODULE_LAYERS[module]
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        prefix = ".".join(parts[:i])
        if prefix in PACKAGE_LAYERS:
            return PACKAGE_LAYERS[prefix]
    return None


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_ours(module: str) -> bool:
    return module.split(".")[0] in TOP_PACKAGES


def _exists(module: str) -> bool:
    base = ROOT.joinpath(*module.split("."))
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def imported_modules(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module) for every import in ``source``; ``from a import b`` names the
    module ``a.b`` when that is one of ours, else ``a``."""
    out: list[tuple[int, str]] = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = module.split(".") if is_package else module.split(".")[:-1]
                anchor = package[: len(package) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.append((node.lineno, sub if _is_ours(sub) and _exists(sub) else base))
    return out


def violations(source: str, module: str, is_package: bool = False) -> list[str]:
    """Wrong-way imports of ``module`` (whose code is ``source``), one line each."""
    layer = layer_of(module)
    if layer is None:
        return [f"{module}: in no layer; add it to the layer map of tests/test_architecture.py"]
    rank = LAYERS.index(layer)
    bad = []
    forbidden = forbidden_for(module)
    door = module.split(".")[0] != "vitcnn_store" or any(_under(module, p) for p in JOBS_DOOR)
    for line, target in imported_modules(source, module, is_package):
        if any(_under(target, f) for f in forbidden):
            bad.append(f"{module}:{line} imports {target}, which {module} must not know")
        elif _under(target, "jobs") and not door:
            bad.append(f"{module}:{line} imports {target}: only {JOBS_DOOR[0]} imports jobs")
        elif _is_ours(target):
            other = layer_of(target)
            if other is None:
                bad.append(f"{module}:{line} imports {target}, which is in no layer")
            elif LAYERS.index(other) > rank and (module, target) not in ENTRY_POINTS:
                bad.append(f"{module}:{line} ({layer}) imports {target} ({other}): wrong way")
    return bad


def our_modules() -> list[Path]:
    return sorted(p for top in TOP_PACKAGES for p in (ROOT / top).rglob("*.py"))


def test_imports_point_one_way() -> None:
    problems = []
    for path in our_modules():
        name = module_name(path)
        problems += violations(path.read_text(encoding="utf-8"), name, path.name == "__init__.py")
    assert not problems, "\n".join(problems)


def test_the_check_catches_wrong_way_imports() -> None:
    """The walker sees imports at module level, in functions and under TYPE_CHECKING."""
    source = (
        "import zarr\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from vitcnn_store.store.reader import Run\n"
        "def f():\n"
        "    from vitcnn_store.interface import plots\n"
        "    import jobs.analyze\n"
        "    from . import gram\n"
    )
    found = violations(source, "vitcnn_store.analysis.example")
    assert len(found) == 4, found
    assert "zarr" in found[0] and "plots" in "".join(found) and "jobs.analyze" in "".join(found)
    assert violations("from vitcnn_store.interface.plots import plot_cka\n", "jobs.analyze.x")
    assert violations("from jobs.extract import extract\n", "vitcnn_store.store.reader")
    assert violations("import os\n", "vitcnn_store.newthing")  # unplaced module
    # The service sits above the interface: only the CLI's entry point may reach it.
    assert violations("from vitcnn_store.serve.app import create_app\n", "vitcnn_store.cli")
    assert violations("from vitcnn_store.serve.command import cmd_serve\n", "jobs.x")
    entry = "from vitcnn_store.serve.command import x\n"
    assert not violations(entry, "vitcnn_store.interface.cli")
    # Only the interface subpackage opens the door to the jobs: not the service above it,
    # nor the root or a module of vitcnn_store beside it.
    assert violations("from jobs.analyze import checks\n", "vitcnn_store.serve.jobs")
    assert violations("import jobs.api\n", "vitcnn_store")
    assert violations("def f():\n    import jobs\n", "vitcnn_store.cli")
    # Kernels never import torch; analysis jobs neither torch nor matplotlib; other jobs may.
    assert violations("import torch\n", "vitcnn_store.analysis.cka")
    assert violations("def f():\n    import torch.nn\n", "jobs.analyze.skip")
    assert violations("from matplotlib.figure import Figure\n", "jobs.analyze.pipeline")
    assert not violations("import torch\n", "jobs.extract")
    # Downward and same-layer imports are fine, lazily or not.
    ok = "def f():\n    from jobs.analyze import options\nfrom vitcnn_store.store import schema\n"
    assert violations(ok, "vitcnn_store.interface.cli_analyze") == []


@pytest.mark.parametrize(
    ("module", "layer"),
    [
        ("vitcnn_store.analysis.cka", "kernels"),
        ("vitcnn_store.store.analyses", "store"),
        ("vitcnn_store.models.families", "models"),
        ("jobs.analyze.skip", "jobs"),
        ("vitcnn_store.interface.demo", "interface"),
        ("vitcnn_store.interface.registry", "interface"),
        ("vitcnn_store.cli", "interface"),
        ("vitcnn_store", "interface"),
        ("vitcnn_store.options", "base"),
        ("vitcnn_store.models.capture", "models"),
        ("vitcnn_store.serve.app", "service"),
    ],
)
def test_layer_map(module: str, layer: str) -> None:
    assert layer_of(module) == layer


def _runtime_source(source: str) -> str:
    """``source`` without its ``if TYPE_CHECKING:`` blocks (annotations only, never run)."""
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            node.body = [ast.Pass()]
    return ast.unparse(tree)


def import_graph() -> dict[str, set[str]]:
    """module -> our modules of its own layer that it imports when it runs (at load or
    inside a function; not under TYPE_CHECKING, which never runs)."""
    graph: dict[str, set[str]] = {}
    for path in our_modules():
        name = module_name(path)
        source = _runtime_source(path.read_text(encoding="utf-8"))
        targets = {t for _, t in imported_modules(source, name, path.name == "__init__.py")}
        graph[name] = {t for t in targets if _is_ours(t) and layer_of(t) == layer_of(name)} - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of ``graph`` with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_inside_a_layer() -> None:
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def test_the_cycle_check_finds_cycles() -> None:
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
    hidden = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import x\nimport y\n"
    assert "import x" not in _runtime_source(hidden) and "import y" in _runtime_source(hidden)
