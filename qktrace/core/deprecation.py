"""Keywords renamed in qktrace 0.2 keep their old names for one release, with a warning."""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import Any, TypeVar

from qktrace.core.errors import BadArgument

F = TypeVar("F", bound=Callable[..., Any])


def renamed(**old_to_new: str) -> Callable[[F], F]:
    """Let `func` take each old keyword as its new name, with a DeprecationWarning.

    ``@renamed(n_prompts="n")`` on ``def f(*, n)`` makes ``f(n_prompts=5)`` call ``f(n=5)``;
    giving both names is an error.
    """

    def wrap(func: F) -> F:
        @functools.wraps(func)
        def call(*args: Any, **kwargs: Any) -> Any:
            for old, new in old_to_new.items():
                if old not in kwargs:
                    continue
                if new in kwargs:
                    raise BadArgument(
                        f"{func.__name__}() got both {old}= and {new}=; {old}= is the old "
                        f"name of {new}=: pass {new}= only."
                    )
                warnings.warn(
                    f"{func.__name__}({old}=...) is now {func.__name__}({new}=...); "
                    f"the old name goes in the next release.",
                    DeprecationWarning,
                    stacklevel=2,
                )
                kwargs[new] = kwargs.pop(old)
            return func(*args, **kwargs)

        return call  # type: ignore[return-value]

    return wrap


def renamed_attributes(module: str, old_to_new: dict[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` (PEP 562) that answers each old name with the new one's object,
    with a DeprecationWarning: ``__getattr__ = renamed_attributes(__name__, {"prepare":
    "plan_run"})``."""
    import sys

    def __getattr__(name: str) -> Any:
        if name in old_to_new:
            new = old_to_new[name]
            warnings.warn(
                f"{module}.{name} is now {module}.{new}; the old name goes in the next release.",
                DeprecationWarning,
                stacklevel=2,
            )
            return getattr(sys.modules[module], new)
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
