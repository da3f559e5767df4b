"""A remote counterfactual study sums its subspace pairs in the trace (`qktrace.study.paired`): one
request, no q or k back, and the local run's sums, subspaces and permutation null.

The lexical study on the organism (trained: its lexical ΔC has real components, so the null
has something to agree on). A request that paired a prompt's query with another prompt's key,
used the counterfactual's own query where the study says "original", or drew other
permutations than the local null, fails here.
"""

from __future__ import annotations

import numpy as np
import pytest

import qktrace.study.paired as paired
from qktrace.store import io as store
from qktrace.studies import lexical
from qktrace.study.pipeline import PAIRS_IN_TRACE

RUN = {"n_prompts": 40, "n_test": 8, "n_random": 1, "n_random_answers": 0, "batch_size": 8,
       "figures": False, "progress": False}  # fmt: skip


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    out = tmp_path_factory.mktemp("paired")
    requests = []
    real = paired._pairs_request

    def counted(model, batches, *args, **kwargs):
        requests.append([len(b.texts) for b in batches])
        return real(model, batches, *args, **kwargs)

    paired._pairs_request = counted
    try:
        remote = store.open(lexical.run(out=out / "r", remote="local", **RUN)).load()
    finally:
        paired._pairs_request = real
    local = store.open(lexical.run(out=out / "l", **RUN)).load()
    return remote, local, requests


def test_one_request_of_prompt_and_counterfactual_rows(stores):
    remote, local, requests = stores
    # one request; every trace holds whole (prompt, counterfactual) pairs: 2 x batch_size rows
    assert requests == [[2 * RUN["batch_size"]] * (RUN["n_prompts"] // RUN["batch_size"])]
    assert remote.attrs["params"]["subspace_pairs"] == PAIRS_IN_TRACE
    assert "subspace_pairs" not in local.attrs["params"]


def test_sums_subspaces_and_null_equal_the_local_run(stores):
    remote, local, _ = stores
    lex = {"feature": "lexical"}
    np.testing.assert_array_equal(
        remote["pair_count"].sel(lex).values, local["pair_count"].sel(lex).values
    )
    for name in ("qk_sum", "q_sum", "k_sum"):
        a, b = remote[name].sel(lex).values, local[name].sel(lex).values
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max(), err_msg=name)
    np.testing.assert_array_equal(remote["rank"].values, local["rank"].values)
    sv = local["singular_values"].sel(lex).values
    np.testing.assert_allclose(
        remote["singular_values"].sel(lex).values, sv, rtol=1e-6, atol=1e-9 * sv.max()
    )
    np.testing.assert_array_equal(remote["null_rank"].values, local["null_rank"].values)
    assert int(local["null_rank"].sel(lex).min()) >= 1
    for name in ("null_quantile", "null_singular_values"):
        a, b = remote[name].sel(lex).values, local[name].sel(lex).values
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-9, err_msg=name)
    # the rest of the study reads the same subspaces: the same attribution (the order
    # feature's subspace differs at float32 rounding: a remote run's order reduce is ΔC only)
    np.testing.assert_allclose(remote["logit_part"], local["logit_part"], rtol=1e-3, atol=1e-3)
