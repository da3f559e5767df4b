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

__version__ = "0.1.0"

# Imported eagerly on purpose: `capture`, `reduce` and `intervene` are both verbs and module
# names, and a lazily imported submodule would replace the verb on the package.
from .answers import intervene_answers
from .attribution import attribute
from .covariance import decompose
from .errors import QktraceError
from .heads import find_heads
from .interventions import intervene
from .models import load, parse_heads
from .qk import capture
from .store import open, save
from .sums import reduce

__all__ = [
    "__version__",
    "load",
    "capture",
    "reduce",
    "decompose",
    "intervene",
    "intervene_answers",
    "attribute",
    "find_heads",
    "save",
    "open",
    "parse_heads",
    "QktraceError",
]
