"""Contrastive covariances: which query and key directions carry a feature.

The method in plain words
-------------------------
An attention logit is q·k. Take a feature z (a category, an order index, a latent of the toy
model) and collect (query, key) pairs of two kinds: *positive* pairs, where the key's z matches
the query's, and *negative* pairs, where it differs and everything else is held as equal as
possible. Average the outer products q k^T over each kind::

    C+ = E[q k^T | positive]      C- = E[q k^T | negative]      ΔC = C+ - C-

Whatever the two kinds share cancels in ΔC; what is left is the part of the bilinear form
q·k that responds to z. ΔC is a (dq x dk) matrix and not symmetric, so its SVD
ΔC = U S V^T gives two subspaces: the columns of U are query directions and the columns of V
key directions. The *rank* of the feature is the smallest r whose top r squared singular values
hold a fraction `threshold` (99% by default) of the total; ``U[:, :r]`` is the query basis and
``V[:, :r]`` the key basis.

What this module provides
-------------------------
- `rank_for_threshold`, `decompose_matrices` and the `Subspace` dataclass: the rule and the SVD
  for one pair of matrices.
- Streaming sums: the "covariance sums" Dataset (`qk_sum`, `q_sum`, `k_sum`, `pair_count` over
  ``head, feature, contrast``) holds float64 running sums, so any number of pairs fits in
  O(d_head^2) memory per head and feature. `empty_sums` and `add_pairs` build it from numpy
  arrays; `qktrace.verbs.reduce` builds the same layout inside an nnsight trace. Sums of two batches
  are their sum (``a + b``).
- `decompose` turns sums into ΔC, singular values, bases and ranks for every head and feature.
- `permutation_null` asks how many components stand above chance, by shuffling the
  positive/negative labels; `random_subspaces` gives random orthonormal bases for baselines.

Choices (all parameters)
------------------------
- Uncentered second moments by default, as in the paper; ``centered=True`` subtracts
  E[q] E[k]^T within each contrast set.
- Bases in a Dataset have one column per SVD component; columns beyond the rank are NaN, so a
  basis used past its rank shows up as NaN instead of silently spanning a larger space.
  `Subspace.from_dataset` returns the trimmed bases. Singular values are kept in full, so
  another threshold can be applied later with `rank_for_threshold`.

This module uses numpy and xarray only; nothing here touches a model.
"""

from __future__ import annotations

import numbers
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import xarray as xr

from qktrace.core import checks, ops
from qktrace.core.errors import BadArgument, MissingVariable

__all__ = [
    "CONTRASTS",
    "NULL_QUANTILE",
    "NULL_SEED",
    "N_PERMUTATIONS",
    "THRESHOLD",
    "Subspace",
    "add_pairs",
    "decompose",
    "decompose_matrices",
    "empty_sums",
    "permutation_null",
    "random_subspaces",
    "rank_for_threshold",
]

CONTRASTS = ("positive", "negative")
# The pair count is "pair_count", not "count", which would hide the Dataset.count method
# (`sums.count` would be the method). "count" is still accepted on input.
_COUNT_NAMES = ("pair_count", "count")
# The rank rule's default: the kept components hold this fraction of sum(S^2).
THRESHOLD = 0.99
# The permutation null's defaults, written here only (`permutation_null`, the studies'
# `qktrace.study.tools.null_test` and their in-trace nulls import them): label shuffles, the
# quantile of the null each component must beat, and the seed of the shuffles.
N_PERMUTATIONS = 100
NULL_QUANTILE = 0.95
NULL_SEED = 0


def rank_for_threshold(
    singular_values: np.ndarray | Sequence[float], threshold: float = THRESHOLD
) -> int:
    """Smallest r whose top r squared singular values hold `threshold` of the total.

    Parameters
    ----------
    singular_values : array_like, shape (n,)
        Singular values in decreasing order (NaN entries, e.g. padding, are ignored).
    threshold : float, default 0.99
        Fraction of the total sum of squares to keep, in (0, 1].

    Returns
    -------
    int
        The rank r, between 1 and the number of non-zero singular values; 0 if all are zero.

    Examples
    --------
    >>> rank_for_threshold([3.0, 1.0, 0.01])
    2
    >>> rank_for_threshold([3.0, 1.0, 0.01], threshold=0.8)
    1
    """
    _check_threshold(threshold)
    s = np.asarray(singular_values, dtype=np.float64)
    if s.ndim != 1:
        raise BadArgument(f"singular_values must be 1-D, got shape {s.shape}; pass one spectrum.")
    s = s[~np.isnan(s)]
    if np.any(np.diff(s) > 1e-12 * max(float(np.abs(s).max(initial=0.0)), 1.0)):
        raise BadArgument(
            "singular_values must be in decreasing order, as np.linalg.svd returns them."
        )
    return int(_ranks(s[None, :], threshold)[0])


def _check_threshold(threshold: float) -> None:
    """Raise unless 0 < `threshold` <= 1 (a fraction of sum(S^2), not a percentage)."""
    if (
        isinstance(threshold, bool)
        or not isinstance(threshold, numbers.Real)
        or not 0.0 < threshold <= 1.0
    ):
        shown = float(threshold) if isinstance(threshold, numbers.Real) else repr(threshold)
        raise checks.BadArgument(
            f"threshold={shown} is outside (0, 1]: it is the fraction of sum(S^2) the kept "
            "components hold; pass e.g. threshold=0.99 (not 99)."
        )


def svd(matrices: np.ndarray, compute_uv: bool = True) -> Any:
    """``np.linalg.svd(matrices, full_matrices=False)`` of a matrix or a stack, redone with
    LAPACK's gesvd for any matrix on which numpy's gesdd does not converge.

    gesdd (divide and conquer, numpy's driver) fails now and then on finite, well-scaled
    matrices: a 64 x 64 ΔC of a random-weight 12-layer Llama (norm 0.43, a few singular values
    near 1e-18) raised "SVD did not converge" in `decompose`; gesvd (QR iteration, slower)
    converges on it. NaN or inf, on which both fail, gets an error that says so.
    """
    try:
        return _numpy_svd(matrices, compute_uv)
    except np.linalg.LinAlgError:
        if not np.isfinite(matrices).all():
            raise ValueError(
                "ΔC has NaN or inf entries, so it has no SVD: a feature with no pairs of one "
                "contrast (its pair_count is 0), or q/k that overflowed. Check pair_count and "
                "the labels, or run the model in float32."
            ) from None
    import scipy.linalg

    def one(matrix: np.ndarray) -> Any:
        try:
            return _numpy_svd(matrix, compute_uv)
        except np.linalg.LinAlgError:
            return scipy.linalg.svd(
                matrix, full_matrices=False, compute_uv=compute_uv, lapack_driver="gesvd"
            )

    stack = np.asarray(matrices).reshape(-1, *np.shape(matrices)[-2:])
    parts = [one(m) for m in stack]
    lead = np.shape(matrices)[:-2]
    if not compute_uv:
        return np.stack(parts).reshape(*lead, -1)
    return tuple(np.stack([p[i] for p in parts]).reshape(*lead, *parts[0][i].shape)
                 for i in range(3))  # fmt: skip


def _numpy_svd(matrices: np.ndarray, compute_uv: bool) -> Any:
    """numpy's SVD (gesdd), thin; only the singular values unless `compute_uv`."""
    if compute_uv:
        return np.linalg.svd(matrices, full_matrices=False)
    return np.linalg.svd(matrices, full_matrices=False, compute_uv=False)


def _ranks(singular_values: np.ndarray, threshold: float) -> np.ndarray:
    """Vectorised rank rule over the leading axes of `singular_values` [..., n]."""
    s = np.nan_to_num(singular_values)
    largest = np.abs(s).max(axis=-1, keepdims=True)
    # scaled by the largest value, so that S^2 cannot overflow (the rule is scale-free)
    energy = np.cumsum((s / np.where(largest > 0, largest, 1.0)) ** 2, axis=-1)
    total = energy[..., -1:]
    # a tiny relative tolerance so that exactly-at-threshold spectra are not pushed up by rounding
    reached = energy >= threshold * total * (1 - 1e-12)
    rank = np.argmax(reached, axis=-1) + 1
    return np.where(total[..., 0] > 0, rank, 0)


@dataclass(frozen=True)
class Subspace:
    """The query and key subspaces of one feature, from the SVD of ΔC = C+ - C-.

    Attributes
    ----------
    delta_c : np.ndarray, shape (dq, dk)
        ΔC = C+ - C-.
    singular_values : np.ndarray, shape (min(dq, dk),)
        All singular values of ΔC, decreasing.
    query_basis : np.ndarray, shape (dq, rank)
        Orthonormal query directions U[:, :rank].
    key_basis : np.ndarray, shape (dk, rank)
        Orthonormal key directions V[:, :rank].
    rank : int
        Number of components kept by the threshold rule.
    threshold : float
        Fraction of sum(S^2) the kept components hold at least.
    centered : bool
        Whether C+ and C- had their means E[q] E[k]^T subtracted.
    """

    delta_c: np.ndarray
    singular_values: np.ndarray
    query_basis: np.ndarray
    key_basis: np.ndarray
    rank: int
    threshold: float
    centered: bool

    def to_dataset(self) -> xr.Dataset:
        """This subspace as a Dataset with dims ``dq``, ``dk``, ``component``.

        The bases have one column per component; columns beyond `rank` are NaN.

        Examples
        --------
        >>> s = decompose_matrices(np.diag([2.0, 1.0, 0.0]), np.zeros((3, 3)))
        >>> ds = s.to_dataset()
        >>> int(ds["rank"]), ds.query_basis.dims
        (2, ('dq', 'component'))
        """
        n = self.singular_values.shape[0]
        query = _pad_columns(self.query_basis, n)
        key = _pad_columns(self.key_basis, n)
        return xr.Dataset(
            {
                "delta_c": (("dq", "dk"), self.delta_c),
                "singular_values": ("component", self.singular_values),
                "query_basis": (("dq", "component"), query),
                "key_basis": (("dk", "component"), key),
                "rank": ((), self.rank),
            },
            coords={"component": np.arange(n)},
            attrs={"threshold": self.threshold, "centered": self.centered},
        )

    @classmethod
    def from_dataset(cls, ds: xr.Dataset) -> Subspace:
        """The Subspace of one head and feature of a `decompose` result (or of `to_dataset`).

        Select the head and feature first, e.g. ``ds.sel(head=3, feature="fruit")``.

        Examples
        --------
        >>> ds = decompose_matrices(np.diag([2.0, 1.0, 0.0]), np.zeros((3, 3))).to_dataset()
        >>> Subspace.from_dataset(ds).key_basis.shape
        (3, 2)
        """
        extra = [d for d in ds["rank"].dims]
        if extra:
            raise BadArgument(
                f"from_dataset needs one subspace, but rank still has dims {extra}; select one "
                f"first, e.g. ds.sel({', '.join(f'{d}=...' for d in extra)})."
            )
        rank = int(ds["rank"])
        return cls(
            delta_c=ds["delta_c"].transpose("dq", "dk").values,
            singular_values=ds["singular_values"].values,
            query_basis=ds["query_basis"].transpose("dq", "component").values[:, :rank],
            key_basis=ds["key_basis"].transpose("dk", "component").values[:, :rank],
            rank=rank,
            threshold=float(ds.attrs.get("threshold", np.nan)),
            centered=bool(ds.attrs.get("centered", False)),
        )


def _pad_columns(basis: np.ndarray, n: int) -> np.ndarray:
    out = np.full((basis.shape[0], n), np.nan)
    out[:, : basis.shape[1]] = basis
    return out


def decompose_matrices(
    c_pos: np.ndarray, c_neg: np.ndarray, *, threshold: float = THRESHOLD, centered: bool = False
) -> Subspace:
    """SVD of ΔC = `c_pos` - `c_neg` and the bases kept by the threshold rule.

    Parameters
    ----------
    c_pos, c_neg : np.ndarray, shape (dq, dk)
        C+ = E[q k^T | positive] and C- = E[q k^T | negative].
    threshold : float, default 0.99
        See `rank_for_threshold`.
    centered : bool, default False
        Recorded on the result only: say whether `c_pos` and `c_neg` are centered.

    Returns
    -------
    Subspace

    Examples
    --------
    >>> s = decompose_matrices(np.diag([3.0, 1.0, 0.0, 0.0]), np.zeros((4, 4)))
    >>> s.rank, s.singular_values.round(2).tolist()
    (2, [3.0, 1.0, 0.0, 0.0])
    """
    _check_threshold(threshold)
    c_pos = np.asarray(c_pos, dtype=np.float64)
    c_neg = np.asarray(c_neg, dtype=np.float64)
    if c_pos.shape != c_neg.shape or c_pos.ndim != 2:
        raise BadArgument(
            f"c_pos {c_pos.shape} and c_neg {c_neg.shape} must be matrices of the same shape (dq, dk)."
        )
    delta_c = c_pos - c_neg
    u, s, vt = svd(delta_c)
    rank = int(_ranks(s[None, :], threshold)[0])
    return Subspace(
        delta_c=delta_c,
        singular_values=s,
        query_basis=u[:, :rank],
        key_basis=vt[:rank].T,
        rank=rank,
        threshold=threshold,
        centered=centered,
    )


# ------------------------------------------------------------------------------------------
# streaming sums


def empty_sums(heads: Sequence[Hashable], features: Sequence[str], d_head: int) -> xr.Dataset:
    """Zero "covariance sums" for the given heads and features.

    Parameters
    ----------
    heads : sequence
        Head labels (ints or strings such as ``"16.19"``), the ``head`` coordinate.
    features : sequence of str
        Feature names, the ``feature`` coordinate.
    d_head : int
        Query and key dimension.

    Returns
    -------
    xr.Dataset
        ``qk_sum (head, feature, contrast, dq, dk)``, ``q_sum (…, dq)``, ``k_sum (…, dk)``
        (float64) and ``pair_count (head, feature, contrast)`` (int64), with
        ``contrast = ["positive", "negative"]``.

    Examples
    --------
    >>> empty_sums([0], ["z1", "z2"], 4).qk_sum.shape
    (1, 2, 2, 4, 4)
    """
    heads, features = list(heads), [str(f) for f in features]
    for name, values in (("heads", heads), ("features", features)):
        if not values or len(set(values)) != len(values):
            raise BadArgument(
                f"{name} must be a non-empty list of distinct labels, got {values!r}."
            )
    shape = (len(heads), len(features), len(CONTRASTS))
    dims = ("head", "feature", "contrast")
    return xr.Dataset(
        {
            "qk_sum": ((*dims, "dq", "dk"), np.zeros((*shape, d_head, d_head))),
            "q_sum": ((*dims, "dq"), np.zeros((*shape, d_head))),
            "k_sum": ((*dims, "dk"), np.zeros((*shape, d_head))),
            "pair_count": (dims, np.zeros(shape, dtype=np.int64)),
        },
        coords={"head": heads, "feature": features, "contrast": list(CONTRASTS)},
    )


def add_pairs(
    sums: xr.Dataset,
    q: np.ndarray,
    k: np.ndarray,
    head: Hashable,
    feature: str,
    contrast: str,
) -> xr.Dataset:
    """Sums with the (query, key) pairs ``q[i], k[i]`` added to one head, feature and contrast.

    Parameters
    ----------
    sums : xr.Dataset
        From `empty_sums` (or an earlier `add_pairs`). Not modified.
    q : np.ndarray, shape (pairs, dq)
    k : np.ndarray, shape (pairs, dk)
        Row i of `q` and row i of `k` form one pair.
    head, feature, contrast
        Where the pairs go; `contrast` is ``"positive"`` or ``"negative"``.

    Returns
    -------
    xr.Dataset
        A new sums Dataset.

    Examples
    --------
    >>> sums = empty_sums([0], ["z1"], 2)
    >>> sums = add_pairs(sums, np.ones((3, 2)), np.ones((3, 2)), 0, "z1", "positive")
    >>> int(sums.pair_count.sel(head=0, feature="z1", contrast="positive"))
    3
    """
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    if q.ndim != 2 or k.ndim != 2 or q.shape[0] != k.shape[0]:
        raise BadArgument(
            f"q {q.shape} and k {k.shape} must be (pairs, dq) and (pairs, dk) with the same number "
            "of rows; row i of q and row i of k form one pair."
        )
    if contrast not in CONTRASTS:
        raise BadArgument(f"contrast={contrast!r}: use 'positive' or 'negative'.")
    for dim, label in (("head", head), ("feature", feature)):
        if label not in sums.indexes[dim]:
            raise MissingVariable(
                f"{dim}={label!r} is not in the sums ({list(sums.indexes[dim])}); "
                f"create the sums with it in empty_sums."
            )
    if q.shape[1] != sums.sizes["dq"] or k.shape[1] != sums.sizes["dk"]:
        raise BadArgument(
            f"q has {q.shape[1]} and k {k.shape[1]} columns but the sums are "
            f"dq={sums.sizes['dq']}, dk={sums.sizes['dk']}."
        )
    out = sums.copy(deep=True)
    where = {"head": head, "feature": feature, "contrast": contrast}
    out["qk_sum"].loc[where] = out["qk_sum"].loc[where].values + q.T @ k
    out["q_sum"].loc[where] = out["q_sum"].loc[where].values + q.sum(0)
    out["k_sum"].loc[where] = out["k_sum"].loc[where].values + k.sum(0)
    out[_count_name(out)].loc[where] = int(out[_count_name(out)].loc[where]) + q.shape[0]
    return out


def _count_name(sums: xr.Dataset) -> str:
    for name in _COUNT_NAMES:
        if name in sums:
            return name
    raise MissingVariable(
        f"the sums have no pair count (variables: {list(sums.data_vars)}); expected "
        "'pair_count' (head, feature, contrast) as made by empty_sums or qktrace.verbs.reduce."
    )


def decompose(
    sums: xr.Dataset, *, threshold: float = THRESHOLD, centered: bool = False
) -> xr.Dataset:
    """ΔC, its SVD and the kept query/key bases for every head and feature of `sums`.

    Parameters
    ----------
    sums : xr.Dataset
        Covariance sums (`empty_sums` + `add_pairs`, or `qktrace.reduce`), or the ΔC that
        `qktrace.reduce(..., delta=True)` returns (`delta_c` instead of `qk_sum`).
    threshold : float, default 0.99
        See `rank_for_threshold`.
    centered : bool, default False
        Use C = E[q k^T] - E[q] E[k]^T within each contrast set instead of E[q k^T].

    Returns
    -------
    xr.Dataset
        ``delta_c (head, feature, dq, dk)``, ``singular_values (head, feature, component)``,
        ``query_basis (head, feature, dq, component)``, ``key_basis (head, feature, dk,
        component)`` (NaN beyond the rank), ``rank (head, feature)`` and ``pair_count``;
        attrs ``threshold`` and ``centered`` (plus those of `sums`). Dims other than
        contrast/dq/dk are all mapped over, so extra ones (e.g. ``layer``) are fine.

    Raises
    ------
    ValueError
        If a head and feature has no positive or no negative pairs, or `threshold` is not in
        (0, 1].

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> q, k = rng.normal(size=(500, 4)), rng.normal(size=(500, 4))
    >>> sums = empty_sums([0], ["z"], 4)
    >>> sums = add_pairs(sums, q, q, 0, "z", "positive")  # keys equal to the query
    >>> sums = add_pairs(sums, q, k, 0, "z", "negative")  # unrelated keys
    >>> out = decompose(sums)
    >>> out["rank"].sel(head=0, feature="z").item()
    4
    """
    count_name = _check_sums(sums, threshold, centered)
    from qktrace.store import provenance

    sums = sums.transpose(..., "contrast", "dq", "dk")
    count = sums[count_name].transpose(..., "contrast")
    _check_counts(count)
    outer = [d for d in count.dims if d != "contrast"]
    delta_c = _delta_c(sums, count, outer, centered)
    u, s, vt = svd(delta_c)
    rank = _ranks(s, threshold)
    keep = np.arange(s.shape[-1]) < rank[..., None]  # [..., component]
    query_basis = np.where(keep[..., None, :], u, np.nan)
    key_basis = np.where(keep[..., None, :], np.swapaxes(vt, -1, -2), np.nan)

    coords = {name: coord for name, coord in sums.coords.items() if "contrast" not in coord.dims}
    coords["component"] = np.arange(s.shape[-1])
    return xr.Dataset(
        {
            "delta_c": ((*outer, "dq", "dk"), delta_c),
            "singular_values": ((*outer, "component"), s),
            "query_basis": ((*outer, "dq", "component"), query_basis),
            "key_basis": ((*outer, "dk", "component"), key_basis),
            "rank": (tuple(outer), rank.astype(np.int64)),
            "pair_count": count.variable,
        },
        coords=coords,
        attrs={
            **sums.attrs,  # e.g. n_prompts and partial of a reduce checkpoint
            **provenance(
                "decompose", {"threshold": threshold, "centered": centered}, inputs=sums.attrs
            ),
            "threshold": threshold,
            "centered": centered,
        },
    )


def _check_sums(sums: xr.Dataset, threshold: float, centered: bool) -> str:
    """`decompose`'s arguments checked before any arithmetic; returns the pair count's name."""
    checks.dataset("sums", sums, "the sums of qktrace.reduce (or empty_sums/add_pairs)")
    checks.flag("centered", centered)
    _check_threshold(threshold)
    if not isinstance(sums, xr.Dataset):
        raise checks.BadArgumentType(
            f"sums is a {type(sums).__name__}; pass the Dataset of qktrace.reduce (or of "
            "empty_sums + add_pairs)."
        )
    count_name = _count_name(sums)
    for name in ("qk_sum", "delta_c", "q_sum", "k_sum", count_name):
        if name in sums:
            checks.finite(
                f"sums[{name!r}]",
                sums[name],
                "an SVD of it would be meaningless (LAPACK fails or returns garbage). Find where "
                "it came from (a float16 overflow in the model, a NaN prompt, a hand-edited "
                "store) and recompute the sums",
            )
    return count_name


def _delta_c(sums: xr.Dataset, count: xr.DataArray, outer: list[Hashable], centered: bool) -> Any:
    """ΔC = C+ - C- [*outer, dq, dk] from the sums (or the ΔC `reduce(delta=True)` summed),
    less the difference of E[q] E[k]^T when `centered`."""
    n = count.values.astype(np.float64)
    pos, neg = CONTRASTS.index("positive"), CONTRASTS.index("negative")
    if "qk_sum" in sums:
        c = sums["qk_sum"].transpose(*outer, "contrast", "dq", "dk").values / n[..., None, None]
        delta_c = c[..., pos, :, :] - c[..., neg, :, :]
    else:  # `qktrace.reduce(..., delta=True)` summed ΔC itself
        if sums.attrs.get("partial"):
            raise BadArgument(
                f"these ΔC sums are {sums.attrs['partial']}. With delta=True each pair was "
                "weighted by the full run's counts, so a partial ΔC is scaled wrong; finish the "
                "run before decompose."
            )
        delta_c = sums["delta_c"].transpose(*outer, "dq", "dk").values.astype(np.float64)
    if centered:
        q_mean = sums["q_sum"].transpose(*outer, "contrast", "dq").values / n[..., None]
        k_mean = sums["k_sum"].transpose(*outer, "contrast", "dk").values / n[..., None]
        outer_means = q_mean[..., :, None] * k_mean[..., None, :]
        delta_c = delta_c - (outer_means[..., pos, :, :] - outer_means[..., neg, :, :])
    return delta_c


def _check_counts(count: xr.DataArray) -> None:
    """Raise, naming the head and feature, where a contrast set is empty."""
    for index in zip(*np.nonzero(count.values == 0), strict=True):
        where = {
            dim: _plain(count.indexes[dim][i]) if dim in count.indexes else int(i)
            for dim, i in zip(count.dims, index, strict=True)
        }
        contrast = where.pop("contrast")
        place = ", ".join(f"{d}={v!r}" for d, v in where.items())
        raise BadArgument(
            f"No {contrast} pairs for {place}: ΔC = C+ - C- needs both kinds. Add {contrast} "
            "pairs for it (check its labels), or drop it from the sums, e.g. "
            f"sums.drop_sel(feature={where.get('feature')!r})."
        )


def _plain(label: object) -> object:
    """A coordinate label as a plain Python value (3, not np.int64(3)) for messages."""
    return label.item() if isinstance(label, np.generic) else label


# ------------------------------------------------------------------------------------------
# significance and baselines


def permutation_null(
    q: np.ndarray,
    k: np.ndarray,
    is_positive: np.ndarray,
    *,
    n_permutations: int = N_PERMUTATIONS,
    seed: int = NULL_SEED,
    threshold: float = THRESHOLD,
    quantile: float = NULL_QUANTILE,
) -> xr.Dataset:
    """Which components of ΔC stand above chance, by shuffling positive/negative labels.

    Each permutation shuffles `is_positive` over the pairs (keeping the numbers of positive and
    negative pairs) and recomputes ΔC = mean(q k^T | positive) - mean(q k^T | negative). The
    components are then tested in order: component j is significant when its singular value
    exceeds the `quantile` of the null for index j (and is not zero to rounding,
    `ops.NUMERICAL_ZERO`), and `null_rank` counts the leading components that are (counting
    stops at the first that is not).

    The null for index j is the largest singular value of the permuted ΔC once the real ΔC's
    first j query and key directions are projected out. Comparing s_j with the plain j-th null
    singular value instead would be too lenient: after j real components are removed, s_j is
    the *largest* singular value of what remains, and the largest of a smaller noise matrix
    beats the j-th of a larger one more often than 5% of the time. The plain per-index null
    spectrum is returned too (``null_singular_values``), for plots.

    Parameters
    ----------
    q : np.ndarray, shape (pairs, dq)
    k : np.ndarray, shape (pairs, dk)
    is_positive : np.ndarray of bool, shape (pairs,)
        True for positive pairs, False for negative ones.
    n_permutations : int, default 100
    seed : int, default 0
    threshold : float, default 0.99
        For the `rank` reported next to `null_rank`.
    quantile : float, default 0.95

    Returns
    -------
    xr.Dataset
        ``singular_values (component)`` of the real ΔC; ``null_singular_values (permutation,
        component)``, the plain spectra of the permuted ΔCs; ``null_quantile (component)``,
        the cut-off each component was tested against (NaN past the first non-significant
        one); scalars ``null_rank`` and ``rank`` (the threshold rule's); attrs
        ``quantile``, ``threshold``, ``n_permutations``.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> q = rng.normal(size=(2000, 6))
    >>> is_positive = np.arange(2000) < 1000
    >>> k = rng.normal(size=(2000, 6))
    >>> k[is_positive, :2] += q[is_positive, :2]  # positives share 2 directions with the query
    >>> int(permutation_null(q, k, is_positive, n_permutations=50)["null_rank"])
    2
    """
    _check_threshold(threshold)
    q, k, labels = _check_pairs(q, k, is_positive, n_permutations)
    masks = permutation_masks(labels, n_permutations, seed).astype(np.float64)
    real, null = _permuted_delta_c(q, k, labels, masks)
    null_sv = svd(null, compute_uv=False)
    # the sequential test runs in torch: the same code tests a remote study's ΔC in its trace
    s, cutoff = (
        x.numpy() for x in ops.null_cutoffs(torch.tensor(real), torch.tensor(null), quantile)
    )
    null_rank = null_rank_of(s, cutoff)
    return xr.Dataset(
        {
            "singular_values": ("component", s),
            "null_singular_values": (("permutation", "component"), null_sv),
            "null_quantile": ("component", cutoff),
            "null_rank": ((), null_rank),
            "rank": ((), int(_ranks(s[None], threshold)[0])),
        },
        coords={"component": np.arange(s.size)},
        attrs={"quantile": quantile, "threshold": threshold, "n_permutations": n_permutations},
    )


def _check_pairs(
    q: np.ndarray, k: np.ndarray, is_positive: np.ndarray, n_permutations: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`permutation_null`'s pairs as float64 q, k and bool labels, with both kinds present."""
    q = np.asarray(q, dtype=np.float64)
    k = np.asarray(k, dtype=np.float64)
    labels = np.asarray(is_positive, dtype=bool)
    if q.ndim != 2 or k.ndim != 2 or not (q.shape[0] == k.shape[0] == labels.shape[0]):
        raise BadArgument(
            f"q {q.shape}, k {k.shape} and is_positive {labels.shape} must have one row per pair."
        )
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise BadArgument(
            f"is_positive has {n_pos} positive and {n_neg} negative pairs; ΔC needs both kinds."
        )
    if n_permutations < 1:
        raise BadArgument(f"n_permutations={n_permutations}; pass at least 1 (e.g. 100).")
    return q, k, labels


def _permuted_delta_c(
    q: np.ndarray, k: np.ndarray, labels: np.ndarray, masks: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The real ΔC [dq, dk] and that of every permutation (`masks` [perm, pairs], float)."""
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    total = q.T @ k  # sum over all pairs, shared by every permutation

    def delta_c(positive_sum: np.ndarray) -> np.ndarray:
        return positive_sum / n_pos - (total - positive_sum) / n_neg

    real = delta_c(q[labels].T @ k[labels])
    # every permutation's positive sum at once: masks [perm, pairs] @ the pairs' q k^T
    # [pairs, dq dk], one matrix product per chunk of pairs (at most ~256 MB of outer products)
    d_q, d_k = q.shape[1], k.shape[1]
    positive = np.zeros((masks.shape[0], d_q * d_k))
    step = max(1, 2**25 // (d_q * d_k))
    for start in range(0, labels.size, step):
        rows = slice(start, start + step)
        outer = (q[rows, :, None] * k[rows, None, :]).reshape(-1, d_q * d_k)
        positive += masks[:, rows] @ outer
    return real, delta_c(positive.reshape(masks.shape[0], d_q, d_k))


def permutation_masks(is_positive: np.ndarray, n_permutations: int, seed: int) -> np.ndarray:
    """The label permutations of `permutation_null` [n_permutations, pairs] (bool): each a
    shuffle of `is_positive`, drawn in order from ``np.random.default_rng(seed)``."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(is_positive, dtype=bool)
    return np.stack([rng.permutation(labels) for _ in range(n_permutations)])


def null_rank_of(singular_values: np.ndarray, cutoff: np.ndarray) -> int:
    """How many leading components beat their permutation cut-off (`ops.null_cutoffs`) and are
    not numerically zero."""
    s = np.asarray(singular_values)
    beats = (s > np.nan_to_num(np.asarray(cutoff), nan=np.inf)) & (s > ops.NUMERICAL_ZERO * s[0])
    return int(np.argmin(beats)) if not beats.all() else int(beats.size)


def random_subspaces(d: int, rank: int, n: int, seed: int = 0) -> np.ndarray:
    """`n` random orthonormal bases of `rank` dimensions in R^d (QR of Gaussian matrices).

    The baseline for interventions: a subspace of the same size as a recovered one but with
    no relation to the feature.

    Returns
    -------
    np.ndarray, shape (n, d, rank)
        ``out[i].T @ out[i]`` is the identity.

    Examples
    --------
    >>> bases = random_subspaces(8, 3, n=10, seed=0)
    >>> bases.shape, bool(np.allclose(bases[0].T @ bases[0], np.eye(3)))
    ((10, 8, 3), True)
    """
    if not 0 < rank <= d:
        raise BadArgument(f"rank={rank} must be between 1 and d={d}.")
    gaussian = np.random.default_rng(seed).normal(size=(n, d, rank))
    basis, r = np.linalg.qr(gaussian)
    # fix the signs so the draw is a uniform (Haar) sample
    return basis * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[:, None, :]
