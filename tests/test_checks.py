"""Property-based tests: the public verbs, fed generated arguments, either give a correct result
or raise one ValueError/TypeError that names the argument; never a silent wrong result.

Each property states what a correct answer is for valid input (positions read back as given,
ranks of the same ΔC, heads parsed to the same pairs), so a check that let a bad value through
(a float position truncated to the BOS token, an inf in ΔC) fails here.
"""

from __future__ import annotations

import numbers
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import qktrace
from qktrace.core import checks
from qktrace.model.loading import load, parse_heads
from tests.conftest import tiny

PROMPTS = ["The apple is in Box A, the cat is in Box B", "Which box is the cat in? Box"]
LABELS = [[("fruit", "positive"), ("fruit", "negative")]] * 2
FAST = settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def model():
    net, tok = tiny("llama")
    return load(net, tokenizer=tok)


@pytest.fixture(scope="module")
def lengths(model) -> list[int]:
    return [len(model.tokenizer(p)["input_ids"]) for p in PROMPTS]


def names(err: BaseException, *words: str) -> bool:
    return any(w in str(err) for w in words)


# a position: mostly ints (in and out of range), sometimes what a careless caller passes
position = st.one_of(
    st.integers(-12, 12),
    st.integers(-12, 12),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=2),
    st.none(),
)
row = st.one_of(position, st.lists(position, min_size=1, max_size=3))


@FAST
@given(keys=st.lists(row, min_size=1, max_size=3))
def test_capture_reads_the_positions_given_or_names_keys(model, lengths, keys):
    try:
        ds = qktrace.capture(model, PROMPTS, "1.0", keys=keys, progress=False, attention=False)
    except (ValueError, TypeError) as err:
        assert names(err, "keys", "Key position", "Key positions"), err
        return
    # accepted: every position was an int inside its prompt, and is read back as given
    assert len(keys) == len(PROMPTS)
    for p, (spec, n) in enumerate(zip(keys, lengths, strict=True)):
        want = [spec] if not isinstance(spec, list) else spec
        assert all(isinstance(k, numbers.Integral) and not isinstance(k, bool) for k in want)
        got = ds["key_position"].values[p][: len(want)]
        assert [int(g) for g in got] == [k % n for k in want]


@FAST
@given(query=st.lists(position, min_size=2, max_size=2))
def test_capture_query_positions_are_ints_or_named(model, lengths, query):
    try:
        ds = qktrace.capture(model, PROMPTS, "1.0", query=query, keys="last", progress=False,
                             attention=False)  # fmt: skip
    except (ValueError, TypeError) as err:
        assert names(err, "query", "Query position"), err
        return
    assert [int(v) for v in ds["query_position"].values[:, 0]] == [
        q % n for q, n in zip(query, lengths, strict=True)
    ]


prompt = st.one_of(st.text(min_size=1, max_size=12), st.lists(st.integers(0, 50), max_size=4))
prompts = st.one_of(
    st.text(max_size=15),  # one string: the classic mistake
    st.lists(st.one_of(prompt, st.integers(), st.none(), st.floats()), max_size=3),
)


@FAST
@given(prompts=prompts)
def test_reduce_takes_a_list_of_prompts_or_names_prompts(model, prompts):
    labels = [[("fruit", "positive")]] * len(prompts)
    try:
        sums = qktrace.reduce(model, prompts, "1.0", labels, keys="last", progress=False)
    except (ValueError, TypeError) as err:
        assert names(err, "prompts", "Prompt", "prompt"), err
        return
    assert isinstance(prompts, list) and sums.attrs["n_prompts"] == len(prompts)
    assert int(sums["pair_count"].sel(contrast="positive").sum()) == len(prompts)


@pytest.fixture(scope="module")
def sums(model):
    keys = [[1, 2], [2, 3]]
    return qktrace.reduce(model, PROMPTS, "1.0", LABELS, keys=keys, progress=False)


@FAST
@given(
    value=st.one_of(st.sampled_from([np.inf, -np.inf, np.nan]), st.floats(allow_nan=True)),
    where=st.tuples(st.integers(0, 1), st.integers(0, 15), st.integers(0, 15)),
    variable=st.sampled_from(["qk_sum", "q_sum", "k_sum"]),
)
def test_decompose_refuses_non_finite_sums_naming_them(sums, value, where, variable):
    broken = sums.copy(deep=True)
    c, i, j = where
    index = (0, 0, c, i, j) if variable == "qk_sum" else (0, 0, c, i)
    broken[variable].values[index] = value
    if np.isfinite(value):
        out = qktrace.decompose(broken)
        assert np.isfinite(out["singular_values"].values).all()
        return
    with pytest.raises(checks.BadArgument, match=rf"sums\['{variable}'\] holds -?(nan|inf) at"):
        qktrace.decompose(broken, centered=variable != "qk_sum")


@FAST
@given(threshold=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-2, 100),
                           st.text(max_size=3), st.none(), st.booleans()))  # fmt: skip
def test_decompose_threshold_in_range_or_named(sums, threshold):
    try:
        out = qktrace.decompose(sums, threshold=threshold)
    except (ValueError, TypeError) as err:
        assert "threshold=" in str(err), err
        return
    assert 0 < threshold <= 1 and not isinstance(threshold, bool)
    s2 = out["singular_values"].values[0, 0] ** 2
    rank = int(out["rank"].values[0, 0])
    assert s2[:rank].sum() >= threshold * s2.sum() * (1 - 1e-12)
    assert rank == 1 or s2[: rank - 1].sum() < threshold * s2.sum()


@FAST
@given(batch_size=st.one_of(st.integers(-3, 4), st.floats(-2, 4), st.text(max_size=2)))
def test_batch_size_is_a_positive_int_or_named(model, batch_size):
    try:
        ds = qktrace.capture(model, PROMPTS, "1.0", keys="last", batch_size=batch_size,
                             progress=False, attention=False)  # fmt: skip
    except (ValueError, TypeError) as err:
        assert "batch_size" in str(err), err
        return
    assert isinstance(batch_size, int) and batch_size >= 1 and ds.sizes["prompt"] == 2


@settings(max_examples=200, deadline=None)
@given(spec=st.one_of(st.from_regex(r"\A[0-9a-z.,\- ]{0,8}\Z"), st.lists(
    st.tuples(st.integers(-2, 40), st.integers(-2, 40)), max_size=3)))  # fmt: skip
def test_parse_heads_parses_or_names_the_head(spec):
    try:
        heads = parse_heads(spec)
    except ValueError as err:
        assert re.search(r"head|Head", str(err)), err
        return
    if isinstance(spec, str):
        pairs = [tuple(int(x) for x in part.strip().split(".")) for part in spec.split(",")]
    else:
        pairs = [tuple(p) for p in spec]
    assert [(h.layer, h.head) for h in heads] == list(dict.fromkeys(pairs))  # repeats once
    assume(heads)
    assert all(h.layer >= 0 and h.head >= 0 for h in heads)


@settings(max_examples=100, deadline=None)
@given(value=st.one_of(st.integers(), st.floats(allow_nan=True), st.booleans(), st.text(max_size=3),
                       st.none()))  # fmt: skip
def test_integer_check_returns_the_int_or_names_the_argument(value):
    try:
        got = checks.integer("n_random", value, low=0, flag="--n-random", example="10")
    except (ValueError, TypeError) as err:
        assert str(err).startswith("n_random=") and ("pass" in str(err)), err
        return
    assert got == value and isinstance(value, int) and not isinstance(value, bool) and value >= 0
