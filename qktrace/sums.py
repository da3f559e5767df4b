"""Contrastive covariance sums, reduced inside the trace where the model runs.

For every labelled (query, key) pair, `reduce` adds q k^T (and q, k, for optional centering)
to the sums of the pair's group: a feature value (e.g. "fruit") and a contrast ("positive" or
"negative"). The sums are computed in float64 inside the nnsight trace, so a batch sends back
[heads, groups, d_head, d_head] numbers whatever its number of prompts and tokens; batches
are added here in float64. Memory is O(heads x features x d_head^2), independent of the number
of prompts. Pass `out=` to keep the running sums on disk after every batch: a rerun of the same
call resumes after the last batch that was saved.

The result is the "covariance sums" Dataset of `qktrace.covariance` (`qk_sum`, `q_sum`,
`k_sum`, `count` over head, feature, contrast), ready for `qktrace.decompose`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nnsight
import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from . import ops
from .models import Head, Model, parse_heads
from .qk import Positions, Prompt, _by_layer, _given_order, fingerprint, plan_batches
from .remote import with_retries

CONTRASTS = ("positive", "negative")
Label = tuple[str, str] | None


def _groups(labels: Sequence[Sequence[Label]]) -> list[str]:
    features: list[str] = []
    for row in labels:
        for label in row:
            if label is None:
                continue
            feature, contrast = label
            if contrast not in CONTRASTS:
                raise ValueError(
                    f"Unknown contrast {contrast!r} in label {label!r}: use 'positive' or 'negative'."
                )
            if feature not in features:
                features.append(str(feature))
    if not features:
        raise ValueError("No labelled keys: give at least one key a (feature, contrast) label.")
    return features


def _onehot(labels: Sequence[Sequence[Label]], features: list[str], width: int) -> torch.Tensor:
    onehot = torch.zeros((len(labels), width, 2 * len(features)), dtype=torch.float64)
    for b, row in enumerate(labels):
        for j, label in enumerate(row):
            if label is not None:
                onehot[b, j, 2 * features.index(label[0]) + CONTRASTS.index(label[1])] = 1.0
    return onehot


def _reduce_batch(
    model: Model,
    enc: Any,
    heads: list[Head],
    query_index: torch.Tensor,
    key_index: torch.Tensor,
    onehot: torch.Tensor,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One trace: per-head, per-group sums (qk [h, G, d, d], q [h, G, d], k [h, G, d]), and
    per prompt whether all its captured q and k were finite ([batch] bool)."""
    layers = _by_layer(model, heads)
    plan = [
        (layer, [h.head for h in hs], [model.kv_head(h.head) for h in hs])
        for layer, hs in layers.items()
    ]
    calls = {layer: model.attention_call(layer) for layer in layers}
    with torch.inference_mode(), model.trace(enc.inputs):
        saved = nnsight.save([])
        for layer, q_heads, kv_heads in plan:
            args, _ = calls[layer].inputs
            q_sel = ops.gather_heads(args[1], q_heads, query_index)[:, :, 0]
            k_sel = ops.gather_heads(args[2], kv_heads, key_index)
            finite = ops.finite_rows(q_sel) & ops.finite_rows(k_sel)
            saved.append((*ops.pair_sums(q_sel, k_sel, onehot), finite))
        nnsight.save(saved)
    order = _given_order(layers, heads)
    qk, q, k = (
        np.concatenate([s[i].cpu().numpy() for s in saved], axis=0)[order] for i in range(3)
    )
    finite = np.logical_and.reduce([s[3].cpu().numpy() for s in saved])
    return qk, q, k, finite


def reduce(
    model: Model,
    prompts: Sequence[Prompt],
    heads: str | Sequence[Any],
    labels: Sequence[Sequence[Label]],
    *,
    keys: Positions,
    query: Positions = "last",
    batch_size: int = 16,
    add_special_tokens: bool = True,
    out: str | Path | None = None,
    progress: bool = True,
) -> xr.Dataset:
    """Sum q k^T over labelled (query, key) pairs inside the trace; return float64 sums.

    Parameters
    ----------
    prompts, heads, query, keys, add_special_tokens
        As for `qktrace.qk`; `query` must name one position per prompt.
    labels
        Per prompt, per key slot: `(feature, "positive" | "negative")`, or None to skip the key.
    out
        A zarr path for the running sums. A rerun with the same arguments resumes after the last
        saved batch; a run with different arguments refuses it (name another path).

    Returns
    -------
    xr.Dataset: `qk_sum` (head, feature, contrast, dq, dk), `q_sum` (…, dq), `k_sum` (…, dk) and
    `pair_count` (head, feature, contrast); attrs `n_prompts`.
    """
    heads = parse_heads(heads)
    model.check_heads(heads)
    if len(prompts) == 0:
        raise ValueError("No prompts given: pass a non-empty list of strings (or token-id lists).")
    if len(labels) != len(prompts):
        raise ValueError(
            f"labels has {len(labels)} rows for {len(prompts)} prompts: give one row per prompt."
        )
    features = _groups(labels)
    d = model.d_head
    shape = (len(heads), len(features), 2)
    qk_sum = np.zeros((*shape, d, d))
    q_sum = np.zeros((*shape, d))
    k_sum = np.zeros((*shape, d))
    count = np.zeros(shape, dtype=np.int64)
    for row in labels:
        for label in row:
            if label is not None:
                count[:, features.index(label[0]), CONTRASTS.index(label[1])] += 1
    plan = plan_batches(model, prompts, query, keys, batch_size, add_special_tokens)
    for batch in plan:
        if batch.query_slots.shape[1] != 1:
            raise ValueError("reduce takes one query position per prompt (e.g. query='last').")
        for i, slots in enumerate(batch.key_slots):
            row = labels[batch.start + i]
            n_keys = int((slots >= 0).sum())
            if len(row) != n_keys:
                raise ValueError(
                    f"Prompt {batch.start + i} has {n_keys} key positions but {len(row)} labels: "
                    "give one label (or None) per key position."
                )
    params = {
        "model": model.name,
        "heads": [h.label for h in heads],
        "features": features,
        "n_prompts": len(prompts),
        "batch_size": batch_size,
        "prompts_sha256": fingerprint(plan, [list(row) for row in labels]),
    }
    done, state = _resume(out, params)
    if state is not None:
        qk_sum, q_sum, k_sum = (state[v].values for v in ("qk_sum", "q_sum", "k_sum"))

    bar = tqdm(total=len(prompts), initial=done, desc="reduce", unit="prompt", disable=not progress)
    for batch in plan:
        start, n = batch.start, len(batch.texts)
        if start < done:
            continue
        enc, q_index, k_index = batch.encoded, batch.query_index, batch.key_index
        batch_labels = labels[start : start + n]
        onehot = _onehot(batch_labels, features, k_index.shape[1])
        qk, q, k, finite = with_retries(
            _reduce_batch,
            model,
            enc,
            heads,
            q_index,
            k_index,
            onehot,
            what=f"prompts {start}..{start + n - 1}",
            resume_hint=(
                f"The sums of prompts 0..{start - 1} are saved in {out}: rerun the same call to resume."
                if out is not None
                else ""
            ),
        )
        if not finite.all() or not np.isfinite(qk).all():
            bad = start + int(np.argmin(finite)) if not finite.all() else None
            where = f"prompt {bad}" if bad is not None else f"prompts {start}..{start + n - 1}"
            raise FloatingPointError(
                f"Captured q/k have NaN/inf for {where}, so the q k^T sums would be NaN. The "
                "model overflowed on it: run in float32 or bfloat16 instead of float16, or drop "
                "that prompt."
                + (
                    f" The sums of prompts 0..{start - 1} are saved in {out}."
                    if start and out is not None
                    else ""
                )
            )
        shape_g = (len(heads), len(features), 2)
        qk_sum += qk.reshape(*shape_g, d, d)
        q_sum += q.reshape(*shape_g, d)
        k_sum += k.reshape(*shape_g, d)
        done = start + n
        if out is not None:
            _checkpoint(
                out,
                _sums_dataset(model, heads, features, qk_sum, q_sum, k_sum, count, done, params),
            )
        bar.update(n)
    bar.close()
    return _sums_dataset(model, heads, features, qk_sum, q_sum, k_sum, count, done, params)


def _sums_dataset(
    model: Model,
    heads: list[Head],
    features: list[str],
    qk_sum: np.ndarray,
    q_sum: np.ndarray,
    k_sum: np.ndarray,
    count: np.ndarray,
    done: int,
    params: dict[str, Any],
) -> xr.Dataset:
    from .qk import _head_coords

    dims = ("head", "feature", "contrast")
    return xr.Dataset(
        {
            "qk_sum": ((*dims, "dq", "dk"), qk_sum.copy()),
            "q_sum": ((*dims, "dq"), q_sum.copy()),
            "k_sum": ((*dims, "dk"), k_sum.copy()),
            "pair_count": (dims, count.copy()),
        },
        coords={**_head_coords(model, heads), "feature": features, "contrast": list(CONTRASTS)},
        attrs={
            "model": model.name,
            "remote": model.remote_label,
            "n_prompts": done,
            "params": params,
        },
    )


def _resume(out: str | Path | None, params: dict[str, Any]) -> tuple[int, xr.Dataset | None]:
    """(prompts already summed, stored sums) from a previous run's checkpoint at `out`."""
    if out is None or not Path(out).exists():
        return 0, None
    if Path(out).is_dir() and not any(Path(out).iterdir()):
        return 0, None  # an empty directory made beforehand
    import json

    from . import store

    batches = (Path(out) / store.MANIFEST).is_file()  # a capture (BatchWriter) store
    state = None if batches else store.open(out)
    stored = None if state is None else state.attrs.get("params")
    if isinstance(stored, str):
        stored = json.loads(stored)
    if state is None or "qk_sum" not in state or not isinstance(stored, dict):
        what = "batches of a capture" if state is None else f"variables {sorted(state.data_vars)}"
        raise ValueError(
            f"{out} is not a checkpoint of qktrace.reduce (it holds {what}, written by something "
            "else); pass another out= path (CLI: another --out)."
        )
    if stored != params:
        keys = [k for k in dict.fromkeys([*stored, *params]) if stored.get(k) != params.get(k)]
        diff = store._diff_lines(stored, params, "", "stored", "now")
        raise ValueError(
            f"{out} holds sums from a run with different parameters ({', '.join(keys)}):\n"
            f"{diff}\n"
            "Resume only with the same arguments (model, heads, prompts, positions, labels, "
            "batch_size). To start over, pass a new out= path, or delete "
            f"{out} (CLI: a new --out, or --overwrite)."
        )
    return int(state.attrs["n_prompts"]), state.load()


def _checkpoint(out: str | Path, sums: xr.Dataset) -> None:
    import json

    from . import store

    sums = sums.assign_attrs(params=json.dumps(sums.attrs["params"]))
    store.save(sums, out, overwrite=True)
