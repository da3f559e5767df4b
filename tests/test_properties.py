"""Property tests over every public verb's signature: a bad value of any argument raises
`BadArgument` or `BadArgumentType` (never a raw error), before the model runs.

Each verb is called with valid arguments but one, drawn from a strategy for that argument's kind
(model, prompts, heads, positions, sizes, flags, names, paths, bases, datasets); the model's
trace is replaced by a failure, so a check that runs only after a forward pass fails here too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import xarray as xr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import qktrace
from qktrace.core.errors import BadArgument
from qktrace.model.loading import load
from qktrace.verbs.evaluate import evaluate
from tests.conftest import tiny

PROMPTS = ["The apple is in Box A, the cat is in Box B", "Which box is the cat in? Box"]
KEYS = [[1, 2], [2, 3]]
LABELS = [[("fruit", "positive"), ("fruit", "negative")]] * 2
FAST = settings(
    max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


@pytest.fixture(scope="module")
def model():
    net, tok = tiny("llama")
    lm = load(net, tokenizer=tok)

    def no_forward_pass(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a forward pass ran before the arguments were checked")

    lm.trace = no_forward_pass  # type: ignore[method-assign]
    return lm


# ------------------------------------------------------------------ a strategy per argument kind

junk = st.one_of(
    st.none(), st.booleans(), st.floats(allow_nan=True), st.text(max_size=4),
    st.integers(-5, 5), st.just(object()), st.just(b"x"), st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)  # fmt: skip
not_a_model = st.one_of(st.none(), st.text(max_size=5), st.integers(), st.just(object()))
bad_prompts = st.one_of(
    st.text(max_size=8),  # one string, not a list
    st.just([]),
    st.lists(st.one_of(st.integers(), st.none(), st.floats(), st.just(b"x")), min_size=1, max_size=3),
    st.lists(st.lists(st.integers(-10**12, -1), min_size=1, max_size=3), min_size=2, max_size=2),
    st.lists(st.lists(st.integers(10**6, 10**12), min_size=1, max_size=3), min_size=2, max_size=2),
)  # fmt: skip
bad_heads = st.one_of(
    st.sampled_from(["", "1", "1.", ".1", "a.b", "9.0", "1.99", "-1.0", "1.0,", "1-0"]),
    st.lists(st.tuples(st.integers(-3, 40), st.integers(40, 99)), min_size=1, max_size=2),
    st.integers(), st.none(), st.floats(),
)  # fmt: skip
bad_position = st.one_of(st.floats(), st.booleans(), st.text(min_size=1, max_size=3), st.none())
bad_positions = st.one_of(
    st.sampled_from(["first", "", "LAST"]),
    st.lists(st.lists(st.integers(50, 10**6), min_size=1, max_size=2), min_size=2, max_size=2),
    st.lists(st.lists(bad_position, min_size=1, max_size=2), min_size=2, max_size=2),
    st.lists(st.integers(0, 2), min_size=3, max_size=4),  # wrong number of prompts
    st.integers(), st.floats(), st.just({"a": 1}),
)  # fmt: skip
bad_count = st.one_of(st.integers(-10**6, 0), st.floats(), st.booleans(), st.text(max_size=3),
                      st.none())  # fmt: skip
bad_size = st.one_of(bad_count, st.just(10**18))  # more than any machine holds
bad_seed = st.one_of(st.integers(-(10**6), -1), st.floats(), st.booleans(), st.text(max_size=3))
bad_flag = st.one_of(st.integers(2, 9), st.text(max_size=3), st.floats(), st.just([True]))
bad_name = st.one_of(st.text(max_size=6).filter(lambda t: t not in ("swap", "ablate", "key",
                     "query", "answer_attention", "qk", "float32", "float64", "bfloat16",
                     "float16")), st.integers(), st.none())  # fmt: skip
bad_path = st.one_of(st.integers(), st.just(""), st.floats(), st.just(object()), st.just(b"x"))
bad_remote = st.one_of(st.sampled_from(["ndif", "remote", "", "True"]), st.integers(2, 9),
                       st.floats(), st.just([True]))  # fmt: skip
bad_basis = st.one_of(
    st.just(np.zeros((3,))), st.just(np.zeros((2, 16, 3))), st.just(np.zeros((7, 2))),
    st.just(np.full((16, 2), np.nan)), st.text(max_size=3), st.none(), st.integers(),
)  # fmt: skip
bad_dataset = st.one_of(st.none(), st.integers(), st.text(max_size=3), st.just(xr.Dataset()),
                        st.just({"q": 1}))  # fmt: skip


def basis() -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(0).normal(size=(16, 2)))
    return q


# ------------------------------------------------------------------ every verb, valid but one


def verbs(lm, data: dict[str, Any]) -> dict[str, tuple[Callable[..., Any], dict, dict]]:
    """verb -> (function, valid arguments, argument -> strategy of bad values)."""
    positions = {"query": bad_positions, "keys": bad_positions}
    common = {"batch_size": bad_count, "add_special_tokens": bad_flag, "progress": bad_flag}
    return {
        "capture": (
            qktrace.capture,
            dict(model=lm, prompts=PROMPTS, heads="1.0", keys=KEYS, progress=False),
            dict(
                model=not_a_model,
                prompts=bad_prompts,
                heads=bad_heads,
                attention=bad_flag,
                out=bad_path,
                **positions,
                **common,
            ),
        ),
        "reduce": (
            qktrace.reduce,
            dict(model=lm, prompts=PROMPTS, heads="1.0", labels=LABELS, keys=KEYS, progress=False),
            dict(
                model=not_a_model,
                prompts=bad_prompts,
                heads=bad_heads,
                labels=junk,
                out=bad_path,
                delta=bad_flag,
                delta_dtype=bad_name,
                batches_per_request=bad_count.filter(lambda v: v not in (None, 0)),  # 0: all
                **positions,
                **common,
            ),
        ),
        "intervene": (
            qktrace.intervene,
            dict(
                model=lm,
                prompts=PROMPTS,
                head="1.0",
                basis=basis(),
                orig=[1, 2],
                target=[2, 3],
                n_random=1,
                progress=False,
            ),
            dict(
                model=not_a_model,
                prompts=bad_prompts,
                head=bad_heads,
                basis=bad_basis,
                orig=bad_positions,
                target=bad_positions,
                edit=bad_name,
                name=st.integers(),
                query=bad_positions,
                n_random=st.one_of(
                    st.integers(-99, -1), st.floats(), st.booleans(), st.just(10**18)
                ),
                seed=bad_seed,
                verify=bad_flag,
                **common,
            ),
        ),
        "intervene_answers": (
            qktrace.intervene_answers,
            dict(
                model=lm,
                prompts=PROMPTS,
                bases={"1.0": basis()},
                candidates=[["A", "B"], ["A", "B"]],
                answer=[0, 0],
                target_answer=[1, 1],
                orig=[1, 2],
                target=[2, 3],
                n_random=1,
                progress=False,
            ),
            dict(
                model=not_a_model,
                prompts=bad_prompts,
                bases=junk,
                candidates=junk,
                answer=bad_positions,
                target_answer=bad_positions,
                mode=bad_name,
                side=bad_name,
                name=st.integers(),
                n_random=st.one_of(st.integers(-99, -1), st.floats(), st.just(10**18)),
                seed=bad_seed,
                **common,
            ),
        ),
        "find_heads": (
            qktrace.find_heads,
            dict(model=lm, prompts=PROMPTS, answer=[0, 1], keys=KEYS, progress=False),
            dict(
                model=not_a_model,
                prompts=bad_prompts,
                answer=bad_positions,
                layers=st.one_of(
                    st.lists(st.integers(2, 99), min_size=1, max_size=2),
                    st.lists(st.integers(-99, -1), min_size=1, max_size=2),
                    st.just(["a"]),
                    st.floats(),
                    st.just([]),
                ),
                top=st.one_of(st.integers(-9, 0), st.floats(), st.booleans(), st.text(max_size=2)),
                by=bad_name,
                **positions,
                **common,
            ),
        ),
        "decompose": (
            qktrace.decompose,
            dict(sums=data.get("sums")),
            dict(
                sums=bad_dataset,
                threshold=st.one_of(
                    st.floats().filter(lambda x: not 0 < x <= 1),
                    st.text(max_size=2),
                    st.none(),
                    st.booleans(),
                ),
                centered=bad_flag,
            ),
        ),
        "attribute": (
            qktrace.attribute,
            dict(captured=data.get("captured"), bases={"fruit": basis()}),
            dict(
                captured=bad_dataset,
                bases=st.one_of(junk, st.just({"fruit": np.zeros(3)})),
                side=bad_name,
                scaling=st.one_of(
                    st.text(max_size=2), st.just(np.nan), st.floats(max_value=0), st.booleans()
                ),
            ),
        ),
        "load": (
            load,
            dict(model=data.get("net"), tokenizer=data.get("tok")),
            dict(
                model=st.one_of(
                    st.integers(), st.none(), st.floats(), st.just(b"x"), st.just(""), st.just([1])
                ),
                remote=bad_remote,
                revision=st.one_of(st.integers(), st.just([1])),
                dtype=st.one_of(
                    st.sampled_from(["float33", "int8x", ""]), st.integers(), st.floats()
                ),
                device_map=st.one_of(st.integers(), st.just([1])),
                gguf_file=st.one_of(st.integers(), st.just([1])),
            ),
        ),
        "save": (
            qktrace.save,
            dict(ds=xr.Dataset({"x": ("p", [1.0])}), path=data.get("new_path")),
            dict(
                ds=st.one_of(st.none(), st.integers(), st.text(max_size=3), st.just({"x": 1})),
                path=bad_path,
                attrs=st.one_of(st.integers(), st.text(max_size=2), st.just([1])),
                overwrite=bad_flag,
            ),
        ),
        "open": (
            qktrace.open,
            dict(path=data.get("store")),
            dict(path=bad_path, final=bad_flag, checksums=bad_flag),
        ),
        "evaluate": (
            evaluate,
            dict(model=lm, n=1, pairs=[2], progress=False),
            dict(
                model=not_a_model,
                n=bad_size,
                pairs=st.one_of(
                    st.just([]),
                    st.lists(st.integers(-5, 1), min_size=1, max_size=2),
                    st.lists(st.integers(27, 99), min_size=1, max_size=2),
                    st.text(max_size=3),
                    st.integers(),
                ),
                groups=st.one_of(st.text(min_size=1, max_size=3), st.just([1]), st.just(["zzz"])),
                chat=bad_flag,
                batch_size=bad_count,
                seed=bad_seed,
                progress=bad_flag,
            ),
        ),
    }


CASES = [(verb, argument) for verb, (_, _, bad) in verbs(None, {}).items() for argument in bad]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Any]:
    """Valid datasets, paths and an in-memory model, made with a model whose trace runs."""
    tmp = tmp_path_factory.mktemp("properties")
    net, tok = tiny("llama")
    lm = load(net, tokenizer=tok)
    sums = qktrace.reduce(lm, PROMPTS, "1.0", LABELS, keys=KEYS, progress=False)
    captured = qktrace.capture(lm, PROMPTS, "1.0", keys=KEYS, progress=False)
    stored = qktrace.save(xr.Dataset({"x": ("p", [1.0])}), tmp / "stored.zarr")
    return dict(sums=sums, captured=captured, net=net, tok=tok, store=stored,
                new_path=tmp / "new.zarr")  # fmt: skip


@pytest.mark.parametrize("verb, argument", CASES, ids=[f"{v}-{a}" for v, a in CASES])
def test_a_bad_argument_raises_bad_argument_before_the_model_runs(
    verb, argument, model, data, tmp_path
):
    function, valid, bad = verbs(model, data)[verb]

    @FAST
    @given(value=bad[argument])
    def property(value: Any) -> None:
        try:
            function(**{**valid, argument: value})
        except BadArgument:
            return
        except Exception as err:  # noqa: BLE001 - the property: nothing else escapes
            raise AssertionError(
                f"{verb}({argument}={value!r}) raised {type(err).__name__}: {err}"
            ) from err
        raise AssertionError(f"{verb}({argument}={value!r}) was accepted")

    property()
