"""Covariance sums of pairs across two prompts, reduced in the trace: a remote counterfactual
study's subspace pairs, with their permutation null, in one request.

A counterfactual study (`qktrace.study.pipeline.Study.counterfactual`, e.g. lexical binding) pairs
the query of a prompt with the answer key of the same prompt (positive) and with the answer key
of its counterfactual (negative). Locally the pipeline captures both keys and sums the pairs
here (resumable, batch by batch). On a remote model that would send back two q/k vectors per
prompt; instead each trace runs a batch of prompts together with their counterfactuals (rows
interleaved: prompt, counterfactual, ...), forms the pairs inside the trace and adds their
q k^T, q and k to the sums of their feature and contrast, and, for the null test, the
positive sums of each label permutation (the permutations `qktrace.verbs.decompose.
permutation_null` draws, so the results are the local run's). At the end of the request the
null is tested there (`ops.null_cutoffs`). A request returns heads x features x (2 d_head² +
4 d_head) float64 numbers plus 2 d_head per (head, feature) for the null.

All batches go in one request, which a failure repeats whole (a rerun of the study).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import nnsight
import numpy as np
import torch
import xarray as xr

from qktrace.core import ops
from qktrace.model.loading import Head, Model
from qktrace.run.batching import Batch, by_layer, given_order, plan_run, run
from qktrace.study.prompts import Prepared
from qktrace.study.tools import null_dataset
from qktrace.verbs.decompose import (
    CONTRASTS,
    N_PERMUTATIONS,
    NULL_QUANTILE,
    empty_sums,
    permutation_masks,
)


def paired_sums(
    model: Model,
    train: Prepared,
    heads: list[Head],
    *,
    negative_query: str = "original",
    n_permutations: int = N_PERMUTATIONS,
    quantile: float = NULL_QUANTILE,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = True,
) -> tuple[xr.Dataset, xr.Dataset]:
    """(covariance sums as `qktrace.study.pipeline.pair_sums` gives them, permutation null as
    `qktrace.study.tools.null_test` gives it) of the counterfactual pairs of `train`."""
    n = len(train.ids)
    answer_keys = [row[a] for row, a in zip(train.keys, train.answer, strict=True)]
    cf_keys = [row[a] for row, a in zip(train.counterfactual_keys, train.answer, strict=True)]  # type: ignore[arg-type]
    queries = train.query if not isinstance(train.query, str) else [len(i) - 1 for i in train.ids]
    ids, query, keys = [], [], []
    for i in range(n):  # interleaved: a batch holds whole (prompt, counterfactual) pairs
        cf = train.counterfactual_ids[i]  # type: ignore[index]
        ids += [train.ids[i], cf]
        query += [queries[i], len(cf) - 1]  # the counterfactual's query: its last token
        keys += [[answer_keys[i]], [cf_keys[i]]]
    plan = plan_run(model, ids, query, keys, 2 * batch_size)

    feature = train.answer_features()
    features = list(dict.fromkeys(feature))
    weights, counts = _pair_weights(feature, features, n_permutations, seed)
    layers = by_layer(model, heads)
    layout = [(layer, [h.head for h in hs], [model.kv_head(h.head) for h in hs])
              for layer, hs in layers.items()]  # fmt: skip

    def step(batches: list[Batch]) -> list:
        return _pairs_request(model, batches, layout, weights, counts, negative_query, quantile)

    hint = "the subspace pairs' request keeps no partial results: rerun the study."
    ((_, saved),) = list(
        run(plan, step, desc="subspace pairs", resume_hint=hint, progress=progress,
            batches_per_request=0)
    )  # fmt: skip
    order = given_order(layers, heads)
    qk, q, k = (
        np.concatenate([s[i].cpu().numpy() for s in saved], axis=0)[order] for i in range(3)
    )  # [head, features x 2, ...]
    if not (np.isfinite(qk).all() and np.isfinite(q).all() and np.isfinite(k).all()):
        raise FloatingPointError(
            "The subspace pairs' sums have NaN/inf: the model overflowed on a prompt; run it "
            "in float32 or bfloat16 instead of float16."
        )
    d = model.d_head
    shape = (len(heads), len(features), len(CONTRASTS))
    sums = empty_sums([h.label for h in heads], features, d)
    sums["qk_sum"].values[:] = qk.reshape(*shape, d, d)
    sums["q_sum"].values[:] = q.reshape(*shape, d)
    sums["k_sum"].values[:] = k.reshape(*shape, d)
    per_feature = np.array([[c[0], c[1]] for c in counts])
    sums["pair_count"].values[:] = np.broadcast_to(per_feature, shape)

    flat = [h.label for hs in layers.values() for h in hs]  # the nulls' order: by layer
    per_head = [null for s in saved for null in s[3]]
    tested = {
        (head, f): tuple(x.cpu().numpy().astype(np.float64) for x in result)
        for head, results in zip(flat, per_head, strict=True)
        for f, result in zip(features, results, strict=True)
    }
    null = null_dataset([h.label for h in heads], features, tested, d, quantile=quantile,
                        n_permutations=n_permutations)  # fmt: skip
    return sums, null


def _pair_weights(
    feature: Sequence[str], features: list[str], n_permutations: int, seed: int
) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Weights [prompts, 2 (its positive and negative pair), features x (2 + P)] (int8): per
    feature, the pair's contrast (C+, C-), then whether it is positive in each permutation.

    A feature's pairs are ordered as `pair_sums` and the local null order them (its prompts'
    positive pairs, then their negative pairs), so `permutation_masks` gives each pair the
    label the local null gives it. Returns also per feature (n positive, n negative)."""
    group = 2 + n_permutations
    out = np.zeros((len(feature), 2, len(features) * group), dtype=np.int8)
    counts = []
    for j, f in enumerate(features):
        mine = np.flatnonzero(np.asarray(feature) == f)
        labels = np.r_[np.ones(mine.size, bool), np.zeros(mine.size, bool)]
        masks = permutation_masks(labels, n_permutations, seed)  # [P, 2 x mine]
        out[mine, 0, j * group] = 1
        out[mine, 1, j * group + 1] = 1
        out[mine, 0, j * group + 2 : (j + 1) * group] = masks[:, : mine.size].T
        out[mine, 1, j * group + 2 : (j + 1) * group] = masks[:, mine.size :].T
        counts.append((int(mine.size), int(mine.size)))
    return out, counts


def _pairs_request(
    model: Model,
    batches: list[Batch],
    layout: list[tuple],
    weights: np.ndarray,
    counts: list[tuple[int, int]],
    negative_query: str,
    quantile: float,
) -> list:
    """One request, every batch a trace of one session: per layer the sums (qk [h, 2F, d, d],
    q, k [h, 2F, d]) and per head and feature the null's (singular values, cut-offs)."""
    reads = {layer: model.attention_inputs(layer) for layer, *_ in layout}
    n_features = len(counts)
    group = weights.shape[-1] // n_features
    contrast = [j * group + c for j in range(n_features) for c in (0, 1)]  # C+ and C- groups
    work = []
    for batch in batches:
        first = batch.start // 2
        w = torch.tensor(weights[first : first + len(batch.texts) // 2])  # [b, 2, G]
        work.append((batch.encoded.inputs, batch.query_index, batch.key_index,
                     w.transpose(0, 1).reshape(-1, 1, w.shape[-1])))  # fmt: skip
    own_query = negative_query == "counterfactual"
    contrast_index = torch.tensor(contrast)
    lm = model.lm
    # Every name used in a session travels with the request by value (see sums.py).
    with torch.inference_mode(), model.session():
        totals: list[Any] = []
        for inputs, query_index, key_index, w in work:
            with lm.trace(inputs) as tracer:
                for i, (layer, q_heads, kv_heads) in enumerate(layout):
                    q, k, _ = reads[layer].read()
                    q_sel = ops.gather_heads(q, q_heads, query_index)[:, :, 0]
                    k_sel = ops.gather_heads(k, kv_heads, key_index)  # [2b, h, 1, d]
                    q_neg = q_sel[1::2] if own_query else q_sel[0::2]
                    # pairs: the prompts' (positive), then the counterfactuals' (negative)
                    pair_q = torch.cat([q_sel[0::2], q_neg])
                    pair_k = torch.cat([k_sel[0::2], k_sel[1::2]])
                    qk = ops.qk_sums(pair_q, pair_k, w)  # [h, G, d, d]
                    q_sum, k_sum = ops.vector_sums(pair_q, pair_k, w[:, :, contrast_index])
                    if i == len(totals):
                        totals.append([qk, q_sum, k_sum])
                    else:
                        t = totals[i]
                        totals[i] = [t[0] + qk, t[1] + q_sum, t[2] + k_sum]
                tracer.stop()  # nothing after the last layer read is needed
        saved = []
        for qk, q_sum, k_sum in totals:
            nulls = []
            for h in range(qk.shape[0]):
                per_feature = []
                for j, (n_pos, n_neg) in enumerate(counts):
                    block = qk[h, j * group : (j + 1) * group]
                    total = block[0] + block[1]
                    real = block[0] / n_pos - block[1] / n_neg
                    null = block[2:] / n_pos - (total - block[2:]) / n_neg
                    per_feature.append(list(ops.null_cutoffs(real, null, quantile)))
                nulls.append(per_feature)
            saved.append([qk[:, contrast_index], q_sum, k_sum, nulls])
        saved = nnsight.save(saved)
    return saved
