"""Split a head's attention logits into the parts that named feature subspaces carry.

The mechanism
-------------
An attention logit is a dot product, so it splits along any decomposition of the query into
orthogonal pieces. Given named query-side subspaces (the order-ID and lexical subspaces of a
binding head, say), qktrace makes them mutually orthogonal *in the order given*: the first is
kept as it is, each later one loses what lies in the span of the ones before it (Gram-Schmidt
on subspaces). With the orthogonal projectors P_i and the residual q_resid = q - sum_i P_i q::

    q = sum_i P_i q + q_resid
    logit_j = scaling * (sum_i k_j · P_i q + k_j · q_resid)

so the parts of every key's logit sum *exactly* to the total. The key side is the same with the
roles of q and k exchanged (``side="key"``: k_j = sum_i P_i k_j + k_resid_j). The order matters
when subspaces overlap: a shared direction is credited to the earlier name. `explained` is
1 - ||residual logits||^2 / ||total logits||^2 over a query's keys, the paper's Fig 10 number.

Only the span of each basis matters: its columns need not be orthonormal, and directions already
covered by earlier subspaces (or numerically zero) are dropped; the `part_rank` output says how
many dimensions each name kept. This module is numpy and xarray on a captured Dataset; it runs no model.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any, Literal

import numpy as np
import xarray as xr

from qktrace.core import checks
from qktrace.core.errors import BadArgument

__all__ = ["as_basis", "attribute", "orthogonalize"]

Side = Literal["query", "key"]
_VECTOR_DIMS = ("d_head", "dq", "dk")
RESIDUAL = "residual"


def as_basis(
    basis: Any, d_head: int, *, what: str = "basis", head: Hashable | None = None
) -> np.ndarray:
    """A basis as a float64 array [d_head, r], from an array or a DataArray.

    A DataArray needs one vector dim (``d_head``, ``dq`` or ``dk``) and at most one other (the
    component); with a ``head`` dim, `head` picks the row. All-NaN columns (the padding
    `qktrace.decompose` puts beyond the rank) are dropped.

    Examples
    --------
    >>> as_basis(np.eye(4)[:, :2], 4).shape
    (4, 2)
    """
    if isinstance(basis, xr.DataArray):
        if "head" in basis.dims:
            if head is None:
                raise BadArgument(
                    f"{what} has a head dim: select one head, e.g. .sel(head='16.19')."
                )
            if head not in basis["head"].values:
                have = [str(x) for x in basis["head"].values]
                raise BadArgument(
                    f"{what} has no head '{head}' (it has {have}): pass a basis for every "
                    "captured head, or capture only the heads it covers."
                )
            basis = basis.sel(head=head)
        vector = [d for d in basis.dims if d in _VECTOR_DIMS]
        other = [d for d in basis.dims if d not in _VECTOR_DIMS]
        if len(vector) != 1 or len(other) > 1:
            raise BadArgument(
                f"{what} has dims {basis.dims}; expected one of {_VECTOR_DIMS} plus one component "
                "dim (and optionally head). Select the other dims first, e.g. "
                "sub.key_basis.sel(head='16.19', feature='order')."
            )
        basis = basis.transpose(*vector, *other).values
    array = np.asarray(basis, dtype=np.float64)
    if array.ndim == 1:
        array = array[:, None]
    if array.ndim != 2 or array.shape[0] != d_head:
        raise BadArgument(
            f"{what} has shape {tuple(array.shape)}; expected [d_head, r] = [{d_head}, r] with "
            f"1 <= r <= {d_head} (one column per direction). A basis from an SVD of ΔC is "
            "U[:, :r] (query side) or V[:, :r] (key side), not their transposes."
        )
    array = array[:, ~np.isnan(array).all(axis=0)]
    if np.isnan(array).any() or not np.isfinite(array).all():
        raise ValueError(f"{what} has NaN/inf entries inside its columns: check how it was built.")
    if array.shape[1] == 0:
        raise BadArgument(f"{what} has no columns (rank 0): give it at least one direction.")
    return array


def orthogonalize(bases: list[np.ndarray], rtol: float = 1e-6) -> list[np.ndarray]:
    """Orthonormal bases of mutually orthogonal subspaces, each later one stripped of the earlier.

    Each input [d, r_i] stands for its span; the i-th output spans what the i-th input adds to
    the spans of the ones before it (directions whose remaining singular value is below `rtol`
    times the input's largest are dropped, so an output may have fewer columns, or none).

    Examples
    --------
    >>> a, b = orthogonalize([np.eye(3)[:, :2], np.ones((3, 1))])
    >>> a.shape, b.shape, bool(np.allclose(a.T @ b, 0))
    ((3, 2), (3, 1), True)
    """
    done: list[np.ndarray] = []
    for basis in bases:
        scale = np.linalg.norm(basis, ord=2) if basis.size else 0.0
        rest = basis.copy()
        for earlier in done:  # twice, for numerical orthogonality
            rest -= earlier @ (earlier.T @ rest)
        for earlier in done:
            rest -= earlier @ (earlier.T @ rest)
        u, s, _ = np.linalg.svd(rest, full_matrices=False)
        keep = s > rtol * max(scale, np.finfo(np.float64).tiny)
        done.append(u[:, keep])
    return done


def _scaling(captured: xr.Dataset, scaling: float | None) -> np.ndarray:
    """Per-head logit scale: given, from a `scaling` coord/attr, fitted to `logit`, or 1/sqrt(d)."""
    n_heads = captured.sizes["head"]
    if scaling is not None:
        return np.full(n_heads, float(scaling))
    if "scaling" in captured.coords:
        return np.broadcast_to(captured["scaling"].values, (n_heads,)).astype(np.float64)
    if "scaling" in captured.attrs:
        return np.full(n_heads, float(captured.attrs["scaling"]))
    d_head = captured.sizes["d_head"]
    out = np.full(n_heads, d_head**-0.5)
    if "logit" in captured:
        qk = xr.dot(captured["q"], captured["k"], dim="d_head").transpose(
            "prompt", "head", "query", "key"
        )
        logit = captured["logit"].transpose("prompt", "head", "query", "key").values
        qk = qk.values.astype(np.float64)
        for h in range(n_heads):
            ok = np.isfinite(qk[:, h]) & np.isfinite(logit[:, h])
            denom = float((qk[:, h][ok] ** 2).sum())
            if denom > 0:
                out[h] = float((qk[:, h][ok] * logit[:, h][ok]).sum()) / denom
    return out


def attribute(
    captured: xr.Dataset,
    bases: Mapping[str, Any],
    *,
    side: Side = "query",
    scaling: float | None = None,
) -> xr.Dataset:
    """Split attention logits into parts carried by named subspaces plus a residual.

    Parameters
    ----------
    captured
        From `qktrace.verbs.capture` (one or several heads): needs `q` (prompt, head, query, d_head)
        and `k` (prompt, head, key, d_head).
    bases
        Name -> basis, in the order of precedence: an array [d_head, r] (the same for every
        head) or a DataArray with a vector dim (``d_head``/``dq``/``dk``), a component dim and
        optionally a ``head`` dim (one basis per head, e.g. ``sub.query_basis.sel(feature=f)``
        from `qktrace.decompose`; NaN columns beyond the rank are dropped). Each later subspace
        is made orthogonal to the earlier ones, so the parts sum exactly to the total.
    side
        "query": the subspaces split q (query bases, U); "key": they split every k (key
        bases, V).
    scaling
        The factor on q·k. By default: a `scaling` coordinate or attr of `captured`, else the
        factor that maps q·k to its `logit` (exact for `capture` output), else 1/sqrt(d_head).

    Returns
    -------
    xr.Dataset
        ``logit_part`` (prompt, head, query, key, part) with part = the names then
        "residual", ``logit`` (prompt, head, query, key) the total (their sum), ``explained``
        (prompt, head, query) = 1 - ||residual logits||^2 / ||total logits||^2 over the
        prompt's keys (NaN-padded key slots are ignored), and ``part_rank`` (head, part), the
        dimensions each name kept after orthogonalization. float64; coordinates of `captured`;
        provenance attrs (`qktrace.store.provenance`, verb "attribute").

    Examples
    --------
    >>> ds = qktrace.capture(model, prompts, "16.1", keys=box_positions)  # doctest: +SKIP
    >>> parts = qktrace.attribute(ds, {"order": U_order, "lexical": U_lex})  # doctest: +SKIP
    >>> parts.logit_part.sel(part="order").isel(query=0)  # doctest: +SKIP
    >>> float(parts.explained.mean())  # doctest: +SKIP
    """
    names = _check_arguments(captured, bases, side, scaling)
    q = captured["q"].transpose("prompt", "head", "query", "d_head").values.astype(np.float64)
    k = captured["k"].transpose("prompt", "head", "key", "d_head").values.astype(np.float64)
    scale = _scaling(captured, scaling)
    parts, rank = _split(q, k, bases, captured["head"].values, side, scale)
    total = parts.sum(axis=-1)
    return _attribution(captured, parts, total, _explained(parts, total), rank, names, side, scale)


def _check_arguments(
    captured: xr.Dataset, bases: Mapping[str, Any], side: Side, scaling: float | None
) -> list[str]:
    """`attribute`'s arguments checked before any product; returns the subspace names."""
    checks.dataset("captured", captured, "the result of qktrace.capture")
    checks.mapping("bases", bases, "one basis per subspace name, e.g. {'order': basis}")
    checks.choice("side", side, ("query", "key"))
    if scaling is not None:
        checks.number("scaling", scaling, low=0, low_open=True, example="0.125")
    if side not in ("query", "key"):
        raise BadArgument(f"side must be 'query' or 'key', not {side!r}.")
    for name in ("q", "k"):
        if name not in captured:
            raise BadArgument(
                f"The captured Dataset has no `{name}`: pass the output of qktrace.verbs.capture "
                "(q and k of the heads), not of qktrace.verbs.reduce."
            )
    if not bases:
        raise BadArgument("No bases given: pass a dict name -> basis [d_head, r].")
    names = [str(n) for n in bases]
    if RESIDUAL in names:
        raise BadArgument(f"{RESIDUAL!r} names the remainder: call your subspace something else.")
    if len(set(names)) != len(names):
        raise BadArgument(f"Subspace names must be unique, got {names}.")
    return names


def _split(
    q: np.ndarray,
    k: np.ndarray,
    bases: Mapping[str, Any],
    heads: np.ndarray,
    side: Side,
    scale: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """Scaled logit parts [prompt, head, query, key, part] (the names, then the residual) and
    the dimensions each part kept [head, part], head by head."""
    d_head = q.shape[-1]
    n_prompts, n_heads, n_query, n_keys = q.shape[0], q.shape[1], q.shape[2], k.shape[2]
    parts = np.zeros((n_prompts, n_heads, n_query, n_keys, len(bases) + 1))
    rank = np.zeros((n_heads, len(bases) + 1), dtype=np.int64)
    for h, label in enumerate(heads):
        ortho = orthogonalize(
            [
                as_basis(b, d_head, what=f"Basis {name!r} ({side} side)", head=label)
                for name, b in bases.items()
            ]
        )
        split = q[:, h] if side == "query" else k[:, h]  # the vectors being split
        other = k[:, h] if side == "query" else q[:, h]
        rest = split.copy()
        for i, basis in enumerate(ortho):
            piece = (split @ basis) @ basis.T
            rest -= piece
            parts[:, h, ..., i] = _logits(piece, other, side) * scale[h]
            rank[h, i] = basis.shape[1]
        parts[:, h, ..., -1] = _logits(rest, other, side) * scale[h]
        rank[h, -1] = d_head - rank[h, :-1].sum()
    return parts, rank


def _explained(parts: np.ndarray, total: np.ndarray) -> np.ndarray:
    """1 - ||residual logits||^2 / ||total logits||^2 over each query's keys (NaN slots skipped)."""
    resid = parts[..., -1]
    valid = np.isfinite(total)
    norm_total = np.where(valid, total, 0.0)
    norm_resid = np.where(valid, resid, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return 1.0 - (norm_resid**2).sum(-1) / (norm_total**2).sum(-1)


def _attribution(
    captured: xr.Dataset,
    parts: np.ndarray,
    total: np.ndarray,
    explained: np.ndarray,
    rank: np.ndarray,
    names: list[str],
    side: Side,
    scale: np.ndarray,
) -> xr.Dataset:
    """`attribute`'s result: the parts, their total, `explained` and `part_rank`, labelled."""
    from qktrace.store import provenance

    keep = {
        name: c
        for name, c in captured.coords.items()
        if set(c.dims) <= {"prompt", "head", "query", "key"}
    }
    return xr.Dataset(
        {
            "logit_part": (("prompt", "head", "query", "key", "part"), parts),
            "logit": (("prompt", "head", "query", "key"), total),
            "explained": (("prompt", "head", "query"), explained),
            "part_rank": (("head", "part"), rank),
        },
        coords={**keep, "part": [*names, RESIDUAL]},
        attrs={
            **captured.attrs,
            **provenance("attribute", {"side": side, "order": names}, inputs=captured.attrs),
            "side": side,
            "order": names,
            "scaling": [float(s) for s in scale],
        },
    )


def _logits(split: np.ndarray, other: np.ndarray, side: Side) -> np.ndarray:
    """Unscaled q·k [prompt, query, key] from the split side and the other side."""
    if side == "query":
        return np.einsum("pqd,pkd->pqk", split, other)
    return np.einsum("pqd,pkd->pqk", other, split)
