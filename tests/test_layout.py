"""The package's seams: no qktrace module reaches into another module's private names."""

import ast
from pathlib import Path

import qktrace

PACKAGE = Path(qktrace.__file__).parent


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _module_of(path: Path, node: ast.ImportFrom) -> str:
    """Dotted name of the module an `import from` names (relative imports resolved)."""
    if node.level == 0:
        return node.module or ""
    parts = ["qktrace", *path.relative_to(PACKAGE).with_suffix("").parts]
    base = parts[: len(parts) - node.level]
    return ".".join(base + ([node.module] if node.module else []))


def _is_module(dotted: str) -> bool:
    rel = Path(*dotted.split(".")[1:])
    return (PACKAGE / rel).with_suffix(".py").exists() or (PACKAGE / rel / "__init__.py").exists()


def private_imports(path: Path) -> list[str]:
    """`file:line name` for each private name of another qktrace module that `path` uses."""
    tree = ast.parse(path.read_text(), filename=str(path))
    own = ".".join(["qktrace", *path.relative_to(PACKAGE).with_suffix("").parts])
    modules: set[str] = set()  # local names bound to qktrace modules
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _module_of(path, node)
            if not source.startswith("qktrace") or source == own.removesuffix(".__init__"):
                continue
            for alias in node.names:
                if _is_module(f"{source}.{alias.name}"):
                    modules.add(alias.asname or alias.name)
                elif _private(alias.name):
                    found.append(f"{path.name}:{node.lineno} {source}.{alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("qktrace") and alias.asname:
                    modules.add(alias.asname)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id in modules
            and _private(node.attr)
        ):
            found.append(f"{path.name}:{node.lineno} {node.value.id}.{node.attr}")
    return found


def test_no_module_imports_another_modules_private_names():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20  # the whole package was read
    found = [hit for path in files for hit in private_imports(path)]
    assert not found, "Private names used across modules (give them a public name):\n" + "\n".join(
        found
    )


def test_the_check_sees_both_kinds_of_reach(tmp_path, monkeypatch):
    """The check itself fails on `from .x import _y` and on `x._y` after `from . import x`."""
    fake = PACKAGE / "verbs" / "reduce.py"
    source = "from ..store import io\nfrom .capture import _capture_batch\nio._schema({})\n"
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: source)
    assert private_imports(fake) == [
        "reduce.py:2 qktrace.verbs.capture._capture_batch",
        "reduce.py:3 io._schema",
    ]


# the module that knows the attention call's signature, and the one whose reader it configures
ATTENTION_CALL_READERS = {"loading.py", "ops.py"}


def attention_call_reads(path: Path, source: str | None = None) -> list[str]:
    """`file:line what` where `path` reads an attention call's inputs by hand.

    Flags an unpacking ``args, kwargs = <x>.inputs``, a subscript of ``<x>.inputs``, and an
    integer subscript (``args[1]``) of a name so unpacked: the call's signature is known in one
    place, `Model.attention_inputs` (positions from the family's `Adapter`).
    """
    tree = ast.parse(source if source is not None else path.read_text(), filename=str(path))
    found, unpacked = [], set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Attribute)
            and node.value.attr == "inputs"
            and isinstance(node.targets[0], ast.Tuple)
        ):
            names = [t.id for t in node.targets[0].elts if isinstance(t, ast.Name)]
            unpacked.update(names)
            if path.name not in ATTENTION_CALL_READERS:
                found.append(f"{path.name}:{node.lineno} {', '.join(names)} = ….inputs")
        if isinstance(node, ast.Subscript):
            base = node.value
            if isinstance(base, ast.Attribute) and base.attr == "inputs":
                found.append(f"{path.name}:{node.lineno} ….inputs[…]")
    for node in ast.walk(tree):
        if (
            path.name != "loading.py"
            and isinstance(node, ast.Subscript)
            and isinstance(node.value, ast.Name)
            and node.value.id in unpacked
            and isinstance(node.slice, ast.Constant)
            and isinstance(node.slice.value, int)
        ):
            found.append(f"{path.name}:{node.lineno} {node.value.id}[{node.slice.value}]")
    return found


def test_only_model_attention_inputs_reads_the_attention_call():
    files = sorted(PACKAGE.rglob("*.py"))
    found = [hit for path in files for hit in attention_call_reads(path)]
    assert not found, (
        "Attention-call inputs read by hand (use model.attention_inputs(layer).read()):\n"
        + "\n".join(found)
    )


def test_the_attention_call_check_sees_a_hand_read():
    body = (
        "def f(call):\n"
        "    args, kwargs = call.inputs\n"
        "    q, k = args[1], args[2]\n"
        "    return call.inputs[0]\n"
    )
    assert attention_call_reads(PACKAGE / "heads.py", body) == [
        "heads.py:2 args, kwargs = ….inputs",
        "heads.py:4 ….inputs[…]",
        "heads.py:3 args[1]",
        "heads.py:3 args[2]",
    ]
    assert attention_call_reads(PACKAGE / "ops.py", body) == [
        "ops.py:4 ….inputs[…]",
        "ops.py:3 args[1]",
        "ops.py:3 args[2]",
    ]
