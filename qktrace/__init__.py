"""qktrace: why does this attention head attend to that token?

The verbs a study needs, from a notebook or a script::

    import qktrace
    model = qktrace.load("meta-llama/Llama-3.1-8B-Instruct", remote=True)   # or a local path
    ds = qktrace.capture(model, prompts, "16.19", keys=positions)           # q, k, attention
    sums = qktrace.reduce(model, prompts, "16.19", labels, keys=positions)  # C+ / C- sums, in-trace
    sub = qktrace.decompose(sums)                                           # ΔC, SVD, ranks, bases
    fx = qktrace.intervene(model, prompts, "16.19", basis, orig=..., target=..., keys=...)
    said = qktrace.intervene_answers(model, prompts, {"16.19": basis}, candidates=..., ...)
    parts = qktrace.attribute(ds, {"order": U_order, "lexical": U_lex})
    qktrace.save(ds, "run.zarr"); qktrace.open("run.zarr")

Every result is a labelled xarray Dataset.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qktrace import _moved
from qktrace.core.errors import QktraceError
from qktrace.core.lazy import lazy_names
from qktrace.core.version import __version__

_moved.install()

# Each verb is imported on first use, so that importing the package (as the command line does
# for its help) does not import torch and nnsight. Type checkers and the docs read the same
# names from the imports below.
if TYPE_CHECKING:
    from qktrace.model.loading import load, parse_heads
    from qktrace.store.io import open, save
    from qktrace.verbs.answers import intervene_answers
    from qktrace.verbs.attribute import attribute
    from qktrace.verbs.capture import capture
    from qktrace.verbs.decompose import decompose
    from qktrace.verbs.find_heads import find_heads
    from qktrace.verbs.intervene import Edit, RandomBaseline, intervene
    from qktrace.verbs.reduce import reduce

# public name -> the module that defines it
_LAZY = {
    "load": "model.loading",
    "parse_heads": "model.loading",
    "capture": "verbs.capture",
    "reduce": "verbs.reduce",
    "decompose": "verbs.decompose",
    "intervene": "verbs.intervene",
    "intervene_answers": "verbs.answers",
    "Edit": "verbs.intervene",
    "RandomBaseline": "verbs.intervene",
    "attribute": "verbs.attribute",
    "find_heads": "verbs.find_heads",
    "save": "store.io",
    "open": "store.io",
}

__all__ = [
    "__version__",
    "load",
    "capture",
    "reduce",
    "decompose",
    "intervene",
    "intervene_answers",
    "Edit",
    "RandomBaseline",
    "attribute",
    "find_heads",
    "save",
    "open",
    "parse_heads",
    "QktraceError",
]


lazy_names(__name__, {name: f"qktrace.{module}" for name, module in _LAZY.items()})


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
