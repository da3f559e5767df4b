"""Find the heads whose attention goes to the answer, so a study can pick heads on a new model.

The mechanism
-------------
The paper names its heads for Llama-3.1-8B-Instruct; another model needs its own. A head that
retrieves the answer attends, from the query (the last token), to the answer's key more than to
the other candidates. `find_heads` scores every head of the chosen layers on labelled prompts,
in ONE nnsight trace per batch: at each layer it reads the inputs of the attention function
(post-RoPE q and k, as the softmax sees them), computes all heads' attention rows of the query
with the model's own mask, scaling and soft cap (`qktrace.core.ops.attention_rows`), and saves only
the weights at the candidate keys, [batch, heads, keys] per layer. So a scan of every head of
an 8B model on NDIF sends back a few kilobytes per batch.

Scores per head, averaged over prompts: ``answer_attention`` (attention on the answer key,
over the whole row), ``answer_share`` (that attention as a share of the attention on the
candidate keys, which discounts attention sinks) and ``answer_argmax`` (the fraction of prompts
where the answer gets the most attention among the candidates).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import nnsight
import numpy as np
import torch
import xarray as xr

from qktrace.core import checks, ops
from qktrace.core.errors import BadArgument, BadArgumentType
from qktrace.model.loading import Head, Model, check_model
from qktrace.run.batching import (
    BATCH_SIZE,
    Batch,
    Check,
    Positions,
    PromptInput,
    head_coords,
    plan_run,
    resolve_positions,
    run,
)

__all__ = ["find_heads", "rank_heads"]

Score = Literal["answer_attention", "answer_share", "answer_argmax"]
SCORES = ("answer_attention", "answer_share", "answer_argmax")


def find_heads(
    model: Model,
    prompts: Sequence[PromptInput],
    answer: Sequence[int],
    *,
    query: Positions = "last",
    keys: Positions,
    layers: Sequence[int] | None = None,
    top: int | None = 5,
    by: Score = "answer_attention",
    batch_size: int = BATCH_SIZE,
    add_special_tokens: bool = True,
    progress: bool = True,
) -> xr.Dataset:
    """Rank heads by how much their attention from the query goes to the answer key.

    Parameters
    ----------
    model
        From `qktrace.load`; local, `remote="local"` or NDIF.
    prompts
        Strings (tokenized here) or token-id lists.
    answer
        One token position per prompt (negative counts from the end): the answer's key, a
        *position in the prompt* (not an index into the candidates, as the `answer` of
        `qktrace.verbs.answers.intervene_answers` is).
    query
        The query position: "last" or one position per prompt.
    keys
        Candidate key positions per prompt (a list per prompt, or "all"); must include the
        answer. The argmax and the share are taken among them.
    layers
        The layers to scan; default all.
    top
        Keep the best `top` heads; None keeps all, sorted.
    by
        The score to sort by: "answer_attention", "answer_share" or "answer_argmax" (ties are
        broken by the other scores in that order).
    batch_size
        Prompts per trace (`qktrace.run.batching.BATCH_SIZE`); the scores do not depend on it.

    Returns
    -------
    xr.Dataset
        Dim ``head`` (sorted, best first) with coordinates ``layer``, ``q_head``, ``kv_head``
        and ``ranking`` (1 = best), and variables ``answer_attention``, ``answer_share``,
        ``answer_argmax`` (means over prompts). attrs: provenance, ``by``, ``n_prompts``.

    Examples
    --------
    >>> best = qktrace.find_heads(model, prompts, answer_pos, keys=box_pos, top=10)  # doctest: +SKIP
    >>> best.to_dataframe()  # doctest: +SKIP
    >>> heads = list(best["head"].values[:3])  # e.g. ["16.1", "17.24", "20.1"]  # doctest: +SKIP
    """
    scanned = _check_arguments(model, prompts, answer, layers, top, by, progress)
    plan = plan_run(
        model, prompts, query, keys, batch_size, add_special_tokens, check=_check_answers(answer)
    )
    parts, slots, answer_slots = [], [], []
    for batch, part in run(
        plan,
        lambda batch: _scan_batch(model, batch, scanned),
        desc="find_heads",
        resume_hint=(
            "find_heads keeps no partial results: rerun it when NDIF is reachable, or "
            "pass the heads yourself (CLI: --heads)."
        ),
        progress=progress,
    ):
        parts.append(part)
        slots.append(batch.key_slots)
        answer_slots.append(_answer_slots(batch, answer))
    attention = np.concatenate(parts)  # [prompt, head, key], heads layer-major
    valid = np.concatenate(slots) >= 0
    attention = np.where(valid[:, None, :], attention, np.nan)
    return rank_heads(model, scanned, attention, np.concatenate(answer_slots), by=by, top=top)


def _check_arguments(
    model: Model,
    prompts: Sequence[PromptInput],
    answer: Sequence[int],
    layers: Sequence[int] | None,
    top: int | None,
    by: str,
    progress: bool,
) -> list[int]:
    """`find_heads`' arguments checked before any prompt is tokenized; returns the layers to
    scan, sorted (all of the model's by default)."""
    check_model("model", model)
    checks.flag("progress", progress)
    checks.prompts("prompts", prompts)
    checks.one_int_per_prompt("answer", answer, len(prompts), "token position")
    if top is not None:
        checks.integer("top", top, low=1, example="5")
    if layers is not None:
        if isinstance(layers, str | bytes) or not isinstance(layers, Sequence | range):
            raise BadArgumentType(f"layers={layers!r} is not a list of layers; pass e.g. [0, 1].")
        for layer in layers:
            checks.integer("layers[...]", layer)
            model.check_layer(layer)
    if by not in SCORES:
        raise BadArgument(f"by must be one of {SCORES}, not {by!r}.")
    if top is not None and top < 1:
        raise BadArgument(f"top must be >= 1 (or None for every head), got {top}.")
    if isinstance(answer, str) or len(answer) != len(prompts):
        raise BadArgument(
            f"answer must give one token position per prompt ({len(prompts)} prompts), "
            f"got {answer!r}."
        )
    scanned = list(range(model.n_layers)) if layers is None else sorted(set(int(x) for x in layers))
    if not scanned:
        raise BadArgument("layers is empty: pass at least one layer, or None for all.")
    for layer in scanned:
        model.check_layer(layer)
    return scanned


def rank_heads(
    model: Model,
    layers: Sequence[int],
    attention: np.ndarray,
    answer_slot: np.ndarray,
    *,
    by: Score = "answer_attention",
    top: int | None = 5,
) -> xr.Dataset:
    """`find_heads`'s ranking from the attention of every head of `layers` at the candidate keys.

    `attention` [prompt, head (layer-major, every head of each layer), key] (NaN where a prompt
    has no key in that slot), `answer_slot` [prompt] the answer's slot among the keys; `by` and
    `top` as for `find_heads`. Shared with the studies' head search, which reads the attention
    from the capture of the fresh prompts instead of a pass of its own.
    """
    rows = np.arange(len(answer_slot))
    on_answer = attention[rows, :, answer_slot]  # [prompt, head]
    share = on_answer / np.nansum(attention, axis=-1)
    best = np.where(np.isnan(attention), -np.inf, attention).argmax(-1)
    scores = {
        "answer_attention": on_answer.mean(0),
        "answer_share": share.mean(0),
        "answer_argmax": (best == answer_slot[:, None]).mean(0),
    }
    order_keys = [by, *[s for s in SCORES if s != by]]
    order = np.lexsort([-scores[s] for s in reversed(order_keys)])
    if top is not None:
        order = order[:top]
    heads = [Head(layer, h) for layer in layers for h in range(model.n_heads)]
    chosen = [heads[i] for i in order]
    from qktrace.store import provenance

    n_prompts = len(answer_slot)
    params = {"layers": list(layers), "by": by, "top": top, "n_prompts": n_prompts}
    return xr.Dataset(
        {name: ("head", values[order]) for name, values in scores.items()},
        coords={**head_coords(model, chosen), "ranking": ("head", np.arange(1, len(order) + 1))},
        attrs={
            **provenance("find_heads", params, model=model),
            "by": by,
            "n_prompts": n_prompts,
        },
    )


def _check_answers(answer: Sequence[int]) -> Check:
    """A `plan_run` check: one query per prompt, and its answer among its candidate keys."""

    def check(
        start: int, lengths: list[int], query: list[list[int]], keys: list[list[int]]
    ) -> None:
        if any(len(row) != 1 for row in query):
            raise BadArgument("find_heads takes one query position per prompt (e.g. query='last').")
        _slots(start, lengths, answer, keys)

    return check


def _answer_slots(batch: Batch, answer: Sequence[int]) -> np.ndarray:
    """Each prompt's answer position as a slot among its candidate keys."""
    keys = [row.tolist() for row in batch.key_slots]
    return np.array(_slots(batch.start, batch.encoded.lengths, answer, keys))


def _slots(
    start: int, lengths: list[int], answer: Sequence[int], keys: list[list[int]]
) -> list[int]:
    """Slots of prompts start.. answers among their candidate keys (clear error if absent)."""
    rows = resolve_positions(list(answer[start : start + len(lengths)]), lengths, "Answer", start)
    slots = []
    for i, row in enumerate(rows):
        candidates = keys[i]
        if len(row) != 1:
            raise BadArgument(f"Answer of prompt {start + i} is {row}: give one position.")
        if row[0] not in candidates:
            raise BadArgument(
                f"Prompt {start + i}: the answer position {row[0]} is not among its "
                f"candidate keys {[c for c in candidates if c >= 0]}: add it to keys=."
            )
        slots.append(candidates.index(row[0]))
    return slots


def _scan_batch(model: Model, batch: Batch, layers: list[int]) -> np.ndarray:
    """One trace: attention of every head of `layers` at the candidate keys, [batch, heads, keys]."""
    all_heads = list(range(model.n_heads))
    plan = [
        (
            layer,
            [model.kv_head(h) for h in all_heads],
            model.scaling(layer),
            model.softcap(layer),
        )
        for layer in layers
    ]
    inputs = {layer: model.attention_inputs(layer) for layer in layers}
    query_index, key_index = batch.query_index, batch.key_index
    with torch.inference_mode(), model.trace(batch.encoded.inputs) as tracer:
        saved = nnsight.save([])
        for layer, kv_heads, scaling, softcap in plan:
            q, k, mask = inputs[layer].read()
            q_sel = ops.gather_heads(q, all_heads, query_index)
            _, probs = ops.attention_rows(q_sel, k, kv_heads, mask, query_index, scaling, softcap)
            saved.append(ops.at_keys(probs, key_index)[:, :, 0])
        nnsight.save(saved)
        tracer.stop()  # nothing after the last layer read is needed
    return np.concatenate([s.float().cpu().numpy() for s in saved], axis=1)
