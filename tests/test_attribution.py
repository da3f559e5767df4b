"""Logit parts from feature subspaces must sum exactly to the captured logits."""

import numpy as np
import pytest
import xarray as xr

from qktrace.model.loading import load
from qktrace.verbs.attribute import as_basis, attribute, orthogonalize
from qktrace.verbs.capture import capture
from tests.conftest import tiny

PROMPTS = [
    "The apple is in Box A, the cat is in Box B.",
    "Which box is the cat in? Box",
    "- apple\n- horse\n- water\nWhat are the fruits in the list?",
]
HEADS = "0.1,1.2,1.3"
_CAPTURES: dict[str, xr.Dataset] = {}


def captured(family: str) -> xr.Dataset:
    """q/k of three heads at every key (ragged: NaN-padded keys), two queries per prompt."""
    if family not in _CAPTURES:
        net, tok = tiny(family)
        m = load(net, tokenizer=tok)
        _CAPTURES[family] = capture(
            m, PROMPTS, HEADS, query=[[-1, 3]] * 3, keys="all", progress=False
        )
    return _CAPTURES[family]


def overlapping_bases(seed: int = 0) -> dict[str, np.ndarray]:
    """Three non-orthonormal subspaces; the second shares a direction with the first."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(16, 3)) * 3.0
    b = np.concatenate([a[:, :1] * -2.0, rng.normal(size=(16, 3))], axis=1)
    c = rng.normal(size=(16, 2)) + a[:, 1:2]
    return {"order": a, "lexical": b, "other": c}


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
@pytest.mark.parametrize("side", ["query", "key"])
def test_parts_sum_to_total(family, side):
    ds = captured(family)
    out = attribute(ds, overlapping_bases(), side=side)
    assert list(out.part.values) == ["order", "lexical", "other", "residual"]
    assert out.logit_part.dims == ("prompt", "head", "query", "key", "part")
    total = out.logit_part.sum("part", skipna=False)
    np.testing.assert_allclose(total, out.logit, atol=1e-5)
    # the total is the logit the model computed (capture checks that against eager attention)
    np.testing.assert_allclose(out.logit, ds.logit, rtol=1e-5, atol=1e-5)
    # each part by hand: the projector onto span(first i bases) minus the one onto span(first
    # i - 1), applied to the split side (so a later basis is credited only what it adds)
    bases = list(overlapping_bases().values())
    projectors = [np.zeros((16, 16))]
    for i in range(len(bases)):
        u, sv, _ = np.linalg.svd(np.concatenate(bases[: i + 1], axis=1), full_matrices=False)
        u = u[:, sv > 1e-9 * sv[0]]
        projectors.append(u @ u.T)
    projectors.append(np.eye(16))  # the residual: everything the bases leave out
    q = ds.q.values.astype(np.float64)  # [prompt, head, query, d]
    k = ds.k.values.astype(np.float64)  # [prompt, head, key, d]
    scale = ds["scaling"].values[None, :, None, None]
    for c, name in enumerate(out.part.values):
        piece = projectors[c + 1] - projectors[c]
        # q·(P k) = (P q)·k: P is symmetric, so both sides give this number
        want = np.einsum("phqd,de,phke->phqk", q, piece, k) * scale
        np.testing.assert_allclose(
            out.logit_part.sel(part=name), want, rtol=1e-6, atol=1e-6, err_msg=name
        )
    # the shared direction is credited to "order": "lexical" keeps 3 of its 4 columns
    assert out["part_rank"].sel(part="lexical").values.tolist() == [3, 3, 3]
    assert (out["part_rank"].sum("part") == 16).all()
    # padded key slots stay NaN and do not spoil `explained`
    assert np.isnan(out.logit.values[1, :, :, -1]).all() and np.isfinite(out.explained).all()


@pytest.mark.parametrize("side", ["query", "key"])
def test_explained_is_one_when_bases_span_everything(side):
    rng = np.random.default_rng(1)
    bases = {"a": rng.normal(size=(16, 10)), "b": rng.normal(size=(16, 9))}
    out = attribute(captured("qwen3"), bases, side=side)
    np.testing.assert_allclose(out.explained, 1.0, atol=1e-9)
    np.testing.assert_allclose(out.logit_part.sel(part="residual").fillna(0), 0.0, atol=1e-6)
    assert out["part_rank"].sel(part="b").values.tolist() == [6, 6, 6]


def test_explained_matches_definition():
    ds = captured("llama")
    out = attribute(ds, {"order": overlapping_bases()["order"]})
    p, h, q = 1, 2, 0
    n = int(ds.n_tokens[p])
    resid = out.logit_part.sel(part="residual").values[p, h, q, :n]
    total = out.logit.values[p, h, q, :n]
    assert out.explained.values[p, h, q] == pytest.approx(
        1 - (resid**2).sum() / (total**2).sum(), rel=1e-9
    )
    # by hand: the query's part in span(order) against every key
    u = np.linalg.qr(overlapping_bases()["order"])[0]
    qv = ds.q.values[p, h, q].astype(np.float64)
    k = ds.k.values[p, h, :n].astype(np.float64)
    scale = ds.logit.values[p, h, q, 0] / (k[0] @ qv)
    np.testing.assert_allclose(
        out.logit_part.sel(part="order").values[p, h, q, :n],
        k @ (u @ (u.T @ qv)) * scale,
        rtol=1e-4,
        atol=1e-6,
    )


def test_per_head_bases_from_a_dataarray():
    ds = captured("llama")
    rng = np.random.default_rng(2)
    per_head = np.full((3, 16, 5), np.nan)  # decompose pads columns beyond the rank with NaN
    ranks = [2, 5, 3]
    for h, r in enumerate(ranks):
        per_head[h, :, :r] = rng.normal(size=(16, r))
    da = xr.DataArray(
        per_head, dims=("head", "dq", "component"), coords={"head": ds["head"].values}
    )
    out = attribute(ds, {"feat": da})
    assert out["part_rank"].sel(part="feat").values.tolist() == ranks
    for h, label in enumerate(ds["head"].values):
        one = attribute(ds.sel(head=[label]), {"feat": per_head[h, :, : ranks[h]]})
        np.testing.assert_allclose(
            out.logit_part.sel(head=label), one.logit_part.isel(head=0), atol=1e-10
        )


def test_orthogonalize_makes_projectors_orthogonal():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(8, 3))
    out = orthogonalize([a, np.concatenate([a, rng.normal(size=(8, 2))], axis=1), a[:, :1]])
    assert [o.shape[1] for o in out] == [3, 2, 0]
    stacked = np.concatenate(out, axis=1)
    np.testing.assert_allclose(stacked.T @ stacked, np.eye(5), atol=1e-12)


def test_errors_name_the_fix():
    ds = captured("llama")
    with pytest.raises(ValueError, match=r"shape \(3, 16\); expected \[d_head, r\] = \[16, r\]"):
        attribute(ds, {"a": np.ones((3, 16))})
    with pytest.raises(ValueError, match="call your subspace something else"):
        attribute(ds, {"residual": np.eye(16)[:, :2]})
    da = xr.DataArray(np.eye(16)[None, :, :2], dims=("head", "dq", "c"), coords={"head": ["9.9"]})
    with pytest.raises(ValueError, match="has no head '0.1'"):
        attribute(ds, {"a": da})
    with pytest.raises(ValueError, match="side must be"):
        attribute(ds, {"a": np.eye(16)}, side="value")
    with pytest.raises(ValueError, match="has no `q`"):
        attribute(ds.drop_vars("q"), {"a": np.eye(16)})
    assert as_basis(np.eye(16)[:, 0], 16).shape == (16, 1)
