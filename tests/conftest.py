"""Shared fixtures: tiny random-weight models of every family, with offline tokenizers."""

from __future__ import annotations

import signal
import warnings

import pytest

import qktrace.model.testing as testing
from qktrace.model.loading import load

warnings.filterwarnings("ignore", message=".*deprecated.*")


@pytest.fixture(autouse=True, scope="session")
def _ctrl_c_interrupts():
    """Ctrl-C raises KeyboardInterrupt here and in the commands the tests start, even when the
    run was started in the background of a script (``pytest &``: SIGINT ignored, and inherited
    so by every child), so the interrupt-and-resume tests test what a user's Ctrl-C does."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


_CACHE: dict[tuple, tuple] = {}
_PADDING_SIDE: dict[tuple, str] = {}


def tiny(family: str = "llama", tokenizer_style: str = "bpe", **overrides):
    """A cached tiny (model, tokenizer) pair of a family."""
    key = (family, tokenizer_style, tuple(sorted(overrides.items())))
    if key not in _CACHE:
        _CACHE[key] = testing.model(family, tokenizer_style=tokenizer_style, **overrides)
        _PADDING_SIDE[key] = _CACHE[key][1].padding_side
    return _CACHE[key]


@pytest.fixture
def llama():
    net, tok = tiny("llama")
    return load(net, tokenizer=tok)


@pytest.fixture(params=[False, "local"], ids=["local", "remote-local"])
def remote(request):
    return request.param


@pytest.fixture(autouse=True)
def _restore_padding_side():
    """Tests may set a cached tokenizer's padding side; give every test the default again."""
    yield
    for key, (_, tok) in _CACHE.items():
        tok.padding_side = _PADDING_SIDE[key]


@pytest.fixture(scope="session")
def every_verb(tmp_path_factory):
    """{verb: its result, saved and read back}: every public verb on the tiny Llama, the study
    pipeline's head ranking, the evaluation (eval.zarr) and one cell of the toy store. Read by
    the provenance and vocabulary tests."""
    import numpy as np
    import xarray as xr

    import qktrace
    from qktrace.store import io as store
    from qktrace.store import provenance
    from qktrace.studies import toy as toy_study
    from qktrace.study.tools import ranking_variables
    from qktrace.verbs.evaluate import evaluate
    from qktrace.verbs.intervene import intervene_captured

    net, tok = tiny("llama")
    model = load(net, tokenizer=tok)
    prompts = ["The apple is in Box A, the cat is in Box B.", "Which box is the cat in? Box"]
    keys = [[1, 2, 3, 4], [1, 2, 3, 4]]
    labels = [[("a", "positive"), ("a", "negative"), ("b", "positive"), ("b", "negative")]] * 2
    quiet = {"progress": False}
    captured = qktrace.capture(model, prompts, "1.0,1.3", keys=keys, **quiet)
    sums = qktrace.reduce(model, prompts, "1.0,1.3", labels, keys=keys, **quiet)
    subspaces = qktrace.decompose(sums)
    basis = subspaces["key_basis"].sel(head="1.0", feature="a")
    swap = {"orig": [1, 1], "target": [2, 3], "n_random": 1}
    found = qktrace.find_heads(model, prompts, [1, 2], keys=keys, top=None, **quiet)
    results = {
        "capture": captured,
        "reduce": sums,
        "decompose": subspaces,
        "find_heads": found,
        "intervene": qktrace.intervene(model, prompts, "1.0", basis, keys=keys, **swap, **quiet),
        "intervene_captured": intervene_captured(captured, "1.0", basis, **swap),
        "intervene_answers": qktrace.intervene_answers(
            model,
            prompts,
            {"1.0": basis},
            candidates=[[10, 11]] * 2,
            answer=[0, 1],
            target_answer=[1, 0],
            **swap,
            **quiet,
        ),  # fmt: skip
        "attribute": qktrace.attribute(captured, {"a": subspaces["query_basis"].sel(feature="a")}),
        "evaluate": evaluate(model, n=2, pairs=(2,), groups=["boxes"], batch_size=2, **quiet),
    }
    params = toy_study.settings(ranks=(3,), d_heads=(8,), variants=("discrete",), max_steps=5,
                                n_contrast_pairs=200, n_random=1)  # fmt: skip
    toy = toy_study.run_cell("discrete", 8, 3, 3, 0, params)
    results["toy"] = toy.assign_attrs(provenance("toy", params, study="toy", seed=0))
    results["ranking"] = ranking_variables(found)
    folder = tmp_path_factory.mktemp("every_verb")
    out = {}
    for name, ds in results.items():
        assert isinstance(ds, xr.Dataset) and np.all([v.size for v in ds.data_vars.values()])
        out[name] = store.open(store.save(ds, folder / f"{name}.zarr")).load()
    return out
