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


def test_each_concept_has_one_name_and_the_old_ones_warn_for_a_release():
    """`evaluate` and `intervene` are the verbs; the toy's and the organism's functions that had
    those names (and batching's `prepare`, a study's prompts being the other) answer to new
    ones, and the old names still work with a warning."""
    import importlib

    renamed = {
        ("qktrace.toy.analysis", "intervene"): "swap_interventions",
        ("qktrace.toy", "intervene"): "swap_interventions",
        ("qktrace.toy.train", "evaluate"): "accuracy_and_loss",
        ("qktrace.organism.evaluation", "evaluate"): "held_out_accuracy",
        ("qktrace.run.batching", "prepare"): "plan_run",
    }
    for (module_name, old), new in renamed.items():
        module = importlib.import_module(module_name)
        with pytest.warns(DeprecationWarning, match=f"{module_name}.{old} is now"):
            assert getattr(module, old) is getattr(module, new)
    import qktrace.organism

    with pytest.warns(DeprecationWarning, match="held_out_accuracy"):
        assert qktrace.organism.evaluate is qktrace.organism.held_out_accuracy
    with pytest.raises(AttributeError):
        qktrace.toy.no_such_name  # noqa: B018
