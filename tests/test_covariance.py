"""Contrastive covariances: planted subspaces come back exactly, with the right ranks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import xarray as xr
from scipy.linalg import subspace_angles

from qktrace.verbs.decompose import (
    Subspace,
    add_pairs,
    decompose,
    decompose_matrices,
    empty_sums,
    permutation_null,
    random_subspaces,
    rank_for_threshold,
    svd,
)


def orthonormal(rng: np.random.Generator, d: int, r: int) -> np.ndarray:
    return np.linalg.qr(rng.normal(size=(d, r)))[0]


def white_queries(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    """n queries whose second moment (1/n) Q^T Q is exactly the identity."""
    return np.linalg.qr(rng.normal(size=(n, d)))[0] * np.sqrt(n)


def planted_pairs(rng, n, d, query_basis, key_basis, strengths):
    """(q, positive keys, negative keys) with ΔC = query_basis diag(strengths) key_basis^T.

    Both keys share a random part; the positive key adds key_basis S query_basis^T q.
    """
    q = white_queries(rng, n, d)
    shared = rng.normal(size=(n, d))
    planted = q @ query_basis @ np.diag(strengths) @ key_basis.T
    return q, shared + planted, shared


# ------------------------------------------------------------------------------------------
# the rank rule


@pytest.mark.parametrize(
    ("singular_values", "threshold", "rank"),
    [
        ([5.0, 0.0, 0.0], 0.99, 1),
        ([1.0, 1.0, 1.0, 1.0], 0.99, 4),
        ([1.0, 1.0, 1.0, 1.0], 0.75, 3),  # exactly at the threshold: 3 of 4 hold 75%
        ([1.0, 1.0, 1.0, 1.0], 0.5, 2),
        ([1.0, 1.0, 1.0, 1.0], 1.0, 4),
        ([3.0, 1.0, 0.01], 0.99, 2),
        ([3.0, 1.0, 0.01], 0.8, 1),
        ([3.0, 1.0, 0.01, np.nan, np.nan], 0.99, 2),  # NaN padding is ignored
        ([0.0, 0.0], 0.99, 0),
    ],
)
def test_rank_for_threshold(singular_values, threshold, rank):
    assert rank_for_threshold(singular_values, threshold) == rank


@pytest.mark.parametrize("threshold", [0.0, -0.1, 1.5])
def test_rank_for_threshold_rejects_bad_threshold(threshold):
    with pytest.raises(ValueError, match="threshold"):
        rank_for_threshold([1.0, 0.5], threshold)


@pytest.mark.parametrize("threshold", [0.0, -0.5, 99, 1.01, float("nan"), "0.99"])
def test_decompose_rejects_bad_threshold(threshold):
    rng = np.random.default_rng(0)
    q, k = rng.normal(size=(50, 4)), rng.normal(size=(50, 4))
    sums = add_pairs(empty_sums([0], ["z"], 4), q, q, 0, "z", "positive")
    sums = add_pairs(sums, q, k, 0, "z", "negative")
    for call in (
        lambda: decompose(sums, threshold=threshold),
        lambda: decompose_matrices(np.eye(4), np.zeros((4, 4)), threshold=threshold),
        lambda: permutation_null(q, k, np.arange(50) < 25, threshold=threshold),
    ):
        with pytest.raises(ValueError, match=r"threshold=.*outside \(0, 1\].*threshold=0.99"):
            call()


def test_rank_for_threshold_rejects_unsorted_values():
    with pytest.raises(ValueError, match="decreasing"):
        rank_for_threshold([0.5, 1.0])


# ------------------------------------------------------------------------------------------
# planted subspaces


@pytest.mark.parametrize(("d", "rank"), [(8, 3), (16, 7), (64, 5), (128, 12)])
def test_decompose_matrices_recovers_planted_bases(d, rank):
    rng = np.random.default_rng(d + rank)
    u0, v0 = orthonormal(rng, d, rank), orthonormal(rng, d, rank)
    strengths = np.linspace(2.0, 1.0, rank)
    c_neg = rng.normal(size=(d, d))
    sub = decompose_matrices(c_neg + u0 @ np.diag(strengths) @ v0.T, c_neg)
    assert sub.rank == rank
    assert np.max(subspace_angles(sub.query_basis, u0)) < 1e-3
    assert np.max(subspace_angles(sub.key_basis, v0)) < 1e-3
    np.testing.assert_allclose(sub.singular_values[:rank], strengths, rtol=1e-9)


def test_decompose_recovers_planted_subspaces_per_head_and_feature():
    """Two heads x two features, each with its own planted rank and bases, through the sums."""
    rng = np.random.default_rng(0)
    d, n = 16, 4000
    planted = {(0, "fruit"): 2, (0, "animal"): 5, (3, "fruit"): 4, (3, "animal"): 1}
    sums = empty_sums([0, 3], ["fruit", "animal"], d)
    bases = {}
    for (head, feature), rank in planted.items():
        u0, v0 = orthonormal(rng, d, rank), orthonormal(rng, d, rank)
        bases[head, feature] = u0, v0
        q, k_pos, k_neg = planted_pairs(rng, n, d, u0, v0, np.linspace(3.0, 1.5, rank))
        sums = add_pairs(sums, q, k_pos, head, feature, "positive")
        sums = add_pairs(sums, q, k_neg, head, feature, "negative")
    out = decompose(sums)
    for (head, feature), rank in planted.items():
        cell = out.sel(head=head, feature=feature)
        assert int(cell["rank"]) == rank, (head, feature)
        sub = Subspace.from_dataset(cell)
        u0, v0 = bases[head, feature]
        assert np.max(subspace_angles(sub.query_basis, u0)) < 1e-3
        assert np.max(subspace_angles(sub.key_basis, v0)) < 1e-3
    assert out["query_basis"].dims == ("head", "feature", "dq", "component")
    assert out["key_basis"].dims == ("head", "feature", "dk", "component")
    assert out.attrs["threshold"] == 0.99 and out.attrs["centered"] is False


def test_bases_are_nan_past_the_rank():
    rng = np.random.default_rng(1)
    d, rank = 8, 3
    q, k_pos, k_neg = planted_pairs(
        rng, 500, d, orthonormal(rng, d, rank), orthonormal(rng, d, rank), [3.0, 2.0, 1.0]
    )
    sums = add_pairs(
        add_pairs(empty_sums([0], ["z"], d), q, k_pos, 0, "z", "positive"),
        q,
        k_neg,
        0,
        "z",
        "negative",
    )
    basis = decompose(sums)["key_basis"].sel(head=0, feature="z").values
    assert np.isfinite(basis[:, :rank]).all()
    assert np.isnan(basis[:, rank:]).all()
    np.testing.assert_allclose(basis[:, :rank].T @ basis[:, :rank], np.eye(rank), atol=1e-10)


def test_decompose_matches_decompose_matrices_and_threshold():
    rng = np.random.default_rng(2)
    d = 6
    q, k_pos, k_neg = (
        rng.normal(size=(300, d)),
        rng.normal(size=(300, d)),
        rng.normal(size=(300, d)),
    )
    sums = add_pairs(
        add_pairs(empty_sums(["a"], ["f"], d), q, k_pos, "a", "f", "positive"),
        q,
        k_neg,
        "a",
        "f",
        "negative",
    )
    for threshold in (0.5, 0.9, 0.99):
        out = decompose(sums, threshold=threshold).sel(head="a", feature="f")
        ref = decompose_matrices(q.T @ k_pos / 300, q.T @ k_neg / 300, threshold=threshold)
        np.testing.assert_allclose(out["delta_c"].values, ref.delta_c, atol=1e-12)
        np.testing.assert_allclose(out["singular_values"].values, ref.singular_values, atol=1e-12)
        assert int(out["rank"]) == ref.rank == rank_for_threshold(ref.singular_values, threshold)


def test_subspace_round_trip_through_dataset():
    rng = np.random.default_rng(3)
    sub = decompose_matrices(rng.normal(size=(5, 5)), np.zeros((5, 5)), threshold=0.8)
    ds = sub.to_dataset()
    assert set(ds.dims) == {"dq", "dk", "component"}
    back = Subspace.from_dataset(ds)
    assert back.rank == sub.rank and back.threshold == 0.8
    np.testing.assert_array_equal(back.key_basis, sub.key_basis)
    np.testing.assert_array_equal(back.query_basis, sub.query_basis)


# ------------------------------------------------------------------------------------------
# centering and sums


def test_centering_removes_mean_offsets():
    """A constant shift of the positive keys adds E[q] c^T to ΔC; centering removes it."""
    rng = np.random.default_rng(4)
    d, n, rank = 10, 5000, 2
    u0, v0 = orthonormal(rng, d, rank), orthonormal(rng, d, rank)
    q = white_queries(rng, n, d)
    q = q - q.mean(0)  # exact zero mean for the planted part ...
    q_shifted = q + 0.3 * rng.normal(size=d)  # ... then a mean offset of the queries
    shift = 0.5 * rng.normal(size=d)
    shared = rng.normal(size=(n, d))
    k_pos = shared + q @ u0 @ np.diag([2.0, 1.5]) @ v0.T + shift
    sums = empty_sums([0], ["z"], d)
    sums = add_pairs(sums, q_shifted, k_pos, 0, "z", "positive")
    sums = add_pairs(sums, q_shifted, shared, 0, "z", "negative")

    plain = decompose(sums).sel(head=0, feature="z")
    centered = decompose(sums, centered=True).sel(head=0, feature="z")
    assert int(plain["rank"]) == rank + 1  # the planted part plus E[q] shift^T
    assert int(centered["rank"]) == rank
    assert centered.attrs["centered"] is True

    def centered_c(q, k):
        return (q - q.mean(0)).T @ (k - k.mean(0)) / len(q)

    expected = centered_c(q_shifted, k_pos) - centered_c(q_shifted, shared)
    np.testing.assert_allclose(centered["delta_c"].values, expected, atol=1e-10)
    sub = Subspace.from_dataset(centered)
    assert np.max(subspace_angles(sub.key_basis, v0)) < 1e-3


def test_sums_add_across_batches():
    rng = np.random.default_rng(5)
    d = 4
    q, k = rng.normal(size=(100, d)), rng.normal(size=(100, d))
    whole = add_pairs(empty_sums([0], ["z"], d), q, k, 0, "z", "positive")
    first = add_pairs(empty_sums([0], ["z"], d), q[:37], k[:37], 0, "z", "positive")
    second = add_pairs(empty_sums([0], ["z"], d), q[37:], k[37:], 0, "z", "positive")
    both = first + second
    for name in ("qk_sum", "q_sum", "k_sum"):
        np.testing.assert_allclose(both[name].values, whole[name].values, atol=1e-12)
    assert both["pair_count"].dtype == np.int64
    assert int(both["pair_count"].sel(head=0, feature="z", contrast="positive")) == 100
    np.testing.assert_allclose(
        whole["qk_sum"].sel(head=0, feature="z", contrast="positive").values, q.T @ k
    )
    assert whole["qk_sum"].dtype == np.float64
    assert list(whole["contrast"].values) == ["positive", "negative"]


def test_add_pairs_does_not_modify_its_input():
    sums = empty_sums([0], ["z"], 3)
    add_pairs(sums, np.ones((2, 3)), np.ones((2, 3)), 0, "z", "negative")
    assert float(sums["qk_sum"].sum()) == 0.0


def test_decompose_accepts_reduce_layout_and_keeps_head_coords():
    """`qktrace.verbs.reduce` output: extra head coords (layer) and dims in another order."""
    rng = np.random.default_rng(6)
    d = 4
    sums = empty_sums(["1.2", "3.0"], ["fruit"], d).assign_coords(layer=("head", [1, 3]))
    for head in ("1.2", "3.0"):
        for contrast in ("positive", "negative"):
            sums = add_pairs(
                sums, rng.normal(size=(20, d)), rng.normal(size=(20, d)), head, "fruit", contrast
            )
    legacy = sums.rename(pair_count="count").transpose("contrast", "feature", "head", "dk", "dq")
    out = decompose(legacy)
    assert out["rank"].dims == ("feature", "head") or out["rank"].dims == ("head", "feature")
    assert list(out["layer"].values) == [1, 3]
    np.testing.assert_allclose(
        out["delta_c"].sel(head="3.0", feature="fruit").transpose("dq", "dk").values,
        decompose(sums)["delta_c"].sel(head="3.0", feature="fruit").values,
    )


# ------------------------------------------------------------------------------------------
# errors that name the fix


def test_feature_without_positive_pairs_names_head_and_feature():
    sums = empty_sums([7], ["fruit", "animal"], 3)
    ones = np.ones((2, 3))
    for feature in ("fruit", "animal"):
        sums = add_pairs(sums, ones, ones, 7, feature, "negative")
    sums = add_pairs(sums, ones, ones, 7, "fruit", "positive")
    with pytest.raises(ValueError, match=r"No positive pairs for head=7, feature='animal'"):
        decompose(sums)


def test_feature_without_negative_pairs_is_refused():
    sums = add_pairs(
        empty_sums([0], ["z"], 2), np.ones((2, 2)), np.ones((2, 2)), 0, "z", "positive"
    )
    with pytest.raises(ValueError, match="No negative pairs for head=0, feature='z'"):
        decompose(sums)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"q": np.ones((3, 2)), "k": np.ones((4, 2))}, ValueError, "same number"),
        ({"contrast": "neutral"}, ValueError, "'positive' or 'negative'"),
        ({"feature": "vehicle"}, KeyError, "empty_sums"),
        ({"q": np.ones((3, 5)), "k": np.ones((3, 5))}, ValueError, "dq=2"),
    ],
)
def test_add_pairs_errors(kwargs, error, match):
    args = {
        "q": np.ones((3, 2)),
        "k": np.ones((3, 2)),
        "head": 0,
        "feature": "z",
        "contrast": "positive",
    }
    args.update(kwargs)
    with pytest.raises(error, match=match):
        add_pairs(empty_sums([0], ["z"], 2), **args)


def test_decompose_matrices_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        decompose_matrices(np.zeros((3, 3)), np.zeros((3, 4)))


# ------------------------------------------------------------------------------------------
# permutation null and random baselines


def test_permutation_null_separates_real_subspace_from_noise():
    rng = np.random.default_rng(7)
    d, n, rank = 16, 4000, 3
    u0, v0 = orthonormal(rng, d, rank), orthonormal(rng, d, rank)
    q = rng.normal(size=(n, d))
    k = rng.normal(size=(n, d))
    is_positive = rng.random(n) < 0.5
    k[is_positive] += 0.5 * q[is_positive] @ u0 @ v0.T
    real = permutation_null(q, k, is_positive, n_permutations=100, seed=0)
    assert int(real["null_rank"]) == rank
    assert real["null_singular_values"].shape == (100, d)
    assert (real["singular_values"][:rank] > real["null_quantile"][:rank]).all()

    noise = permutation_null(q, rng.normal(size=(n, d)), is_positive, n_permutations=100, seed=0)
    assert int(noise["null_rank"]) == 0
    # the threshold rule alone would call pure noise high-rank: that is what the null is for
    assert int(noise["rank"]) > rank


def test_permutation_null_needs_both_kinds():
    with pytest.raises(ValueError, match="both kinds"):
        permutation_null(np.ones((4, 2)), np.ones((4, 2)), np.ones(4, dtype=bool))


def test_random_subspaces_are_orthonormal_and_reproducible():
    bases = random_subspaces(12, 4, n=10, seed=3)
    assert bases.shape == (10, 12, 4)
    gram = np.einsum("ndr,nds->nrs", bases, bases)
    np.testing.assert_allclose(gram, np.broadcast_to(np.eye(4), gram.shape), atol=1e-12)
    np.testing.assert_array_equal(bases, random_subspaces(12, 4, n=10, seed=3))
    assert np.max(subspace_angles(bases[0], bases[1])) > 0.1  # different draws differ
    with pytest.raises(ValueError, match="between 1 and d=4"):
        random_subspaces(4, 5, n=1)


def test_sums_dataset_layout():
    sums = empty_sums([0, 1], ["a", "b", "c"], 5)
    assert isinstance(sums, xr.Dataset)
    assert sums["qk_sum"].dims == ("head", "feature", "contrast", "dq", "dk")
    assert sums["q_sum"].dims == ("head", "feature", "contrast", "dq")
    assert sums["k_sum"].dims == ("head", "feature", "contrast", "dk")
    assert sums["pair_count"].dims == ("head", "feature", "contrast")
    with pytest.raises(ValueError, match="distinct"):
        empty_sums([0, 0], ["a"], 2)


# A 64 x 64 ΔC (filter-heads, head 11.0, "country") of a random-weight 12-layer Llama on which
# LAPACK's gesdd, numpy's SVD driver, raises "SVD did not converge" (numpy 2.4 / OpenBLAS here).
GESDD_FAILS = np.load(Path(__file__).parent / "data" / "gesdd_fails.npy")


def _svd_fails_on(monkeypatch, bad: np.ndarray) -> list[int]:
    """numpy's SVD raising LinAlgError on any stack holding `bad`, as gesdd does; the calls."""
    real, calls = np.linalg.svd, []

    def gesdd(a, *args, **kwargs):
        calls.append(1)
        a = np.asarray(a)
        if any(np.array_equal(m, bad) for m in a.reshape(-1, *a.shape[-2:])):
            raise np.linalg.LinAlgError("SVD did not converge")
        return real(a, *args, **kwargs)

    monkeypatch.setattr(np.linalg, "svd", gesdd)
    return calls


@pytest.mark.parametrize("mock", [False, True], ids=["real-matrix", "mock-gesdd"])
def test_decompose_survives_an_svd_that_does_not_converge(monkeypatch, mock):
    """decompose of ΔCs one of which gesdd cannot do: redone with gesvd, the same subspaces."""
    rng = np.random.default_rng(0)
    others = rng.normal(size=(2, 64, 64)) * 0.05
    delta = np.stack([others[0], GESDD_FAILS, others[1]])
    if mock:  # whatever this machine's LAPACK does with the real matrix
        calls = _svd_fails_on(monkeypatch, GESDD_FAILS)
    sums = empty_sums(["0.0"], ["a", "b", "c"], 64)
    sums["qk_sum"].loc[{"contrast": "positive"}] = delta[None]
    sums["pair_count"][:] = 1
    out = decompose(sums)
    if mock:
        assert len(calls) >= 2  # the batch failed, then each matrix alone
    u = out["query_basis"].sel(head="0.0").transpose("feature", "dq", "component").values
    s = out["singular_values"].sel(head="0.0").values
    v = out["key_basis"].sel(head="0.0").transpose("feature", "dk", "component").values
    for f in range(3):
        ref = scipy.linalg.svd(delta[f], lapack_driver="gesvd", compute_uv=False)
        np.testing.assert_allclose(s[f], ref, atol=1e-12)
        r = int(out["rank"].sel(head="0.0").values[f])
        kept = s[f, :r] ** 2
        assert kept.sum() / (s[f] ** 2).sum() >= 0.99 > kept[:-1].sum() / (s[f] ** 2).sum()
        # the kept bases reproduce ΔC's best rank-r approximation
        approx = u[f, :, :r] * s[f, :r] @ v[f, :, :r].T
        u0, s0, vt0 = scipy.linalg.svd(delta[f], lapack_driver="gesvd")
        np.testing.assert_allclose(approx, u0[:, :r] * s0[:r] @ vt0[:r], atol=1e-10)


def test_svd_of_nan_says_what_is_wrong():
    bad = GESDD_FAILS.copy()
    bad[3, 5] = np.nan
    with pytest.raises(ValueError, match="NaN or inf.*pair_count"):
        svd(bad)


def test_null_never_counts_a_numerically_zero_component():
    """A singular value at float64 rounding (1e-13 of the largest) is not a component, even when
    the permuted ΔCs' are rounding noise smaller still (a rank-1 ΔC of a few pairs once got
    null_rank 31 of 32 that way)."""
    import torch

    from qktrace.core import ops
    from qktrace.verbs.decompose import null_rank_of

    real = torch.diag(torch.tensor([1.0, 1e-13, 0.0, 0.0], dtype=torch.float64))
    noise = 1e-16 * torch.randn(50, 4, 4, generator=torch.Generator().manual_seed(0))
    null = (
        noise.to(torch.float64)
        + 0.5
        * torch.eye(4, dtype=torch.float64)[0:1, :, None]
        @ (torch.eye(4, dtype=torch.float64)[0:1, None, :])
    )  # permutations: a component of 0.5 along the first axes, below ΔC's 1
    s, cutoff = (x.numpy() for x in ops.null_cutoffs(real, null, 0.95))
    assert s[1] > cutoff[1] or np.isnan(cutoff[1])  # the noise "beats" its noise cut-off ...
    assert null_rank_of(s, cutoff) == 1  # ... but is not counted
