"""intervene_answers takes the same edit= as intervene; its old mode=, side= and at= still work
for one release, with a DeprecationWarning, and give the same result. Rules written once."""

import numpy as np
import pytest
import xarray as xr

from qktrace import intervene
from qktrace.core.errors import BadArgument
from qktrace.model.loading import load
from qktrace.verbs.answers import intervene_answers
from qktrace.verbs.intervene import Edit
from tests.conftest import tiny
from tests.test_answers import ANSWER, CANDIDATES, ORIG, PROMPTS, TARGET, TARGET_ANSWER, basis

KW = dict(
    candidates=CANDIDATES, answer=ANSWER, target_answer=TARGET_ANSWER, random=1,
    progress=False,
)  # fmt: skip


@pytest.fixture(scope="module")
def lm():
    net, tok = tiny("llama")
    return load(net, tokenizer=tok)


def same(a: xr.Dataset, b: xr.Dataset) -> None:
    xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())
    for key in ("mode", "side", "heads", "ranks"):
        assert a.attrs[key] == b.attrs[key]


@pytest.mark.parametrize(
    "old, new",
    [
        (dict(mode="ablate", side="query"), Edit("ablate", side="query")),
        (dict(mode="ablate", at=[[1, 2]] * 3), Edit("ablate", at=[[1, 2]] * 3)),
        (dict(mode="swap", side="key"), "swap"),
    ],
    ids=["query", "at", "swap"],
)
def test_old_edit_keywords_warn_and_give_the_same_result(lm, old, new):
    with pytest.warns(DeprecationWarning, match=r"edit=Edit\(mode, side=..., at=...\)"):
        before = intervene_answers(lm, PROMPTS, {"1.1": basis()}, orig=ORIG, target=TARGET,
                                   **old, **KW)  # fmt: skip
    after = intervene_answers(lm, PROMPTS, {"1.1": basis()}, orig=ORIG, target=TARGET,
                              edit=new, **KW)  # fmt: skip
    same(before, after)


def test_side_both_takes_pairs_through_edit(lm):
    bases = {"1.1": (basis(seed=1), basis(seed=2))}
    with pytest.warns(DeprecationWarning):
        old = intervene_answers(lm, PROMPTS, bases, orig=ORIG, mode="ablate", side="both", **KW)
    new = intervene_answers(lm, PROMPTS, bases, orig=ORIG, edit=Edit("ablate", side="both"), **KW)
    same(old, new)
    assert new.attrs["side"] == "both"


def test_old_and_new_edit_keywords_together_are_refused(lm):
    with pytest.raises(BadArgument, match="got both edit= and mode="):
        intervene_answers(lm, PROMPTS, {"1.1": basis()}, orig=ORIG, target=TARGET,
                          edit="swap", mode="swap", **KW)  # fmt: skip


def test_old_keywords_keep_their_messages(lm):
    with pytest.raises(BadArgument, match="mode='swap' exchanges two keys' coordinates"):
        intervene_answers(lm, PROMPTS, {"1.1": basis()}, side="query", **KW)
    with pytest.raises(BadArgument, match="side must be 'key', 'query' or 'both'"):
        intervene_answers(lm, PROMPTS, {"1.1": basis()}, mode="ablate", side="value", **KW)


def test_edits_each_verb_cannot_make_are_refused(lm):
    with pytest.raises(BadArgument, match="swaps or ablates"):
        intervene_answers(lm, PROMPTS, {"1.1": basis()}, orig=ORIG, target=TARGET,
                          edit=Edit("patch", source=np.ones((3, 16))), **KW)  # fmt: skip
    with pytest.raises(BadArgument, match="needs side='key'"):
        intervene_answers(lm, PROMPTS, {"1.1": basis()}, edit=Edit(side="query"), **KW)
    with pytest.raises(BadArgument, match="side='both' is for qktrace.intervene_answers"):
        intervene(lm, PROMPTS, "1.1", basis(), orig=ORIG, target=TARGET,
                  edit=Edit("ablate", side="both"), progress=False)  # fmt: skip


def test_union_basis_is_written_once():
    from qktrace.core import linalg
    from qktrace.study import tools

    assert tools.union_basis is linalg.union_basis
    v, w = basis(seed=1)[:, :3], basis(seed=2)[:, :2]
    u = linalg.union_basis([v, w])
    assert u.shape == (16, 5)
    np.testing.assert_allclose(u.T @ u, np.eye(5), atol=1e-10)
    np.testing.assert_allclose(u @ (u.T @ v), v, atol=1e-10)  # spans both
    assert linalg.union_basis([v]) is not None and np.array_equal(linalg.union_basis([v]), v)
