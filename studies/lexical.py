"""Lexical binding: the query-key subspace that carries *which object* a box holds (paper §3.3, Figs 9-10).

Method
------
1. **Prompts** (`studies.binding`): boxes prompts with ``n_pairs`` pairs; the queried object
   and its position vary from prompt to prompt. **Counterfactual:** the same prompt with the
   queried object replaced, in the context and in the question, by an object the prompt does
   not use; the position, the letters and the other objects stay the same.
2. **Contrast.** Query: the last token ("Box"). Key: the answer's box letter.
   Positive: q · k of the answer's box key in the original prompt. Negative: the same query with
   the answer's box key of the counterfactual, which differs from the original key only in the
   identity of the object bound to that box (the key precedes the question, so replacing the
   object in the question does not change it). This holds the query, the position and the
   letter fixed and varies only the lexical match, so ΔC isolates it. (With
   ``negative_query="counterfactual"`` the negative uses the counterfactual's own query
   instead.) The pairs cross two prompts, so `qktrace.sums` (which pairs a query with keys of
   its own prompt) cannot sum them in the trace: the query and the one answer key per prompt are
   captured (`qktrace.qk`; d_head numbers per head and prompt) and summed here in float64
   (`qktrace.covariance.add_pairs`), then decomposed (feature "lexical"). **Significance:**
   `qktrace.covariance.permutation_null` on the same pairs: ``null_rank`` counts the leading
   components above the null's 95th percentile.
3. **Order subspace for the attribution.** Taken from ``OUT/order_id.zarr`` when it was made for
   the same model, heads, pairs, threshold and chat setting; otherwise computed here with the
   order-ID design (`studies.order_id.order_subspaces`).
4. **Geometry.** Fresh prompts' box keys projected on the lexical key subspace, PCA coloured by
   the object bound to each box (and by order index).
5. **Causal check (Fig 9).** Swap lexical-subspace key coordinates between the answer's box and
   another box, against random subspaces of the same rank (`qktrace.interventions`).
6. **Attribution (Fig 10).** Each box key's attention logit split into the parts carried by the
   order-ID and lexical query subspaces plus a residual (`qktrace.attribute`, lexical made
   orthogonal to order), and the explained fraction 1 - ||resid||^2 / ||total||^2.
7. **Store** ``OUT/lexical.zarr`` (feature "lexical", plus the "order" subspace used); figures
   drawn from it, saved beside it.

Example
-------
    qktrace study lexical --model meta-llama/Llama-3.1-8B-Instruct --remote --n-prompts 2000 \\
        --out out/binding
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import xarray as xr

from qktrace.attribution import attribute
from qktrace.covariance import add_pairs, decompose, empty_sums
from qktrace.locks import one_writer
from qktrace.models import Head, Model, Remote
from qktrace.prompts import locate
from qktrace.qk import capture
from studies import binding, order_id
from studies._common import (
    N_RANDOM_ANSWERS,
    ModelLike,
    check_design,
    check_out,
    checkpoint,
    choose_heads,
    default_model,
    heads_source,
    is_organism,
    null_test,
    open_model,
    save_figures,
    sizes,
    write,
)

STUDY = "lexical"
NegativeQuery = Literal["original", "counterfactual"]


def lexical_pairs(
    lm: Model,
    heads: Sequence[Head],
    *,
    n_prompts: int,
    n_pairs: int,
    batch_size: int,
    seed: int,
    chat: bool | None,
    checkpoints: Path | None = None,
    progress: bool = True,
) -> tuple[xr.Dataset, xr.Dataset]:
    """Step 1: the query and the answer's box key of every original and counterfactual prompt.

    Returns (original, counterfactual) captures (`qktrace.capture`, one key per prompt). With
    `checkpoints` (a store path), the two captures are kept batch by batch in
    ``<name>.original.zarr`` and ``<name>.counterfactual.zarr`` beside it, so a crashed run
    resumes.
    """
    prompts = binding.build_prompts(n_prompts, n_pairs, seed=seed)
    flipped = binding.counterfactuals(prompts, seed=seed + 3)
    runs = []
    for what, group in (("original", prompts), ("counterfactual", flipped)):
        loc = locate(lm.tokenizer, group, chat=chat)
        answer = [
            [row[p.meta["answer"]]] for row, p in zip(loc.positions["box"], group, strict=True)
        ]
        runs.append(
            capture(
                lm,
                loc.ids,
                list(heads),
                keys=answer,
                attention=False,
                batch_size=batch_size,
                out=None if checkpoints is None else checkpoint(checkpoints, what),
                progress=progress,
            ).load()
        )
    return runs[0], runs[1]


def contrast_pairs(
    original: xr.Dataset, counter: xr.Dataset, head: str, negative_query: NegativeQuery
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Step 2's (q, k, is_positive) pairs of one head: positives first, then negatives."""
    q_o = original["q"].sel(head=head).isel(query=0).values
    k_o = original["k"].sel(head=head).isel(key=0).values
    q_c = counter["q"].sel(head=head).isel(query=0).values
    k_c = counter["k"].sel(head=head).isel(key=0).values
    q_neg = q_o if negative_query == "original" else q_c
    positive = np.r_[np.ones(len(q_o), bool), np.zeros(len(q_neg), bool)]
    return np.concatenate([q_o, q_neg]), np.concatenate([k_o, k_c]), positive


def lexical_sums(
    lm: Model,
    heads: Sequence[Head],
    *,
    n_prompts: int,
    n_pairs: int,
    negative_query: NegativeQuery,
    batch_size: int,
    seed: int,
    chat: bool | None,
    checkpoints: Path | None = None,
    progress: bool = True,
    runs: tuple[xr.Dataset, xr.Dataset] | None = None,
) -> xr.Dataset:
    """Steps 1-2: covariance sums of original vs counterfactual answer keys (feature "lexical").

    `runs`: the (original, counterfactual) captures of `lexical_pairs` if already made.
    """
    if negative_query not in ("original", "counterfactual"):
        raise ValueError(f"negative_query={negative_query!r}: use 'original' or 'counterfactual'.")
    if runs is None:
        runs = lexical_pairs(
            lm,
            heads,
            n_prompts=n_prompts,
            n_pairs=n_pairs,
            batch_size=batch_size,
            seed=seed,
            chat=chat,
            checkpoints=checkpoints,
            progress=progress,
        )
    original, counter = runs
    sums = empty_sums(original["head"].values, ["lexical"], lm.d_head)
    for head in original["head"].values:
        q, k, positive = contrast_pairs(original, counter, head, negative_query)
        sums = add_pairs(sums, q[positive], k[positive], head, "lexical", "positive")
        sums = add_pairs(sums, q[~positive], k[~positive], head, "lexical", "negative")
    head_coords = {n: c for n, c in original.coords.items() if c.dims == ("head",)}
    return sums.assign_coords(head_coords).assign_attrs(n_prompts=n_prompts)


@one_writer(f"{STUDY}.zarr")
def run(
    model: ModelLike | None = None,
    *,
    out: str | Path,
    heads: str | Sequence[Any] | None = None,
    n_prompts: int | None = None,
    n_test: int | None = None,
    n_pairs: int = 9,
    negative_query: NegativeQuery = "original",
    threshold: float = 0.99,
    n_random: int = 10,
    n_random_answers: int = N_RANDOM_ANSWERS,
    batch_size: int = 16,
    seed: int = 0,
    remote: Remote = False,
    chat: bool | None = None,
    figures: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Find the lexical subspace of binding heads; PCA, swaps, and the order/lexical attribution.

    Parameters
    ----------
    model, out, heads, n_prompts, n_test, n_pairs
        As in `studies.order_id.run` (the paper's attribution figure used ``n_pairs=4``).
    negative_query
        "original" (default): negative pairs use the original prompt's query with the
        counterfactual's key; "counterfactual": the counterfactual's own query.
    threshold, n_random, n_random_answers, batch_size, seed, remote, chat, figures, overwrite
        As in `studies.filter_heads.run`.

    Returns
    -------
    Path of ``OUT/lexical.zarr``.
    """
    model = default_model(model)
    n_prompts, n_test = sizes(model, STUDY, n_prompts, n_test)
    check_design(
        n_prompts=n_prompts,
        n_test=n_test,
        threshold=threshold,
        n_random=n_random,
        batch_size=batch_size,
        seed=seed,
    )
    binding.check_pairs(n_pairs)
    out = Path(out)
    path = out / f"{STUDY}.zarr"
    sums_checkpoint = check_out(path, overwrite)
    test = binding.build_prompts(n_test, n_pairs, seed=seed + 1)
    lm = open_model(model, remote)
    test_loc = locate(lm.tokenizer, test, chat=chat)
    head_list, ranking = choose_heads(
        lm, heads, "binding", find=lambda: binding.find(lm, test, test_loc, batch_size, progress)
    )
    params = {
        "heads": [h.label for h in head_list],
        "heads_from": heads_source(lm, heads),
        "n_prompts": n_prompts,
        "n_test": n_test,
        "n_pairs": n_pairs,
        "negative_query": negative_query,
        "threshold": threshold,
        "n_random": n_random,
        "n_random_answers": n_random_answers,
        "batch_size": batch_size,
        "chat": chat,
    }

    # 1-2. lexical ΔC from original vs counterfactual answer keys
    if negative_query not in ("original", "counterfactual"):
        raise ValueError(f"negative_query={negative_query!r}: use 'original' or 'counterfactual'.")
    runs = lexical_pairs(
        lm,
        head_list,
        n_prompts=n_prompts,
        n_pairs=n_pairs,
        batch_size=batch_size,
        seed=seed,
        chat=chat,
        checkpoints=path,
        progress=progress,
    )
    sums = lexical_sums(
        lm,
        head_list,
        n_prompts=n_prompts,
        n_pairs=n_pairs,
        negative_query=negative_query,
        batch_size=batch_size,
        seed=seed,
        chat=chat,
        runs=runs,
    )
    lexical = decompose(sums, threshold=threshold).merge(sums[["qk_sum", "q_sum", "k_sum"]])
    # is it real? the permutation null of the same pairs (order: -1, tested in order_id.zarr)
    null = null_test(
        {(h.label, "lexical"): contrast_pairs(*runs, h.label, negative_query) for h in head_list},
        seed=seed,
        threshold=threshold,
        d_head=lm.d_head,
    )

    # 3. the order-ID subspace, from order_id.zarr or computed with the order-ID design
    order, source = _order_subspace(
        lm,
        head_list,
        out,
        sums_checkpoint,
        n_prompts=n_prompts,
        n_pairs=n_pairs,
        threshold=threshold,
        batch_size=batch_size,
        seed=seed,
        chat=chat,
        progress=progress,
    )
    subspaces = xr.concat(
        [lexical, order.drop_vars([v for v in order.coords if v not in lexical.coords])],
        dim="feature",
        data_vars="all",
        coords="minimal",
        compat="override",
        combine_attrs="drop",
    )

    # 4. box keys of fresh prompts in the lexical subspace
    captured = capture(
        lm,
        test_loc.ids,
        head_list,
        keys=test_loc.positions["box"],
        batch_size=batch_size,
        progress=progress,
    ).assign_coords(binding.key_labels(test))
    geometry = order_id.pca(captured, subspaces, "lexical")

    # 5. lexical swap vs random subspaces
    effects = binding.swaps(
        captured, test, test_loc, subspaces, "lexical", n_random=n_random, seed=seed
    )
    # what the swap does to the model's answer, per head and in all heads together
    answers = binding.answer_swaps(
        lm,
        test,
        test_loc,
        subspaces,
        "lexical",
        n_random=n_random_answers,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
    )

    # 6. attention-logit attribution to order, lexical and the residual (Fig 10)
    parts = attribute(
        captured,
        {
            "order": subspaces["query_basis"].sel(feature="order"),
            "lexical": subspaces["query_basis"].sel(feature="lexical"),
        },
        side="query",
    )
    parts = parts[["logit_part", "explained", "rank"]].rename(
        {"component": "part", "rank": "part_rank"}
    )

    null = null.reindex(feature=subspaces["feature"].values, fill_value={"null_rank": -1})
    ds = xr.merge(
        [subspaces, null, captured, geometry, effects, answers, parts, ranking],
        compat="override",
        combine_attrs="drop",
    )
    params["order_subspace"] = source
    params.update(ranking.attrs)  # how the heads were ranked, when find_heads chose them
    write(ds, path, study=STUDY, params=params, model=lm, seed=seed, overwrite=overwrite)
    if figures:
        plot(path)
    return path


def _order_subspace(
    lm: Model,
    heads: list[Head],
    out: Path,
    sums_out: Path,
    *,
    n_prompts: int,
    n_pairs: int,
    threshold: float,
    batch_size: int,
    seed: int,
    chat: bool | None,
    progress: bool,
) -> tuple[xr.Dataset, str]:
    """The order-ID subspace: reused from OUT/order_id.zarr if it matches, else computed."""
    from qktrace import store

    stored = out / f"{order_id.STUDY}.zarr"
    labels = [h.label for h in heads]
    if stored.exists():
        ds = store.open(stored, checksums=True)
        p = ds.attrs.get("params", {})
        if (
            _same_model(str(ds.attrs.get("model")), lm)
            and set(labels) <= set(map(str, ds["head"].values))
            and p.get("n_pairs") == n_pairs
            and p.get("threshold") == threshold
            and p.get("chat") == chat
        ):
            keep = [
                "delta_c",
                "singular_values",
                "query_basis",
                "key_basis",
                "rank",
                "pair_count",
                "qk_sum",
                "q_sum",
                "k_sum",
            ]
            return ds[keep].sel(head=labels).load(), str(stored)
    computed = order_id.order_subspaces(
        lm,
        heads,
        n_prompts=n_prompts,
        n_pairs=n_pairs,
        query_object=order_id.default_query_object(seed),
        threshold=threshold,
        batch_size=batch_size,
        seed=seed,
        chat=chat,
        sums_out=sums_out,
        progress=progress,
    )
    return computed, "computed"


def _same_model(stored: str, lm: Model) -> bool:
    """Whether a store's model is `lm` (the organism matches however its path was written)."""
    return stored == lm.name or (is_organism(stored) and is_organism(lm))


def plot(path: str | Path) -> list[Path]:
    """Draw the lexical figures from ``lexical.zarr``; PNGs are saved next to it.

    The binding figures of `studies.binding.plot` (ranks, PCA by object and by order, lexical
    swap vs random) and the attribution (Fig 10): ``lexical_attribution.png``, each key's
    logit split into order, lexical and residual parts, averaged over prompts for the answer's
    box and the other boxes; ``lexical_attribution_example.png``, the same for the first prompt.
    """
    from qktrace import plots, store

    path = Path(path)
    paths = binding.plot(path, STUDY, "lexical", hues=("object", "order"))
    ds = store.open(path).load()
    explained = ds["explained"].isel(query=0).mean("prompt")
    parts = ds["logit_part"].isel(query=0)
    answer = ds["key_label"] == "positive"
    mean_parts = xr.concat(
        [parts.where(answer).mean(["prompt", "key"]), parts.where(~answer).mean(["prompt", "key"])],
        dim=xr.DataArray(["answer box", "other boxes"], dims="key", name="key"),
    )

    def title(head: str) -> str:
        return f"head {head}: explained {float(explained.sel(head=head)):.2f}"

    example = ds["logit_part"].isel(query=0, prompt=0)
    letters = [
        f"{box} ({order})" + (" answer" if label == "positive" else "")
        for box, order, label in zip(
            ds["box"].values[0], ds["order"].values[0], ds["key_label"].values[0], strict=True
        )
    ]
    example = example.assign_coords(key=letters)
    figures = {
        "lexical_attribution.png": plots.stacked_bars(
            mean_parts.transpose("head", "key", "part"),
            x="key",
            stack="part",
            row="head",
            panel_title=title,
            ylabel="attention logit",
            title="Attention logits split into order, lexical and residual parts",
        ),
        "lexical_attribution_example.png": plots.stacked_bars(
            example.transpose("head", "key", "part"),
            x="key",
            stack="part",
            row="head",
            ylabel="attention logit",
            title=(
                f"Prompt 0 ({ds.sizes['key']} boxes), asking for the "
                f"{ds['query_object'].values[0]}: each box's logit split into parts"
            ),
        ),
    }
    return paths + save_figures(figures, path.parent)
