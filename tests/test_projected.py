"""A remote study's fresh-prompt pass reduced in the trace (`qktrace.study.projected`) gives the local
run's numbers: the permutation null tested in the request, and the swaps and PCA from the q and
k coordinates in the span of the key bases and their random draws.

The organism (d_head 32, trained: its categories have rank 1-2 key subspaces) with 2 random
draws, so that the projection (rank 5 + 2 + 4 = about 11 of 32) drops most of q and k: a
projection that missed the random draws, or a null with other permutations, fails here.
"""

from __future__ import annotations

import numpy as np
import pytest

import qktrace.study.projected as projected
from qktrace.store import io as store
from qktrace.studies import filter_heads
from qktrace.study.pipeline import FRESH_PROJECTED
from qktrace.study.tools import N_PERMUTATIONS, captured_pairs
from qktrace.verbs.decompose import permutation_null

RUN = {"n_prompts": 48, "n_test": 20, "n_random": 2, "n_random_answers": 0, "batch_size": 8,
       "figures": False, "progress": False}  # fmt: skip


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    out = tmp_path_factory.mktemp("projected")
    requests = []
    real = projected._fresh_request

    def counted(model, batches, layout, *args, **kwargs):
        widths = [tuple(basis.shape) for *_, basis in layout]  # [heads, d_head, m] per layer
        requests.append((len(batches), widths))
        return real(model, batches, layout, *args, **kwargs)

    projected._fresh_request = counted
    try:
        remote = store.open(filter_heads.run(out=out / "r", remote="local", **RUN)).load()
    finally:
        projected._fresh_request = real
    local = store.open(filter_heads.run(out=out / "l", **RUN)).load()
    return remote, local, requests


def test_one_request_returns_no_q_or_k(stores):
    remote, local, requests = stores
    ((n_batches, widths),) = requests  # one request ...
    assert n_batches == -(-RUN["n_test"] // RUN["batch_size"])  # ... of every batch
    d_head = local.sizes["d_head"]
    assert all(d == d_head and m < d_head / 2 for _, d, m in widths)  # it drops most of q, k
    assert "q" in local and "k" in local
    assert "q" not in remote and "k" not in remote and "projection" not in remote
    assert remote.attrs["params"]["fresh_capture"] == FRESH_PROJECTED
    assert "fresh_capture" not in local.attrs["params"]
    for name in ("attention", "logit", "key_token", "key_label", "key_position"):
        np.testing.assert_array_equal(remote[name].values, local[name].values)


def test_null_in_the_request_equals_the_local_null(stores):
    remote, local, _ = stores
    np.testing.assert_array_equal(remote["null_rank"].values, local["null_rank"].values)
    assert int(local["null_rank"].max()) >= 1  # something real to agree on
    for name in ("null_quantile", "null_singular_values"):
        np.testing.assert_allclose(remote[name].values, local[name].values, rtol=1e-6, atol=1e-9)
    # and the local null is `permutation_null` of the captured pairs
    head, feature = str(local["head"].values[0]), str(local["feature"].values[0])
    q, k, positive = captured_pairs(local, head, feature)
    direct = permutation_null(q, k, positive, n_permutations=N_PERMUTATIONS)
    np.testing.assert_allclose(
        local["null_quantile"].sel(head=head, feature=feature).values,
        direct["null_quantile"].values,
        rtol=1e-9,
    )


def test_swaps_and_pca_from_coordinates_equal_the_local_ones(stores):
    remote, local, _ = stores
    assert set(remote["subspace"].values) == {"category", "random_0", "random_1"}
    for name in ("logit_after", "attention_after", "delta_p_target", "key_pc"):
        a, b = remote[name].values, local[name].values
        np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(remote["flip"].values, local["flip"].values)
    np.testing.assert_allclose(remote["pc_variance_ratio"], local["pc_variance_ratio"], rtol=1e-4)
