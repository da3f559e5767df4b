"""The package's layers: each module imports only its own layer or the layers below it, and no
module imports, directly or through others, one that imports it back (no cycles).

Every ``import`` and ``from ... import`` counts: at module level, inside functions, and under
``if TYPE_CHECKING:``. The table below is the one place the layers are written (see
docs/guide/design.md); a new module fails `test_every_module_has_a_layer` until it is placed.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# lowest first
LAYERS = ("core", "store", "model", "run", "verbs", "api", "study", "apps", "cli")

# package or module -> layer; a module's layer is that of the longest name here that holds it.
# The library's layers are its subpackages (qktrace/core, qktrace/store, ...), so the layout
# shows them; the rest are the package root, the applications built on the layers, and the CLI.
LAYER_OF_PACKAGE: dict[str, str] = {
    # torch/numpy-only building blocks that know nothing of models or stores
    "qktrace.core": "core",
    # the zarr/xarray result format, provenance, and the writers' locks
    "qktrace.store": "store",
    # architecture families, loading (named, GGUF, the shipped organism), NDIF, tiny test models
    "qktrace.model": "model",
    # prompts to batches, positions, the batch loop
    "qktrace.run": "run",
    # one public verb each
    "qktrace.verbs": "verbs",
    # the package root, which names the verbs (`qktrace.capture`, ...), and the old module paths
    "qktrace": "api",
    "qktrace._moved": "api",
    # the Study spec and run_study, its strategies, analysis, figures and summary
    "qktrace.study": "study",
    # the built-in studies, the toy model, the model organism, the local NDIF server harness
    "qktrace.studies": "apps",
    "qktrace.toy": "apps",
    "qktrace.organism": "apps",
    "qktrace.ndif_local": "apps",
    # the `qktrace` command
    "qktrace.cli": "cli",
}


def layer_of(module: str) -> str:
    """The layer of `module`: that of the longest package or module of LAYER_OF_PACKAGE holding it."""
    holders = [p for p in LAYER_OF_PACKAGE if module == p or module.startswith(p + ".")]
    if not holders:
        raise KeyError(module)
    return LAYER_OF_PACKAGE[max(holders, key=len)]


# where each installed package's sources live in the repository (studies/ ships as
# qktrace.studies; the worktree's qktrace/studies and qktrace/data links are not sources)
SOURCES = {"qktrace": REPO / "qktrace", "qktrace.studies": REPO / "studies"}


def modules(sources: Mapping[str, Path]) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file under each source folder (no symlinks)."""
    found: dict[str, Path] = {}
    for package, root in sources.items():
        for path in sorted(root.rglob("*.py")):
            rel = path.relative_to(root)
            if any(p.is_symlink() for p in [path, *path.parents] if p.is_relative_to(root)):
                continue
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> Iterator[tuple[str, int]]:
    """(imported module, line) for every import in `path` of a module in `known`.

    ``from X import y`` imports ``X.y`` when that is a module, else ``X``.
    """
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            targets = [
                f"{source}.{a.name}" if f"{source}.{a.name}" in known else source
                for a in node.names
            ]
        else:
            continue
        for target in targets:
            if target in known and target != name:
                yield target, node.lineno


def graph(sources: Mapping[str, Path]) -> dict[str, dict[str, int]]:
    """module -> {imported module: first line}."""
    files = modules(sources)
    edges: dict[str, dict[str, int]] = {}
    for name, path in files.items():
        edges[name] = {}
        for target, line in imports(name, path, set(files)):
            edges[name].setdefault(target, line)
    return edges


def upward(edges: Mapping[str, Mapping[str, int]], layer_of: Mapping[str, str]) -> list[str]:
    """Each import of a module from a higher layer, as 'a (layer) -> b (layer), line N'."""
    rank = {layer: i for i, layer in enumerate(LAYERS)}
    return [
        f"{a} ({layer_of[a]}) -> {b} ({layer_of[b]}), line {line}"
        for a, targets in edges.items()
        for b, line in targets.items()
        if rank[layer_of[b]] > rank[layer_of[a]]
    ]


def cycles(edges: Mapping[str, Mapping[str, int]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in edges.get(node, {}):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer():
    found = set(modules(SOURCES))
    unplaced = []
    for module in sorted(found):
        try:
            layer_of(module)
        except KeyError:
            unplaced.append(module)
    assert unplaced == [], "put the module in a layer's subpackage, or name it in LAYER_OF_PACKAGE"
    assert sorted(set(LAYER_OF_PACKAGE) - found) == [], "LAYER_OF_PACKAGE names no module"
    assert set(LAYER_OF_PACKAGE.values()) <= set(LAYERS)


def test_the_library_layers_are_its_subpackages():
    """Every layer below the package root is a folder of qktrace/ of the layer's name."""
    for layer in LAYERS[: LAYERS.index("api")]:
        assert (REPO / "qktrace" / layer / "__init__.py").is_file(), layer
        assert LAYER_OF_PACKAGE[f"qktrace.{layer}"] == layer


def test_no_module_imports_a_higher_layer():
    edges = graph(SOURCES)
    assert upward(edges, {module: layer_of(module) for module in edges}) == []


def test_no_import_cycles():
    assert cycles(graph(SOURCES)) == []


def test_the_checker_catches_an_upward_import_and_a_cycle(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low.py").write_text("def f():\n    from .sub import high\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "high.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ..sub import peer\n"
    )
    (pkg / "sub" / "peer.py").write_text("import pkg.sub.high\nfrom pkg import low\n")
    (tmp_path / "link").symlink_to(pkg / "sub")
    (pkg / "link").symlink_to(pkg / "sub")
    layer_of = {
        "pkg": "core",
        "pkg.low": "core",
        "pkg.sub": "verbs",
        "pkg.sub.high": "verbs",
        "pkg.sub.peer": "verbs",
    }
    edges = graph({"pkg": pkg})
    assert set(edges) == set(layer_of)  # the symlinked folder is not walked
    assert upward(edges, layer_of) == ["pkg.low (core) -> pkg.sub.high (verbs), line 2"]
    assert cycles(edges) == [["pkg.low", "pkg.sub.high", "pkg.sub.peer"]]


@pytest.mark.parametrize(
    "args",
    [["--help"], *([c, "--help"] for c in ("toy", "study", "eval", "plot", "show", "organism"))],
)
def test_the_command_line_help_imports_no_heavy_library(args):
    """`qktrace --help` (and a command's help) answers without the heavy libraries: the
    package root names its verbs lazily and the commands import what they run inside
    themselves."""
    script = (
        "import sys\n"
        "from qktrace.cli import app\n"
        "try:\n"
        f"    app({args!r})\n"
        "except SystemExit as stop:\n"
        "    assert stop.code == 0, stop.code\n"
        "print(sorted(m for m in ('torch', 'nnsight', 'transformers', 'xarray', 'zarr') if m in sys.modules))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert "Usage" in result.stdout
    assert result.stdout.rstrip().endswith("[]"), result.stdout[-300:]


def test_the_package_root_names_every_verb_lazily():
    """`import qktrace` is light, and every name in `__all__` still resolves to the verb (not to
    a submodule of the same name, nor to nnsight's `save`), through attribute access, `from
    qktrace import` and dir()."""
    script = (
        "import sys, types\n"
        "import qktrace\n"
        "assert 'torch' not in sys.modules\n"
        "import nnsight  # which gives every object a `save` method\n"
        "assert qktrace.save.__module__ == 'qktrace.store.io', qktrace.save\n"
        "from qktrace import capture, open\n"
        "assert capture.__module__ == 'qktrace.verbs.capture' and open.__module__ == 'qktrace.store.io'\n"
        "assert set(qktrace.__all__) <= set(dir(qktrace))\n"
        "for name in qktrace.__all__:\n"
        "    assert not isinstance(getattr(qktrace, name), types.ModuleType), name\n"
        "try:\n"
        "    qktrace.no_such_verb\n"
        "except AttributeError:\n"
        "    print('ok')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "ok"


def test_the_old_module_paths_import_the_moved_modules_with_a_warning():
    """qktrace 0.1.0's flat paths (`qktrace.qk`, `from qktrace import models`) still import, as
    the same module objects, each with a DeprecationWarning that names the new path."""
    script = (
        "import importlib, warnings\n"
        "import qktrace\n"
        "from qktrace._moved import MOVED\n"
        "for old, new in MOVED.items():\n"
        "    with warnings.catch_warnings(record=True) as caught:\n"
        "        warnings.simplefilter('always')\n"
        "        module = importlib.import_module(old)\n"
        "    assert module is importlib.import_module(new), old\n"
        "    assert module.__spec__.name == new, old\n"
        "    assert any(new in str(w.message) and w.category is DeprecationWarning for w in caught), old\n"
        "from qktrace import qk, models\n"
        "from qktrace.models import load\n"
        "assert load is qktrace.load and qk.capture is qktrace.capture\n"
        "print('ok', len(MOVED))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.startswith("ok")


def test_every_old_module_path_names_a_module_that_exists():
    from qktrace._moved import MOVED

    found = set(modules(SOURCES))
    assert sorted(set(MOVED.values()) - found) == []
    assert sorted(set(MOVED) & found) == [], "an old path is a module again: drop it from MOVED"
