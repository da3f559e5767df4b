"""Names of a package that import their module on first use.

`import qktrace` and `import qktrace.store.locks` must stay light (the CLI's help imports them,
and neither torch nor xarray is needed to print it), yet ``qktrace.capture`` and
``qktrace.store.open`` must work as plain attributes.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Mapping
from typing import Any


def lazy_names(package: str, names: Mapping[str, str]) -> None:
    """Make each ``name -> module`` of `names` an attribute of `package` that imports `module`
    (an absolute name) on first use and is then kept.

    Properties on the package's module class, not only a module ``__getattr__`` (PEP 562),
    because nnsight gives every object a `save` method, which would answer ``package.save``
    before ``__getattr__`` did.
    """
    module = sys.modules[package]
    cls = type(f"{package}.<lazy module>", (types.ModuleType,), {"__doc__": module.__doc__})
    for name, source in names.items():
        setattr(cls, name, _lazy(name, source))
    module.__class__ = cls


def _lazy(name: str, source: str) -> property:
    def get(package: types.ModuleType) -> Any:
        if name not in package.__dict__:
            package.__dict__[name] = getattr(importlib.import_module(source), name)
        return package.__dict__[name]

    def set_(package: types.ModuleType, value: Any) -> None:
        package.__dict__[name] = value

    return property(get, set_)
