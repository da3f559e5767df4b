"""Contrastive covariance sums, reduced inside the trace where the model runs.

For every labelled (query, key) pair, `reduce` adds q k^T (and q, k, for optional centering)
to the sums of the pair's group: a feature value (e.g. "fruit") and a contrast ("positive" or
"negative"). The sums are computed in float64 inside the nnsight trace, so a batch sends back
[heads, groups, d_head, d_head] numbers whatever its number of prompts and tokens; batches
are added here in float64. Memory is O(heads x features x d_head^2), independent of the number
of prompts. Pass `out=` to keep the running sums on disk (every `CHECKPOINT_EVERY_S` seconds,
and when the call ends or stops with an error or Ctrl-C): a rerun of the same call resumes
after the last request that was saved.

Round trips and bytes. One batch is one trace, which with `remote=True` is one request that
returns heads x 2 features x (d_head^2 + 2 d_head) float64 numbers. `batches_per_request=K`
runs K traces in one nnsight session and adds their sums on the model side, so a request returns
one set of sums for K batches; `delta=True` sums ΔC = C+ - C- directly (pairs weighted ±1/n)
and returns it as float32, a quarter of the bytes of both contrasts' float64 sums (float16 with
`delta_dtype="float16"`: an eighth). Labels travel as one int8 group index per key.

The result is the "covariance sums" Dataset of `qktrace.verbs.decompose` (`qk_sum`, `q_sum`,
`k_sum`, `pair_count` over head, feature, contrast), ready for `qktrace.decompose`; with
`delta=True` it holds `delta_c` (head, feature, dq, dk) instead of `qk_sum`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nnsight
import numpy as np
import torch
import xarray as xr

from qktrace.core import checks, ops
from qktrace.core.errors import BadArgument
from qktrace.model.loading import Head, Model, check_model, parse_heads
from qktrace.run.batching import (
    BATCH_SIZE,
    Batch,
    Check,
    Plan,
    Positions,
    PromptInput,
    by_layer,
    given_order,
    head_coords,
    plan_run,
    run,
)
from qktrace.store.locks import one_writer
from qktrace.verbs.decompose import CONTRASTS

# a key's label: (feature, "positive" | "negative"), or None for a key in no pair
Label = tuple[str, str] | None
# Batches per NDIF request by default: 16x fewer round trips and returned sums, while a failed
# request loses (and a resume repeats) at most 16 batches.
REMOTE_BATCHES_PER_REQUEST = 16
# A study's reduce on a remote model (`study_options`): 64 batches a request, so a study of up
# to 64 x batch_size prompts sums its subspace prompts in one round trip, and a failed request
# still loses (and a resume repeats) a bounded number of batches.
STUDY_REMOTE_BATCHES_PER_REQUEST = 64
# `reduce(out=)` writes its running sums at most this often (and when it stops, for whatever
# reason Python sees): a checkpoint costs about as much as a batch of a small model, so writing
# one per batch doubled the organism's reduce. A kill that Python cannot see (SIGKILL, power
# loss) loses at most the batches of the last CHECKPOINT_EVERY_S seconds.
CHECKPOINT_EVERY_S = 30.0
# attrs["partial"] of a checkpoint that holds the sums of the first prompts only
PARTIAL = (
    "partial ({done} of {total} prompts): `pair_count` and `n_prompts` count the {done} summed; "
    "rerun the same call (CLI: the same command) to resume and sum the rest"
)


def _groups(labels: Sequence[Sequence[Label]]) -> list[str]:
    features: list[str] = []
    for row in labels:
        for label in row:
            if label is None:
                continue
            feature, contrast = label
            if contrast not in CONTRASTS:
                raise BadArgument(
                    f"Unknown contrast {contrast!r} in label {label!r}: use 'positive' or 'negative'."
                )
            if feature not in features:
                features.append(str(feature))
    if not features:
        raise BadArgument("No labelled keys: give at least one key a (feature, contrast) label.")
    return features


def _label_index(
    labels: Sequence[Sequence[Label]], features: list[str], width: int
) -> torch.Tensor:
    """Group index 2 * feature + contrast per key slot ([batch, width], -1 = no pair), int8 or int16."""
    dtype = torch.int8 if 2 * len(features) <= 127 else torch.int16
    index = torch.full((len(labels), width), -1, dtype=dtype)
    for b, row in enumerate(labels):
        for j, label in enumerate(row):
            if label is not None:
                index[b, j] = 2 * features.index(label[0]) + CONTRASTS.index(label[1])
    return index


def _tables(count: np.ndarray, delta: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair-weight tables [groups, columns] for the q k^T sums and for the q and k sums.

    Plain sums: one column per group (identity). ΔC: one column per feature, with weight
    +1/n_positive and -1/n_negative, so the weighted sum over pairs is ΔC = C+ - C- itself.
    """
    n_features = count.shape[1]
    groups = torch.eye(2 * n_features, dtype=torch.float64)
    if not delta:
        return groups, groups
    table = torch.zeros((2 * n_features, n_features), dtype=torch.float64)
    for f in range(n_features):
        table[2 * f, f] = 1.0 / count[0, f, 0]
        table[2 * f + 1, f] = -1.0 / count[0, f, 1]
    return table, groups


Work = tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor, torch.Tensor]
# one layer's heads in a trace: (layer, query heads, the key heads they read)
LayerPlan = list[tuple[int, list[int], list[int]]]


def _reduce_batch(
    model: Model,
    work: list[Work],
    heads: list[Head],
    qk_table: torch.Tensor,
    vector_table: torch.Tensor,
    wire: torch.dtype | None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One request: the sums over every batch in `work` (input, query index, key index, labels).

    One batch is one trace; several are one nnsight session whose traces add their sums on the
    model side, so one request returns one set of sums. `wire` None returns float64 sums;
    a dtype (ΔC) returns q k^T sums scaled per matrix and cast to it (`ops.scaled`), and q and
    k sums as float32. Returns (qk [h, G, d, d], its scales [h, G, 1, 1] (ones without `wire`),
    q and k [h, 2 x features, d], per prompt whether all its q and k were finite), each in
    the dtype it travelled in.
    """
    layers = by_layer(model, heads)
    plan = [
        (layer, [h.head for h in hs], [model.kv_head(h.head) for h in hs])
        for layer, hs in layers.items()
    ]
    reads = {layer: model.attention_inputs(layer) for layer in layers}
    tables = (qk_table, vector_table)
    if len(work) == 1:
        saved = _trace_sums(model, plan, reads, work[0], tables, wire)
    else:
        saved = _session_sums(model, plan, reads, work, tables, wire)
    return _gathered(saved, given_order(layers, heads))


def _trace_sums(
    model: Model,
    plan: LayerPlan,
    reads: dict[int, ops.AttentionInputs],
    work: Work,
    tables: tuple[torch.Tensor, torch.Tensor],
    wire: torch.dtype | None,
) -> list[list[Any]]:
    """One batch in one trace: per layer [qk, its scale, q, k, finite] (`_reduce_batch`)."""
    inputs, query_index, key_index, labels = work
    qk_table, vector_table = tables
    with torch.inference_mode(), model.trace(inputs) as tracer:
        saved = nnsight.save([])
        for layer, q_heads, kv_heads in plan:
            q_all, k_all, _ = reads[layer].read()
            qk, q, k, finite = ops.labelled_sums(
                q_all, k_all, q_heads, kv_heads, query_index, key_index, labels,
                qk_table, vector_table,
            )  # fmt: skip
            if wire is None:
                saved.append([qk, torch.ones((*qk.shape[:2], 1, 1)), q, k, finite])
            else:
                saved.append([*ops.scaled(qk, wire), q.float(), k.float(), finite])
        nnsight.save(saved)
        tracer.stop()  # nothing after the last layer read is needed
    return saved


def _session_sums(
    model: Model,
    plan: LayerPlan,
    reads: dict[int, ops.AttentionInputs],
    work: list[Work],
    tables: tuple[torch.Tensor, torch.Tensor],
    wire: torch.dtype | None,
) -> list[list[Any]]:
    """Several batches in one session, their sums added on the model side (`_reduce_batch`).

    Every name used in a session travels with the request by value, so nothing used in it may
    hold a big value before it starts: the accumulator `totals` is made inside it (declared
    here for the type checker only; the session body holds plain torch and `ops` alone).
    """
    lm = model.lm
    qk_table, vector_table = tables
    totals: list[list[Any]]
    with torch.inference_mode(), model.session():
        totals = []
        for inputs, query_index, key_index, labels in work:
            with lm.trace(inputs) as tracer:
                for i, (layer, q_heads, kv_heads) in enumerate(plan):
                    q_all, k_all, _ = reads[layer].read()
                    qk, q, k, finite = ops.labelled_sums(
                        q_all, k_all, q_heads, kv_heads, query_index, key_index,
                        labels, qk_table, vector_table,
                    )  # fmt: skip
                    if i == len(totals):
                        totals.append([qk, q, k, [finite]])
                    else:
                        t = totals[i]
                        totals[i] = [t[0] + qk, t[1] + q, t[2] + k, [*t[3], finite]]
                tracer.stop()
        saved = nnsight.save(
            [
                [t[0], torch.ones((*t[0].shape[:2], 1, 1)), t[1], t[2], torch.cat(t[3])]
                if wire is None
                else [*ops.scaled(t[0], wire), t[1].float(), t[2].float(), torch.cat(t[3])]
                for t in totals
            ]
        )
    return saved


def _gathered(
    saved: list[list[Any]], order: list[int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """The per-layer sums of a request as (qk, scale, q, k) over heads in the given `order`,
    and per prompt whether its q and k were all finite."""
    qk, scale, q, k = (
        np.concatenate([s[i].cpu().numpy() for s in saved], axis=0)[order] for i in range(4)
    )
    finite = np.logical_and.reduce([s[4].cpu().numpy() for s in saved])
    return qk, scale, q, k, finite


def study_options(model: Model) -> dict[str, Any]:
    """The `reduce` options of the studies: none locally (the store keeps C+ and C- sums,
    `qk_sum`); on a remote model ΔC only (`delta=True`, float32 on the wire, a quarter of the
    float64 C+ and C- bytes) and `STUDY_REMOTE_BATCHES_PER_REQUEST` batches a request. ΔC is
    then what the SVD reads, as locally, to float32 rounding (`tests/test_pipeline.py`)."""
    if not model.remote:
        return {}
    return {
        "delta": True,
        "delta_dtype": "float32",
        "batches_per_request": STUDY_REMOTE_BATCHES_PER_REQUEST,
    }


def stored_sums(sums: xr.Dataset) -> list[str]:
    """The sums variables a study's store keeps beside its subspaces: `qk_sum`, `q_sum`,
    `k_sum`, less `qk_sum` when the sums are ΔC only (`delta=True`; decompose adds `delta_c`)."""
    return [name for name in ("qk_sum", "q_sum", "k_sum") if name in sums]


def _check_labels(labels: Sequence[Sequence[Label]]) -> Check:
    """A `plan_run` check: every prompt gives one label (or None) per key position."""

    def check(
        start: int, lengths: list[int], query: list[list[int]], keys: list[list[int]]
    ) -> None:
        for i, (q_pos, k_pos) in enumerate(zip(query, keys, strict=True)):
            if len(q_pos) != 1:
                raise BadArgument("reduce takes one query position per prompt (e.g. query='last').")
            row = labels[start + i]
            if len(row) != len(k_pos):
                raise BadArgument(
                    f"Prompt {start + i} has {len(k_pos)} key positions but {len(row)} labels: "
                    "give one label (or None) per key position."
                )

    return check


@one_writer()
def reduce(
    model: Model,
    prompts: Sequence[PromptInput],
    heads: str | Sequence[Any],
    labels: Sequence[Sequence[Label]],
    *,
    query: Positions = "last",
    keys: Positions,
    batch_size: int = BATCH_SIZE,
    add_special_tokens: bool = True,
    out: str | Path | None = None,
    progress: bool = True,
    batches_per_request: int | None = None,
    delta: bool = False,
    delta_dtype: str = "float32",
) -> xr.Dataset:
    """Sum q k^T over labelled (query, key) pairs inside the trace; return float64 sums.

    Parameters
    ----------
    prompts, heads, query, keys, add_special_tokens
        As for `qktrace.verbs.capture`; `query` must name one position per prompt.
    labels
        Per prompt, per key slot: `(feature, "positive" | "negative")`, or None to skip the key.
    batch_size
        Prompts per trace (`qktrace.run.batching.BATCH_SIZE`). It changes the sums only to
        float64 rounding, but it is one of the parameters a checkpoint records (`out=`), so a
        resume needs the same one.
    out
        A zarr path for the running sums, saved at most every `CHECKPOINT_EVERY_S` (30) seconds
        and when the call ends, fails or is interrupted (a hard kill, e.g. SIGKILL, loses the
        requests since the last save). A rerun with the same arguments resumes after the last
        saved request; a run with different arguments refuses
        it (name another path).
    batches_per_request
        Batches run as one request: one nnsight session whose traces add their sums on the
        model side, so one round trip returns one set of sums (0 = all batches in one request).
        Cuts round trips and bytes returned with ``remote=True``; locally it changes little. A
        request carries (and holds in memory) the inputs of all its batches. Default: 1 for a
        local model, `REMOTE_BATCHES_PER_REQUEST` (16) for ``remote=True`` or ``"local"``.
    delta
        Sum ΔC = C+ - C- directly (each pair weighted ±1/n of its feature and contrast, the
        counts being known from `labels`); the model side returns it, and the q and k sums, as
        float32: a quarter of the bytes of both contrasts' float64 sums. The result then has
        `delta_c` instead of `qk_sum`; everything is still accumulated in float64.
    delta_dtype
        "float32" (default) or "float16": the dtype ΔC travels in, each (head, feature) matrix
        scaled by its largest entry. float16 halves the bytes again; every entry then keeps a
        relative error below 2^-11 (5e-4) of the matrix's largest entry.

    Returns
    -------
    xr.Dataset: `qk_sum` (head, feature, contrast, dq, dk) (or, with `delta`, `delta_c`
    (head, feature, dq, dk), uncentered ΔC), `q_sum` (…, contrast, dq), `k_sum` (…, contrast,
    dk), all float64, and `pair_count` (head, feature, contrast); attrs `n_prompts`.
    """
    chosen = _check_arguments(
        model, prompts, heads, labels, progress, delta, delta_dtype, out, batches_per_request
    )
    per_request = _batches_per_request(model, batches_per_request)
    wire = _wire(delta, delta_dtype)
    features = _groups(labels)
    per_prompt = _pair_counts(labels, features)
    count = np.broadcast_to(per_prompt.sum(axis=0), (len(chosen), len(features), 2)).copy()
    if delta:
        _check_delta_counts(count, features)
    plan = plan_run(
        model, prompts, query, keys, batch_size, add_special_tokens,
        extra=labels, check=_check_labels(labels),
    )  # fmt: skip
    params = _params(model, chosen, features, len(prompts), batch_size, delta, delta_dtype, plan)
    sums = _RunningSums(model, chosen, features, per_prompt, params, out, delta)
    qk_table, vector_table = _tables(count, delta)

    def step(request: list[Batch]) -> tuple[np.ndarray, ...]:
        work = _work(request, labels, features)
        return _reduce_batch(model, work, chosen, qk_table, vector_table, wire)

    try:
        for request, (qk, scale, q, k, finite) in run(
            plan,
            step,
            desc="reduce",
            resume_hint=lambda start: _resume_hint(out, start),
            progress=progress,
            done=sums.done,
            batches_per_request=per_request,
        ):
            sums.add(request, qk, scale, q, k, finite)
    finally:  # finished, or stopped by an error or Ctrl-C: keep every summed request
        sums.save()
    return sums.dataset(count)


def _check_arguments(
    model: Model,
    prompts: Sequence[PromptInput],
    heads: str | Sequence[Any],
    labels: Sequence[Sequence[Label]],
    progress: bool,
    delta: bool,
    delta_dtype: str,
    out: str | Path | None,
    batches_per_request: int | None,
) -> list[Head]:
    """`reduce`'s arguments checked before any prompt is tokenized; returns the parsed heads."""
    check_model("model", model)
    checks.flag("progress", progress)
    checks.flag("delta", delta)
    checks.choice("delta_dtype", delta_dtype, ("float32", "float64", "bfloat16", "float16"))
    checks.path("out", out, optional=True)
    if batches_per_request is not None:
        checks.integer("batches_per_request", batches_per_request, low=0, example="4")
    chosen = parse_heads(heads)
    model.check_heads(chosen)
    checks.prompts("prompts", prompts)
    if isinstance(labels, str) or not isinstance(labels, Sequence):
        raise checks.BadArgumentType(
            f"labels is a {type(labels).__name__}; pass one list per prompt of "
            "(feature, 'positive' | 'negative') pairs or None."
        )
    if len(labels) != len(prompts):
        raise BadArgument(
            f"labels has {len(labels)} rows for {len(prompts)} prompts: give one row per prompt."
        )
    return chosen


def _params(
    model: Model,
    heads: list[Head],
    features: list[str],
    n_prompts: int,
    batch_size: int,
    delta: bool,
    delta_dtype: str,
    plan: Plan,
) -> dict[str, Any]:
    """What a `reduce` result records it was made from, and a resume must match."""
    return {
        "model": model.name,
        "heads": [h.label for h in heads],
        "features": features,
        "n_prompts": n_prompts,
        "batch_size": batch_size,
        "delta": delta,
        **({"delta_dtype": delta_dtype} if delta else {}),
        "prompts_sha256": plan.sha256,
    }


def _batches_per_request(model: Model, given: int | None) -> int:
    """Batches per request: as given, else `REMOTE_BATCHES_PER_REQUEST` remotely and 1 here."""
    per_request = given
    if per_request is None:
        per_request = REMOTE_BATCHES_PER_REQUEST if model.remote else 1
    if per_request < 0:
        raise BadArgument(
            f"batches_per_request={per_request} is negative: pass 1 (one trace per "
            "request), more, or 0 (all batches in one request)."
        )
    return per_request


_WIRES = {"float32": torch.float32, "float16": torch.float16}


def _wire(delta: bool, delta_dtype: str) -> torch.dtype | None:
    """The dtype ΔC travels in (None: float64 C+ and C- sums, without `delta`)."""
    if delta_dtype not in _WIRES:
        raise BadArgument(f"delta_dtype={delta_dtype!r}: use 'float32' or 'float16'.")
    return _WIRES[delta_dtype] if delta else None


def _pair_counts(labels: Sequence[Sequence[Label]], features: list[str]) -> np.ndarray:
    """Pairs per prompt, feature and contrast [prompt, feature, contrast], so a checkpoint
    counts exactly the prompts it has summed."""
    per_prompt = np.zeros((len(labels), len(features), 2), dtype=np.int64)
    for i, row in enumerate(labels):
        for label in row:
            if label is not None:
                per_prompt[i, features.index(label[0]), CONTRASTS.index(label[1])] += 1
    return per_prompt


def _work(
    request: list[Batch], labels: Sequence[Sequence[Label]], features: list[str]
) -> list[Work]:
    """What `_reduce_batch` runs for a request: per batch its inputs, indices and group labels."""
    return [
        (
            b.encoded.inputs,
            b.query_index,
            b.key_index,
            _label_index(labels[b.start : b.start + len(b.texts)], features, b.key_index.shape[1]),
        )
        for b in request
    ]


class _RunningSums:
    """A `reduce` call's running float64 sums, resumed from and checkpointed to `out`.

    `state` (prompts summed, qk, q and k sums) is replaced whole, so an interrupt never sees
    half an update; `save` writes it when it holds prompts the last checkpoint lacks.
    """

    def __init__(
        self,
        model: Model,
        heads: list[Head],
        features: list[str],
        per_prompt: np.ndarray,
        params: dict[str, Any],
        out: str | Path | None,
        delta: bool,
    ) -> None:
        self.model, self.heads, self.features, self.params = model, heads, features, params
        self.per_prompt, self.out = per_prompt, out
        d = model.d_head
        self.shape = shape = (len(heads), len(features), 2)
        qk_sum = np.zeros((len(heads), len(features), d, d) if delta else (*shape, d, d))
        q_sum = np.zeros((*shape, d))
        k_sum = np.zeros((*shape, d))
        done, resumed = _resume(out, params)
        if resumed is not None:
            qk_sum, q_sum, k_sum = (
                resumed[v].values for v in ("delta_c" if delta else "qk_sum", "q_sum", "k_sum")
            )
        self.state = (done, qk_sum, q_sum, k_sum)
        self.saved, self.last_save = done, time.monotonic()

    @property
    def done(self) -> int:
        """Prompts summed so far (resumed ones included)."""
        return self.state[0]

    def add(
        self,
        request: list[Batch],
        qk: np.ndarray,
        scale: np.ndarray,
        q: np.ndarray,
        k: np.ndarray,
        finite: np.ndarray,
    ) -> None:
        """Add one request's sums (`_reduce_batch`); checkpoint if the last is old enough."""
        start = request[0].start
        end = request[-1].start + len(request[-1].texts)
        _check_finite(qk, finite, start, end, self.out)
        _, qk_sum, q_sum, k_sum = self.state
        self.state = (
            end,
            qk_sum + (qk.astype(np.float64) * scale).reshape(qk_sum.shape),
            q_sum + q.reshape(q_sum.shape),
            k_sum + k.reshape(k_sum.shape),
        )
        if time.monotonic() - self.last_save >= CHECKPOINT_EVERY_S:
            self.save()

    def save(self) -> None:
        """Write the sums to `out` (if any) when they hold prompts the last checkpoint lacks."""
        summed_to = self.state[0]
        if self.out is None or summed_to == self.saved:
            return
        _checkpoint(self.out, self.dataset())
        self.saved, self.last_save = summed_to, time.monotonic()

    def dataset(self, count: np.ndarray | None = None) -> xr.Dataset:
        """The sums as the "covariance sums" Dataset; `count` defaults to the summed prompts'."""
        done, qk_sum, q_sum, k_sum = self.state
        if count is None:
            count = np.broadcast_to(self.per_prompt[:done].sum(axis=0), self.shape)
        return _sums_dataset(
            self.model, self.heads, self.features, qk_sum, q_sum, k_sum, count, done, self.params
        )


def _check_finite(
    qk: np.ndarray, finite: np.ndarray, start: int, end: int, out: str | Path | None
) -> None:
    """Refuse a request whose q or k overflowed (its q k^T sums would be NaN)."""
    if finite.all() and np.isfinite(qk).all():
        return
    bad = start + int(np.argmin(finite)) if not finite.all() else None
    where = f"prompt {bad}" if bad is not None else f"prompts {start}..{end - 1}"
    raise FloatingPointError(
        f"Captured q/k have NaN/inf for {where}, so the q k^T sums would be NaN. The "
        "model overflowed on it: run in float32 or bfloat16 instead of float16, or "
        "drop that prompt."
        + (
            f" The sums of prompts 0..{start - 1} are saved in {out}."
            if start and out is not None
            else ""
        )
    )


def _check_delta_counts(count: np.ndarray, features: list[str]) -> None:
    for f, feature in enumerate(features):
        for c, contrast in enumerate(CONTRASTS):
            if count[0, f, c] == 0:
                raise BadArgument(
                    f"No {contrast} pairs for feature {feature!r}: delta=True sums ΔC = C+ - C-, "
                    f"which needs both kinds. Add {contrast} pairs for it (check its labels), or "
                    "drop its labels."
                )


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
    from qktrace.store import provenance

    dims = ("head", "feature", "contrast")
    qk_dims: tuple[str, ...]
    if qk_sum.ndim == 4:  # delta: ΔC per head and feature
        qk_name, qk_dims = "delta_c", ("head", "feature", "dq", "dk")
    else:
        qk_name, qk_dims = "qk_sum", (*dims, "dq", "dk")
    return xr.Dataset(
        {
            qk_name: (qk_dims, qk_sum.copy()),
            "q_sum": ((*dims, "dq"), q_sum.copy()),
            "k_sum": ((*dims, "dk"), k_sum.copy()),
            "pair_count": (dims, count.copy()),
        },
        coords={**head_coords(model, heads), "feature": features, "contrast": list(CONTRASTS)},
        attrs={
            **provenance("reduce", params, model=model),
            "n_prompts": done,
            **({"partial": PARTIAL.format(done=done, total=params["n_prompts"])}
               if done < params["n_prompts"] else {}),
        },
    )  # fmt: skip


def _resume_hint(out: str | Path | None, start: int) -> str:
    """What a stopped run tells the user about its saved sums and how to go on."""
    if out is None:
        return "Pass out=PATH (CLI: studies do) to keep finished requests across a rerun."
    saved = (
        f"The sums of prompts 0..{start - 1} are saved in {out}"
        if start
        else "Nothing is saved yet"
    )
    return f"{saved}: rerun the same call (CLI: the same command) to resume."


def _resume(out: str | Path | None, params: dict[str, Any]) -> tuple[int, xr.Dataset | None]:
    """(prompts already summed, stored sums) from a previous run's checkpoint at `out`."""
    if out is None or not Path(out).exists():
        return 0, None
    if Path(out).is_dir() and not any(Path(out).iterdir()):
        return 0, None  # an empty directory made beforehand
    import json

    from qktrace.store import check_same_run
    from qktrace.store import io as store
    from qktrace.store.files import MANIFEST

    batches = (Path(out) / MANIFEST).is_file()  # a capture (BatchWriter) store
    state = None if batches else store.open(out, checksums=True)
    stored = None if state is None else state.attrs.get("params")
    if isinstance(stored, str):
        stored = json.loads(stored)
    sums = state is not None and ("qk_sum" in state or "delta_c" in state)
    if state is None or not sums or not isinstance(stored, dict):
        what = (
            "batches of a capture"
            if state is None
            else f"variables {sorted(map(str, state.data_vars))}"
        )
        raise BadArgument(
            f"{out} is not a checkpoint of qktrace.reduce (it holds {what}, written by something "
            "else); pass another out= path (CLI: another --out)."
        )
    check_same_run(out, stored, params, what="the sums")
    return int(state.attrs["n_prompts"]), state.load()


def _checkpoint(out: str | Path, sums: xr.Dataset) -> None:
    from qktrace.store import io as store

    store.save(sums, out, overwrite=True)
