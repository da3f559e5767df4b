"""Renamed keywords: the old name still works for a release, with a warning; both is an error."""

import pytest

from qktrace.core.deprecation import renamed
from qktrace.core.errors import BadArgument


@renamed(n_prompts="n", edit_mode="edit")
def f(*, n: int = 1, edit: str = "swap") -> tuple[int, str]:
    """A function."""
    return n, edit


def test_an_old_keyword_calls_the_new_one_with_a_warning():
    with pytest.warns(DeprecationWarning, match=r"f\(n_prompts=...\) is now f\(n=...\)"):
        assert f(n_prompts=5) == (5, "swap")
    assert f(n=3, edit="ablate") == (3, "ablate")
    assert f.__doc__ == "A function." and f.__name__ == "f"


def test_both_names_is_an_error_that_names_the_new_one():
    with pytest.raises(BadArgument, match="pass n= only"):
        f(n_prompts=5, n=4)
