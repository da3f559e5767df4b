"""The verbs' shared settings are argument objects: the edit's `key_scope` is a field of `Edit`,
the random baseline is a `RandomBaseline`. The old ``n_random=``, ``seed=`` and ``key_scope=``
still work for one release, with a DeprecationWarning, and give the same Dataset (values and
attrs, so the same store); mixing old and new is refused with a message naming the fix."""

import numpy as np
import pytest
import xarray as xr

import qktrace
from qktrace.core.errors import BadArgument, BadArgumentType
from qktrace.model.loading import load
from qktrace.verbs.answers import intervene_answers
from qktrace.verbs.capture import capture
from qktrace.verbs.intervene import Edit, RandomBaseline, intervene, intervene_captured
from tests.conftest import tiny
from tests.test_answers import ANSWER, CANDIDATES, ORIG, PROMPTS, TARGET, TARGET_ANSWER, basis

ANSWERS = dict(candidates=CANDIDATES, answer=ANSWER, target_answer=TARGET_ANSWER, progress=False)
OLD_RANDOM = r"\(n_random=..., seed=...\) is now \w+\(random=RandomBaseline\(n, seed=...\)\)"
OLD_SCOPE = r"\(key_scope=...\) is now \w+\(edit=Edit\(mode, key_scope=...\)\)"


@pytest.fixture(scope="module")
def lm():
    net, tok = tiny("llama")  # grouped-query attention: 4 query heads read 2 key heads
    m = load(net, tokenizer=tok)
    assert m.n_kv_heads < m.n_heads
    return m


@pytest.fixture(scope="module")
def captured(lm):
    return capture(lm, PROMPTS, "1.1", keys=[[1, 4], [2, 5], [3, -2]], progress=False)


def same(a: xr.Dataset, b: xr.Dataset) -> None:
    """Identical values and attrs (but the date they were made)."""
    xr.testing.assert_identical(a.drop_attrs(), b.drop_attrs())
    assert {k: v for k, v in a.attrs.items() if k != "date"} == {
        k: v for k, v in b.attrs.items() if k != "date"
    }


def run(verb: str, lm, captured, **kw) -> xr.Dataset:
    """`verb` on the tiny GQA model with the keywords `kw`."""
    if verb == "intervene":
        return intervene(lm, PROMPTS, "1.1", basis(r=4), orig=ORIG, target=TARGET, progress=False,
                         **kw)  # fmt: skip
    if verb == "intervene_captured":
        return intervene_captured(captured, "1.1", basis(r=4), orig=ORIG, target=TARGET, **kw)
    return intervene_answers(lm, PROMPTS, {"1.1": basis(r=4), "1.0": basis(r=4, seed=4)},
                             orig=ORIG, target=TARGET, **ANSWERS, **kw)  # fmt: skip


VERBS = ["intervene", "intervene_captured", "intervene_answers"]


DEFAULT_N = {"intervene": 10, "intervene_captured": 10, "intervene_answers": 3}


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize(
    "old, new",
    [
        (dict(n_random=2, seed=5), RandomBaseline(2, seed=5)),
        (dict(n_random=1), 1),
        (dict(n_random=0, seed=3), RandomBaseline(0, seed=3)),
        (dict(seed=4), None),  # the verb's default n, seed 4
    ],
    ids=["n-and-seed", "n", "none", "seed"],
)
def test_old_random_keywords_warn_and_give_the_same_result(lm, captured, verb, old, new):
    if new is None:
        new = RandomBaseline(DEFAULT_N[verb], seed=4)
    with pytest.warns(DeprecationWarning, match=verb + OLD_RANDOM):
        before = run(verb, lm, captured, **old)
    after = run(verb, lm, captured, random=new)  # a RandomBaseline, or an int n
    same(before, after)
    meant = RandomBaseline.of(new, DEFAULT_N[verb])
    assert after.attrs["params"]["n_random"] == meant.n and after.attrs["seed"] == meant.seed
    assert int(after["random"].sum()) == meant.n


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize("scope", ["key_head", "query_head"])
def test_old_key_scope_warns_and_gives_the_same_result(lm, captured, verb, scope):
    with pytest.warns(DeprecationWarning, match=verb + OLD_SCOPE):
        before = run(verb, lm, captured, key_scope=scope, random=1)
    after = run(verb, lm, captured, edit=Edit("swap", key_scope=scope), random=1)
    same(before, after)
    assert after.attrs["key_scope"] == scope
    if verb != "intervene_captured":  # its params record what they did before: no key_scope
        assert after.attrs["params"]["key_scope"] == scope


def test_the_defaults_are_recorded_as_before(lm, captured):
    """None is the verb's default baseline: 10 draws for one head's attention row, 3 for the
    answers (each draw a copy of every prompt), seed 0; key_scope "query_head"."""
    for verb, n in DEFAULT_N.items():
        ds = run(verb, lm, captured)
        assert ds.attrs["params"]["n_random"] == n and ds.attrs["seed"] == 0, verb
        assert ds.attrs["key_scope"] == "query_head", verb
        assert int(ds["random"].sum()) == n, verb


def test_key_scope_key_head_reaches_the_group(lm):
    ds = run("intervene", lm, None, edit=Edit("swap", key_scope="key_head"), random=0)
    assert ds.attrs["heads_reached"] == ds.attrs["heads_sharing_key"] != ["1.1"]
    old = intervene_answers(lm, PROMPTS, {"1.1": basis(r=4)}, orig=ORIG, target=TARGET,
                            mode="swap", key_scope="key_head", random=0, **ANSWERS)  # fmt: skip
    assert old.attrs["key_scope"] == "key_head"  # the 0.1 edit keywords and key_scope= together


@pytest.mark.parametrize("verb", VERBS)
def test_mixing_old_and_new_is_refused_with_the_fix(lm, captured, verb):
    with pytest.raises(BadArgument, match=r"got both random= and n_random=; .*pass random= only"):
        run(verb, lm, captured, random=2, n_random=2)
    with pytest.raises(BadArgument, match=r"got both random= and seed=; .*pass random= only"):
        run(verb, lm, captured, random=RandomBaseline(2), seed=1)
    with pytest.raises(
        BadArgument, match=r"key_scope= and an edit with key_scope='key_head'.*in the Edit only"
    ):
        run(verb, lm, captured, key_scope="query_head", edit=Edit(key_scope="key_head"))


def test_old_keywords_keep_their_messages(lm, captured):
    for verb in VERBS:
        with pytest.raises(BadArgument, match=r"n_random=-1 must be >= 0"):
            run(verb, lm, captured, n_random=-1)
        with pytest.raises(BadArgument, match=r"seed=-2 must be >= 0; pass e\.g\. 0"):
            run(verb, lm, captured, seed=-2)
        with pytest.raises(BadArgument, match=r"key_scope must be one of"):
            run(verb, lm, captured, key_scope="kv")


@pytest.mark.parametrize(
    "bad, error, message",
    [
        (dict(n=-1), BadArgument, r"RandomBaseline n=-1 is negative; pass an int >= 0"),
        (dict(n=2.0), BadArgumentType, r"RandomBaseline n=2\.0 \(float\) is not an integer"),
        (dict(n=True), BadArgumentType, r"n=True \(bool\) is not an integer"),
        (dict(n="3"), BadArgumentType, r"n='3' \(str\) is not an integer"),
        (dict(n=2, seed=-1), BadArgument, r"RandomBaseline seed=-1 is negative"),
        (dict(n=2, seed=0.5), BadArgumentType, r"seed=0\.5 \(float\) is not an integer"),
    ],
)
def test_random_baseline_is_validated(bad, error, message):
    with pytest.raises(error, match=message):
        RandomBaseline(**bad)


def test_random_baseline_takes_numpy_ints_and_is_a_value():
    rb = RandomBaseline(np.int64(4), seed=np.int32(2))
    assert type(rb.n) is int and type(rb.seed) is int
    assert rb == RandomBaseline(4, 2) and hash(rb) == hash(RandomBaseline(4, 2))
    with pytest.raises(AttributeError):
        rb.n = 5  # type: ignore[misc]  # frozen
    assert RandomBaseline.of(None, 3) == RandomBaseline(3)
    assert RandomBaseline.of(7, 3) == RandomBaseline(7) and RandomBaseline.of(rb, 3) is rb


@pytest.mark.parametrize("verb", VERBS)
@pytest.mark.parametrize(
    "bad, message",
    [
        (-1, r"random=-1 must be >= 0"),
        (1.5, r"random=1\.5 \(float\) is not a RandomBaseline or a number of draws"),
        (True, r"random=True \(bool\) is not a RandomBaseline"),
        ("10", r"random='10' \(str\) is not a RandomBaseline"),
        (10**18, r"random=1000000000000000000 is too large"),
    ],
)
def test_a_bad_random_is_refused_before_the_model_runs(lm, captured, verb, bad, message):
    if verb == "intervene_captured" and bad == 10**18:
        pytest.skip("intervene_captured draws in memory of its own size: not checked up front")
    with pytest.raises(BadArgument, match=message):
        run(verb, lm, captured, random=bad)


def test_edit_key_scope_is_validated_and_a_string_edit_is_its_mode():
    with pytest.raises(BadArgument, match=r"key_scope must be one of \('query_head', 'key_head'\)"):
        Edit("swap", key_scope="kv")  # type: ignore[arg-type]
    assert Edit.of("ablate").key_scope == "query_head"
    assert Edit("swap", key_scope="key_head").key_scope == "key_head"


def test_the_argument_objects_are_exported():
    assert qktrace.RandomBaseline is RandomBaseline and qktrace.Edit is Edit
    assert {"RandomBaseline", "Edit"} <= set(qktrace.__all__)


def test_no_verb_takes_more_than_its_share_of_parameters():
    import inspect

    counts = {f.__name__: len(inspect.signature(f).parameters)
              for f in (intervene, intervene_answers, intervene_captured)}  # fmt: skip
    assert counts == {"intervene": 15, "intervene_answers": 14, "intervene_captured": 8}
