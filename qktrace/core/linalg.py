"""Query-key space algebra shared by the verbs and the studies: which side of q·k, and unions
of subspaces."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

__all__ = ["SIDES", "Side", "union_basis"]

# Which vectors of the attention logit q·k a verb reads or edits: the queries or the keys.
Side = Literal["key", "query"]
SIDES: tuple[Side, ...] = ("key", "query")


def union_basis(bases: Sequence[np.ndarray], tol: float = 1e-6) -> np.ndarray:
    """An orthonormal basis [d, r] of the span of several bases [d, r_i] (NaN columns dropped).

    One basis is returned as it is (an orthonormal basis is its own union; kept so that its
    columns, and the signs of anything computed from them, do not change); several are joined
    by an SVD of their columns, keeping the directions with singular value above `tol` times
    the largest.
    """
    columns = [b[:, ~np.isnan(b).any(axis=0)] for b in bases]
    if len(columns) == 1:
        return columns[0]
    stacked = np.concatenate(columns, axis=1)
    if stacked.shape[1] == 0:
        return stacked
    u, s, _ = np.linalg.svd(stacked, full_matrices=False)
    return u[:, s > tol * s[0]]
