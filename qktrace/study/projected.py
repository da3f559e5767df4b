"""A study's fresh-prompt pass reduced in the trace, for remote models: what the study computes
from the fresh prompts' q and k, without sending q and k back.

A study reads three things from its fresh prompts: the permutation null of the ΔC of their
labelled (query, key) pairs, the keys' PCA inside the recovered key subspaces, and the
attention-level swaps in those subspaces and in random ones of the same rank. None of them
needs q and k whole. A swap changes a key's logit by (Δk · q) with Δk inside the swapped
subspace, so the coordinates of q and k in the span W of every basis the study uses (the
features' key bases and its random draws) give it exactly, as they give the PCA; the null
needs the pairs' q k^T, which the trace sums per permutation (C+ of each shuffled labelling)
and tests at the end of the request (`ops.null_cutoffs`). So one request runs every fresh
prompt and returns, per prompt and head, the attention and logits at the keys and the q and k
coordinates in W (rank m, a few to a few dozen numbers instead of d_head per token), and per
(head, feature) the null's singular values and cut-offs: on the organism, under a tenth of a
percent of the raw q/k bytes instead of a few percent.

The captured Dataset it returns has `q` and `k` in d_head coordinates, but they are the
projections onto W (``attrs["projected"]``), good for `intervene_captured` (whose edits stay
inside W) and for the PCA, not for anything else; the pipeline keeps them out of the store.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import nnsight
import numpy as np
import torch
import xarray as xr

from qktrace.core import ops
from qktrace.model.loading import Head, Model
from qktrace.run.batching import (
    Batch,
    PromptInput,
    by_layer,
    given_order,
    head_coords,
    layer_reads,
    plan_run,
    run,
)
from qktrace.study.tools import null_dataset
from qktrace.verbs.capture import batch_dataset, check_finite
from qktrace.verbs.decompose import N_PERMUTATIONS, NULL_QUANTILE, permutation_masks

# attrs["projected"] of a projected capture
PROJECTED = (
    "q and k are their projections onto the span of the study's key bases and random draws "
    "(`projection` per head), computed in the trace: exact for swaps and PCA in those "
    "subspaces, not the model's q and k"
)

Pairs = Mapping[str, Sequence[Sequence[bool | None]]]


def projected_pass(
    model: Model,
    prompts: Sequence[PromptInput],
    heads: list[Head],
    projection: Mapping[str, np.ndarray],
    *,
    query: Any,
    keys: Any,
    pairs: Pairs | None = None,
    n_permutations: int = N_PERMUTATIONS,
    quantile: float = NULL_QUANTILE,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[xr.Dataset, xr.Dataset | None]:
    """One request over `prompts`: (capture projected onto `projection`, permutation null).

    Parameters
    ----------
    projection
        Per head label, an orthonormal basis [d_head, m] of what the study will read of q and k.
    query, keys
        Positions as for `qktrace.capture` (one query per prompt).
    pairs
        Per feature, per prompt, per key: True (positive pair with the query), False
        (negative) or None (not in this feature's ΔC); None: no null test.
    n_permutations, quantile, seed
        As `qktrace.verbs.decompose.permutation_null` (the same permutations: equal results).

    Returns
    -------
    The capture (as `qktrace.capture` with ``attention=True``, q and k projected, plus
    ``projection (head, d_head, component)``), and the null as `null_test` returns it.
    """
    plan = plan_run(model, prompts, query, keys, batch_size)
    d = model.d_head
    width = max(b.shape[1] for b in projection.values())
    padded = {
        label: np.pad(b, ((0, 0), (0, width - b.shape[1]))).astype(np.float32)
        for label, b in projection.items()
    }
    layers = by_layer(model, heads)
    layout = [
        (*reads, torch.tensor(np.stack([padded[h.label] for h in hs])))
        for reads, hs in zip(layer_reads(model, layers), layers.values(), strict=True)
    ]
    features = list(pairs) if pairs else []
    weights, counts = _pair_weights(pairs, features, n_permutations, seed, plan.key_width)
    step = _session_step(model, layout, weights, counts, quantile)
    hint = "the fresh-prompt pass keeps no partial results: rerun the study."
    ((request, (rows, nulls)),) = list(
        run(plan, step, desc="fresh prompts", resume_hint=hint, progress=progress,
            batches_per_request=0)
    )  # fmt: skip
    order = given_order(layers, heads)
    basis = np.stack([padded[h.label] for h in heads])  # [head, d, m]
    parts = []
    for batch, per_layer in zip(request, rows, strict=True):
        values = {
            name: np.concatenate([item[i].float().cpu().numpy() for item in per_layer], axis=1)[
                :, order
            ]
            for i, name in enumerate(("q", "k", "logit", "attention"))
        }
        for name, array in values.items():
            check_finite(name, array, batch.start)
        for name in ("q", "k"):  # coordinates [b, head, n, m] -> their vectors in d_head
            values[name] = np.einsum("bhnm,hdm->bhnd", values[name], basis)
        parts.append(batch_dataset(values, batch))
    captured = xr.concat(parts, dim="prompt", data_vars="all", coords="different",
                         compat="equals").assign_coords(head_coords(model, heads))  # fmt: skip
    captured = captured.assign(
        projection=(("head", "d_head", "component"), basis),
        projection_rank=("head", np.array([projection[h.label].shape[1] for h in heads])),
    ).assign_attrs(projected=PROJECTED)
    if not features:
        return captured, None
    # nulls: per head (in layer order), per feature: (singular values, cut-offs) or None
    flat = [h.label for hs in layers.values() for h in hs]
    tested = {
        (head, f): tuple(x.cpu().numpy().astype(np.float64) for x in result)
        for head, per_head in zip(flat, nulls, strict=True)
        for f, result in zip(features, per_head, strict=True)
        if result is not None
    }
    null = null_dataset([h.label for h in heads], features, tested, d, quantile=quantile,
                        n_permutations=n_permutations)  # fmt: skip
    return captured, null


def _pair_weights(
    pairs: Pairs | None, features: list[str], n_permutations: int, seed: int, width: int
) -> tuple[list[np.ndarray] | None, list[tuple[int, int] | None]]:
    """Per prompt, int8 weights [keys, features x (2 + P)]: per feature, 1 for every pair (its
    q k^T goes to the total), 1 for the positives, then 1 for the positives of each permutation
    (`permutation_masks`, drawn over the feature's pairs in prompt and key order, as the local
    null draws them); and per feature (n_pos, n_neg), None without both kinds."""
    if not features:
        return None, []
    group = 2 + n_permutations
    n_prompts = len(pairs[features[0]])  # type: ignore[index]
    out = [np.zeros((width, len(features) * group), dtype=np.int8) for _ in range(n_prompts)]
    counts: list[tuple[int, int] | None] = []
    for j, f in enumerate(features):
        where = [(p, s, bool(lab)) for p, row in enumerate(pairs[f]) for s, lab in enumerate(row)  # type: ignore[index]
                 if lab is not None]  # fmt: skip
        positive = np.array([lab for _, _, lab in where], dtype=bool)
        n_pos = int(positive.sum())
        if n_pos == 0 or n_pos == len(where):
            counts.append(None)
            continue
        counts.append((n_pos, len(where) - n_pos))
        masks = permutation_masks(positive, n_permutations, seed)  # [P, pairs]
        for n, (p, s, lab) in enumerate(where):
            out[p][s, j * group] = 1
            out[p][s, j * group + 1] = lab
            out[p][s, j * group + 2 : (j + 1) * group] = masks[:, n]
    return out, counts


def _session_step(
    model: Model,
    layout: list[tuple],
    weights: list[np.ndarray] | None,
    counts: list[tuple[int, int] | None],
    quantile: float,
) -> Any:
    """The step of `projected_pass`'s batch loop: all batches, one `_fresh_request`."""

    def step(batches: list[Batch]) -> tuple[list, list]:
        return _fresh_request(model, batches, layout, weights, counts, quantile)

    return step


def _fresh_request(
    model: Model,
    batches: list[Batch],
    layout: list[tuple],
    weights: list[np.ndarray] | None,
    counts: list[tuple[int, int] | None],
    quantile: float,
) -> tuple[list, list]:
    """One request, every batch a trace of one nnsight session: per batch and layer the q and k
    coordinates and the keys' logits and attention; per layer, head and feature the null."""
    reads = {layer: model.attention_inputs(layer) for layer, *_ in layout}
    group = (len(weights[0][0]) // len(counts)) if counts and weights else 0
    work = []
    for batch in batches:
        w = None
        if weights is not None:
            w = torch.tensor(np.stack(weights[batch.start : batch.start + len(batch.texts)]))
        work.append((batch.encoded.inputs, batch.query_index, batch.key_index, w))
    lm = model.lm
    # Every name used in a session travels with the request by value (see sums.py).
    with torch.inference_mode(), model.session():
        rows_out: list[Any] = []
        totals: list[Any] = []
        for inputs, query_index, key_index, w in work:
            with lm.trace(inputs) as tracer:
                per_layer = []
                for i, (layer, q_heads, kv_heads, scaling, softcap, basis) in enumerate(layout):
                    q, k, mask = reads[layer].read()
                    q_sel = ops.gather_heads(q, q_heads, query_index)
                    k_sel = ops.gather_heads(k, kv_heads, key_index)
                    logits, probs = ops.attention_rows(
                        q_sel, k, kv_heads, mask, query_index, scaling, softcap
                    )
                    per_layer.append(
                        [
                            ops.head_coordinates(q_sel, basis),
                            ops.head_coordinates(k_sel, basis),
                            ops.at_keys(logits, key_index),
                            ops.at_keys(probs, key_index),
                        ]
                    )
                    if w is not None:
                        sums = ops.qk_sums(q_sel[:, :, 0], k_sel, w)
                        if i == len(totals):
                            totals.append(sums)
                        else:
                            totals[i] = totals[i] + sums
                rows_out.append(per_layer)
                tracer.stop()  # nothing after the last layer read is needed
        nulls = []
        for sums in totals:  # per layer [h, F x group, d, d]
            for h in range(sums.shape[0]):
                per_feature: list[Any] = []
                for j, count in enumerate(counts):
                    if count is None:
                        per_feature.append(None)
                        continue
                    n_pos, n_neg = count
                    block = sums[h, j * group : (j + 1) * group]
                    total = block[0]
                    real = block[1] / n_pos - (total - block[1]) / n_neg
                    null = block[2:] / n_pos - (total - block[2:]) / n_neg
                    per_feature.append(list(ops.null_cutoffs(real, null, quantile)))
                nulls.append(per_feature)
        saved = nnsight.save([rows_out, nulls])
    return saved[0], saved[1]
