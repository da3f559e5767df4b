"""The module paths of qktrace 0.1.0's flat layout, which still import for one release.

``import qktrace.qk`` gives the module now at ``qktrace.verbs.capture`` (the same object) and a
DeprecationWarning that names the new path. The table is the whole record of the move.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings

# old path -> new path (docs/guide/design.md, "Layout")
MOVED: dict[str, str] = {
    "qktrace.errors": "qktrace.core.errors",
    "qktrace.version": "qktrace.core.version",
    "qktrace.ops": "qktrace.core.ops",
    "qktrace.checks": "qktrace.core.checks",
    "qktrace.intervals": "qktrace.core.intervals",
    "qktrace.prompts": "qktrace.core.prompts",
    "qktrace.locks": "qktrace.store.locks",
    "qktrace.families": "qktrace.model.families",
    "qktrace.models": "qktrace.model.loading",
    "qktrace.checkpoints": "qktrace.model.checkpoints",
    "qktrace.remote": "qktrace.model.remote",
    "qktrace.testing": "qktrace.model.testing",
    "qktrace.organism.shipped": "qktrace.model.organism",
    "qktrace.batching": "qktrace.run.batching",
    "qktrace.qk": "qktrace.verbs.capture",
    "qktrace.sums": "qktrace.verbs.reduce",
    "qktrace.covariance": "qktrace.verbs.decompose",
    "qktrace.interventions": "qktrace.verbs.intervene",
    "qktrace.answers": "qktrace.verbs.answers",
    "qktrace.attribution": "qktrace.verbs.attribute",
    "qktrace.heads": "qktrace.verbs.find_heads",
    "qktrace.evaluation": "qktrace.verbs.evaluate",
    "qktrace.pipeline": "qktrace.study.pipeline",
    "qktrace.study_prompts": "qktrace.study.prompts",
    "qktrace.study_tools": "qktrace.study.tools",
    "qktrace.projected": "qktrace.study.projected",
    "qktrace.paired": "qktrace.study.paired",
    "qktrace.head_search": "qktrace.study.head_search",
    "qktrace.summary": "qktrace.study.summary",
    "qktrace.plots": "qktrace.study.plots",
}


class MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers an old path with the module at its new path."""

    def __init__(self) -> None:
        self._specs: dict[str, importlib.machinery.ModuleSpec | None] = {}

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new} in qktrace 0.2; import it from there "
            f"(the old path goes in the next release)",
            DeprecationWarning,
            stacklevel=2,
        )
        module = importlib.import_module(new)
        self._specs[new] = module.__spec__
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        # the import system stamped the old name's spec on the module; give it back its own
        module.__spec__ = self._specs[module.__name__]


def install() -> None:
    """Put the finder on `sys.meta_path` (once)."""
    if not any(isinstance(finder, MovedModules) for finder in sys.meta_path):
        sys.meta_path.append(MovedModules())
