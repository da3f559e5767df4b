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
