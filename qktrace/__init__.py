"""qktrace: why does this attention head attend to that token?

The verbs a study needs, from a notebook or a script::

    import qktrace
    model = qktrace.load("meta-llama/Llama-3.1-8B-Instruct", remote=True)   # or a local path
    ds = qktrace.capture(model, prompts, "16.19", keys=positions)           # q, k, attention
    sums = qktrace.reduce(model, prompts, "16.19", labels, keys=positions)  # C+ / C- sums, in-trace
    sub = qktrace.decompose(sums)                                           # ΔC, SVD, ranks, bases
    fx = qktrace.intervene(model, prompts, "16.19", basis, orig=..., target=..., keys=...)
    parts = qktrace.attribute(ds, {"order": U_order, "lexical": U_lex})
    qktrace.save(ds, "run.zarr"); qktrace.open("run.zarr")

Every result is a labelled xarray Dataset. Imports are lazy so `qktrace --help` stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_VERBS = {
    "load": "qktrace.models",
    "capture": "qktrace.capture",
    "reduce": "qktrace.reduce",
    "decompose": "qktrace.covariance",
    "intervene": "qktrace.intervene",
    "attribute": "qktrace.attribution",
    "find_heads": "qktrace.heads",
    "save": "qktrace.store",
    "open": "qktrace.store",
    "parse_heads": "qktrace.models",
}

__all__ = [*_VERBS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _VERBS:
        return getattr(importlib.import_module(_VERBS[name]), name)
    raise AttributeError(f"module 'qktrace' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
