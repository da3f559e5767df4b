"""Capture the queries, keys and attention of chosen heads at chosen positions.

Mechanism. Prompts are planned into padded batches by `qktrace.run.batching` (so qktrace knows every
token position, and left- or right-padding gives the same rotary positions, hence the same q and
k, as the unpadded prompt), and each batch runs through ONE nnsight trace. Inside the trace, at
each chosen layer, qktrace reads the inputs of the attention function (see `qktrace.model.loading`):
q [batch, n_heads, tokens, d_head] and k [batch, n_kv_heads, tokens, d_head]. It gathers the
chosen heads at the chosen positions with the torch functions of `qktrace.core.ops`, and saves only
those small tensors; the model's own mask and scaling give the attention weights of the chosen
queries. With grouped-query attention, query head h reads key head h // (n_heads / n_kv_heads),
and that is the key returned for it. (`qktrace.verbs.reduce.reduce` sums q k^T inside the trace instead.)

Everything in the trace body is plain torch on traced values plus `qktrace.core.ops` (shipped by
value), so the same code runs locally, with `remote="local"` and on NDIF.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nnsight
import numpy as np
import torch
import xarray as xr

from qktrace.core import checks, ops
from qktrace.model.loading import Head, Model, check_model, parse_heads
from qktrace.run.batching import (
    BATCH_SIZE,
    Batch,
    Encoded,
    Plan,
    Positions,
    PromptInput,
    by_layer,
    given_order,
    head_coords,
    layer_reads,
    plan_run,
    run,
)
from qktrace.store.locks import one_writer

if TYPE_CHECKING:
    from qktrace.store import BatchWriter

# `capture(out=)` writes its batches at most this often (and whenever it stops, for whatever
# reason Python sees), holding them in memory between writes, written early once they exceed
# WRITE_BUFFER_MIB: one write per batch cost more than the batch's forward on the organism
# (benchmarks/capture_writes.py). A kill that Python cannot see (SIGKILL, power loss) loses at
# most the batches of the last WRITE_EVERY_S seconds (or WRITE_BUFFER_MIB); the rerun computes
# them again.
WRITE_EVERY_S = 30.0
WRITE_BUFFER_MIB = 16.0


def check_finite(name: str, values: np.ndarray, first_prompt: int) -> None:
    """Refuse a batch's captured values with NaN/inf, naming the prompt and the fix."""
    bad = ~np.isfinite(values)
    if bad.any():
        prompt = first_prompt + int(np.argwhere(bad)[0][0])
        raise FloatingPointError(
            f"Captured {name} has NaN/inf for prompt {prompt}. The model overflowed on it: run in "
            "float32 or bfloat16 instead of float16, or drop that prompt."
        )


def _capture_batch(
    model: Model,
    enc: Encoded,
    heads: list[Head],
    query_index: torch.Tensor,
    key_index: torch.Tensor,
    attention: bool,
) -> dict[str, np.ndarray]:
    """One trace: q [b, head, query, d], k [b, head, key, d], and optionally logits/attention [b, head, query, key]."""
    layers = by_layer(model, heads)
    plan = layer_reads(model, layers)
    inputs = {layer: model.attention_inputs(layer) for layer in layers}
    with torch.inference_mode(), model.trace(enc.inputs) as tracer:
        saved = nnsight.save([])
        for layer, q_heads, kv_heads, scaling, softcap in plan:
            q, k, mask = inputs[layer].read()
            q_sel = ops.gather_heads(q, q_heads, query_index)
            k_sel = ops.gather_heads(k, kv_heads, key_index)
            item = [q_sel, k_sel]
            if attention:
                logits, probs = ops.attention_rows(
                    q_sel, k, kv_heads, mask, query_index, scaling, softcap
                )
                item += [ops.at_keys(logits, key_index), ops.at_keys(probs, key_index)]
            saved.append(item)
        nnsight.save(saved)
        tracer.stop()  # nothing after the last layer read is needed
    names = ["q", "k", "logit", "attention"]
    order = given_order(layers, heads)
    out = {}
    for n, name in enumerate(names[: 4 if attention else 2]):
        values = np.concatenate([item[n].float().cpu().numpy() for item in saved], axis=1)
        out[name] = values[:, order]
    return out


@one_writer()
def capture(
    model: Model,
    prompts: Sequence[PromptInput],
    heads: str | Sequence[Any],
    *,
    query: Positions = "last",
    keys: Positions = "all",
    attention: bool = True,
    batch_size: int = BATCH_SIZE,
    add_special_tokens: bool = True,
    out: str | Path | None = None,
    progress: bool = True,
) -> xr.Dataset:
    """Capture q and k of chosen heads at chosen positions, one trace per batch.

    Parameters
    ----------
    model
        From `qktrace.load`; local, `remote="local"` or NDIF.
    prompts
        Strings (tokenized here) or token-id lists.
    heads
        "16.19,20.26", ["16.19"] or [(16, 19)]: query heads; each gets the key head it reads.
    query, keys
        "last" (the last real token), "all", one position per prompt, or a list per prompt.
        Positions are token indices of the unpadded prompt; negative ones count from its end.
    attention
        Also return `logit` (scaled q·k) and `attention` (the model's softmax weight, over the
        whole row, taken at the chosen keys).
    batch_size
        Prompts per trace (`qktrace.run.batching.BATCH_SIZE`, 16): it sets memory and round
        trips, not the values (to float rounding). A resumed `out` needs the same one.
    out
        A zarr path: the batches are appended to it as they complete, written together at most
        every `WRITE_EVERY_S` (30) seconds or `WRITE_BUFFER_MIB` (16 MiB) and when the call
        ends, fails or is interrupted. A rerun of the same call resumes after the last written
        batch; a kill that no Python code survives (SIGKILL) loses the batches not yet written.
        The result is then opened lazily from the store.

    Returns
    -------
    xr.Dataset with `q` (prompt, head, query, d_head), `k` (prompt, head, key, d_head), and
    `logit`, `attention` (prompt, head, query, key), float32. Coordinates: `head` labels "L.H"
    with `layer`, `q_head`, `kv_head`; `query_position`/`key_position` (-1 where a prompt has
    fewer keys; its values are NaN) and `query_token`/`key_token` strings.

    Examples
    --------
    >>> ds = qktrace.capture(model, ["The cat sat"], "0.1", keys="all")  # doctest: +SKIP
    >>> ds.attention.sel(head="0.1").isel(query=0)  # doctest: +SKIP
    """
    check_model("model", model)
    checks.flag("attention", attention)
    checks.flag("progress", progress)
    checks.path("out", out, optional=True)
    chosen = parse_heads(heads)
    model.check_heads(chosen)
    plan = plan_run(model, prompts, query, keys, batch_size, add_special_tokens)
    from qktrace import store

    params = {
        "model": model.name,
        "heads": [h.label for h in chosen],
        "n_prompts": len(prompts),
        "batch_size": batch_size,
        "attention": attention,
        "prompts_sha256": plan.sha256,
    }
    attrs = store.provenance("capture", params, model=model)
    if out is None:
        batches = _capture_batches(model, plan, chosen, attention, None, None, progress)
        return xr.concat(
            batches, dim="prompt", data_vars="all", coords="different", compat="equals"
        ).assign_attrs(attrs)
    sizes = {"prompt": len(prompts), "query": plan.query_width, "key": plan.key_width}
    writer = store.BatchWriter(
        out,
        params=params,
        attrs=attrs,
        sizes=sizes,
        write_every_s=WRITE_EVERY_S,
        max_buffer_mib=WRITE_BUFFER_MIB,
    )
    _capture_batches(model, plan, chosen, attention, writer, out, progress)
    return store.open(out).assign_attrs(attrs)


def _capture_batches(
    model: Model,
    plan: Plan,
    heads: list[Head],
    attention: bool,
    writer: BatchWriter | None,
    out: str | Path | None,
    progress: bool,
) -> list[xr.Dataset]:
    """Capture every batch of `plan` not yet in `writer`: appended to it (and written, even
    when the run stops), or, without a writer, returned."""
    batches = []
    done = min(writer.n_done * plan.batch_size, len(plan.prompts)) if writer is not None else 0
    coords = head_coords(model, heads)

    def step(batch: Batch) -> dict[str, np.ndarray]:
        return _capture_batch(
            model, batch.encoded, heads, batch.query_index, batch.key_index, attention
        )

    def resume_hint(start: int) -> str:
        if out is None:
            return ""
        return f"Batches before prompt {start} are saved in {out}: rerun the same call to resume."

    try:
        for batch, values in run(
            plan, step, desc="capture", resume_hint=resume_hint, progress=progress, done=done
        ):
            for name, array in values.items():
                check_finite(name, array, batch.start)
            ds = batch_dataset(values, batch).assign_coords(coords)
            if writer is not None:
                writer.append(ds)
            else:
                batches.append(ds)
            del batch, values, ds
    finally:  # finished, or stopped by an error or Ctrl-C: write every completed batch
        if writer is not None:
            writer.flush()
    return batches


def batch_dataset(values: dict[str, np.ndarray], batch: Batch) -> xr.Dataset:
    """One batch's q, k (and logit, attention) with its prompts' coordinates; NaN at padding."""
    enc, q_slots, k_slots, start, texts = (
        batch.encoded,
        batch.query_slots,
        batch.key_slots,
        batch.start,
        batch.texts,
    )
    q = values["q"].copy()
    k = values["k"].copy()
    q[np.broadcast_to((q_slots < 0)[:, None, :, None], q.shape)] = np.nan
    k[np.broadcast_to((k_slots < 0)[:, None, :, None], k.shape)] = np.nan
    data: dict[str, Any] = {
        "q": (("prompt", "head", "query", "d_head"), q),
        "k": (("prompt", "head", "key", "d_head"), k),
    }
    if "attention" in values:
        hide = np.broadcast_to((k_slots < 0)[:, None, None, :], values["attention"].shape)
        for name in ("logit", "attention"):
            v = values[name].copy()
            v[hide] = np.nan
            data[name] = (("prompt", "head", "query", "key"), v)
    tok = lambda slots: np.array(  # noqa: E731
        [[enc.tokens[i][p] if p >= 0 else "" for p in row] for i, row in enumerate(slots)],
        dtype=object,
    )
    coords = {
        "prompt": np.arange(start, start + len(texts)),
        "prompt_text": ("prompt", np.array(texts, dtype=object)),
        "n_tokens": ("prompt", np.array(enc.lengths)),
        "query_position": (("prompt", "query"), q_slots),
        "key_position": (("prompt", "key"), k_slots),
        "query_token": (("prompt", "query"), tok(q_slots)),
        "key_token": (("prompt", "key"), tok(k_slots)),
    }
    return xr.Dataset(data, coords=coords)
