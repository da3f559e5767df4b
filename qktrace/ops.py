"""Pure-torch operations that run inside nnsight traces.

Everything here may be called on traced values and is shipped to NDIF *by value* (see
`qktrace.models.load`, which registers this module with `nnsight.register`). So this module
imports nothing but torch, keeps no state, and works on plain tensors as well as on proxies:
the same code serves local runs, `remote="local"` and NDIF, and plain-torch callers (the toy
model) too.
"""

from __future__ import annotations

import torch


def outer_sums(
    q: torch.Tensor, k: torch.Tensor, groups: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-group float64 sums of q k^T, q and k over pairs.

    q [pairs, dq], k [pairs, dk], groups [pairs, G] one-hot (or weights).
    Returns (qk [G, dq, dk], q_sum [G, dq], k_sum [G, dk]).
    """
    g = groups.to(torch.float64)
    q64 = q.to(torch.float64)
    k64 = k.to(torch.float64)
    qk = torch.einsum("pg,pi,pj->gij", g, q64, k64)
    return qk, g.T @ q64, g.T @ k64


def coordinates(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Coordinates of vectors x [..., d] in an orthonormal basis [d, r]: x @ basis."""
    return x @ basis.to(x.dtype)


def swap_in_subspace(
    x_a: torch.Tensor, x_b: torch.Tensor, basis: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exchange the coordinates of x_a and x_b inside span(basis); keep the rest of each.

    With c = x V: x_a + (c_b - c_a) V^T and x_b + (c_a - c_b) V^T (METHOD.md, Fig 4).
    """
    v = basis.to(x_a.dtype)
    delta = (x_b @ v - x_a @ v) @ v.T
    return x_a + delta, x_b - delta


def project_out(x: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Remove the component of x [..., d] that lies in span(basis) (ablation)."""
    v = basis.to(x.dtype)
    return x - (x @ v) @ v.T


def set_coordinates(x: torch.Tensor, source: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """Give x the coordinates of `source` inside span(basis) (patching); keep the rest of x."""
    v = basis.to(x.dtype)
    return x + (source @ v - x @ v) @ v.T
