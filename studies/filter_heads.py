"""Filter heads: categorical semantic subspaces in query-key space (paper §3.1, Figs 6-7).

Method
------
1. **Prompts.** A bullet list of items from several categories (``items_per_category`` items of
   each of ``categories_per_list`` categories, shuffled), then a request about one category:
   "What are the fruits in the list?", or the variants "What is the first fruit in the list?"
   and "What is the last fruit in the list?". The asked category cycles through ``categories``
   so every category is asked equally often; the other categories of a list are drawn at
   random. The chat template is applied when the model has one.
2. **Contrast.** The query is the last prompt token; the keys are the last token of every list
   item. For the asked category c, keys of items of c are *positive* and keys of the other items
   are *negative*; so each category c gets one ΔC(c) = C+ - C- per head, summed inside the
   trace (`qktrace.sums`) and decomposed (`qktrace.decompose`): SVD, 99% rank rule, query
   and key bases. Positives are all items of the asked category for every question variant.
   **Significance:** `qktrace.covariance.permutation_null` on the fresh prompts' (query, item)
   pairs (labels shuffled 100 times): ``null_rank`` counts the leading components above the
   null's 95th percentile.
3. **Geometry (Fig 6).** On ``n_test`` fresh prompts, the item keys are captured and projected
   onto the union of all category key subspaces of the head; a PCA of those coordinates,
   coloured by item category, shows whether keys cluster by category.
4. **Causal check (Fig 7).** On the same fresh prompts, per head: the *attended* item is the
   item of the asked category with the highest attention from the query; the *target* is an
   item of another category (drawn at random). Their coordinates inside the asked category's
   key subspace are swapped (`qktrace.interventions`, mode "swap", key side), and the change of
   p(target | {orig, target}) and the flip rate (attention argmax moves from orig to target)
   are compared with random subspaces of the same rank.
5. **Store.** Everything lands in ``OUT/filter_heads.zarr`` (labelled, with provenance); the
   figures are drawn from that store and saved beside it.

Paper settings: Llama-3.1-8B-Instruct, heads 16.19, 20.26, 20.14; 2000 prompts for the
subspaces and 1000 for the interventions; five items per category.

Example
-------
    qktrace study filter-heads --model meta-llama/Llama-3.1-8B-Instruct --remote \\
        --n-prompts 2000 --n-test 1000 --out out/filter_heads
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from qktrace import checks
from qktrace.covariance import decompose
from qktrace.interventions import intervene_captured
from qktrace.locks import one_writer
from qktrace.models import Remote
from qktrace.prompts import FILTER_CATEGORIES, FILTER_QUESTIONS, Located, Prompt, locate
from qktrace.prompts import filter_prompts as build_prompts
from qktrace.qk import capture
from qktrace.sums import reduce
from studies._common import (
    N_RANDOM_ANSWERS,
    ModelLike,
    answer_bars,
    answer_effects,
    answer_per_prompt,
    answer_summary,
    captured_pairs,
    check_design,
    check_out,
    choose_heads,
    default_model,
    heads_source,
    null_test,
    open_model,
    pca_figure,
    per_prompt,
    rank_figure,
    save_figures,
    sizes,
    stack_heads,
    subspace_pca,
    swap_bars,
    trimmed,
    union_basis,
    write,
)

STUDY = "filter_heads"
CATEGORIES = FILTER_CATEGORIES
SUMS = ["qk_sum", "q_sum", "k_sum"]  # kept in the store: ΔC can be recomputed (e.g. centered)
QUESTIONS = FILTER_QUESTIONS


# --------------------------------------------------------------------------------------------
# 1. prompts: `build_prompts` is `qktrace.prompts.filter_prompts` (the library holds the
# builder, so the organism's training data and this study share it); here, their labels


def labels(prompts: Sequence[Prompt]) -> list[list[tuple[str, str]]]:
    """Per prompt, per item key: (asked category, "positive" if the item is of it else "negative")."""
    return [
        [
            (p.meta["asked"], "positive" if cat == p.meta["asked"] else "negative")
            for cat in p.meta["item_categories"]
        ]
        for p in prompts
    ]


# --------------------------------------------------------------------------------------------
# the study


@one_writer(f"{STUDY}.zarr")
def run(
    model: ModelLike | None = None,
    *,
    out: str | Path,
    heads: str | Sequence[Any] | None = None,
    n_prompts: int | None = None,
    n_test: int | None = None,
    categories: Sequence[str] = CATEGORIES,
    categories_per_list: int | None = None,
    items_per_category: int = 5,
    questions: Sequence[str] = ("all", "first", "last"),
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
    """Find each category's query/key subspace in filter heads; check it by PCA and by swaps.

    Parameters
    ----------
    model
        A `qktrace.load`-ed model, or a hub id / local path (loaded with `remote`); default:
        the organism shipped in data/organism (`qktrace.organism`).
    out
        Directory for ``filter_heads.zarr`` and the figures.
    heads
        "16.19,20.26" or a list; default: the organism's heads (``organism.heads(study)``) on
        the organism, the paper's for Llama-3.1-8B-Instruct, else found with
        `qktrace.find_heads`.
    n_prompts, n_test
        Prompts for the subspaces, fresh prompts for PCA and swaps; default 2000 and 1000 (the
        paper's), 900 and 300 on the organism (11-29 s each on 2 idle CPU cores).
    categories, categories_per_list, items_per_category, questions
        Prompt design (see `build_prompts`).
    threshold
        Rank rule: fraction of sum(S^2) kept.
    n_random
        Random subspaces of equal rank per swap, the baseline (attention level; computed from
        the capture, no forward pass).
    n_random_answers
        Random subspaces per head for the answer-level swaps (each costs one more copy of
        every test prompt in the answer traces).
    batch_size, seed, remote, chat
        Batching; seed of prompts and random subspaces; local/"local"/NDIF; chat template
        (None: use it when the tokenizer has one).
    figures
        Draw the PNG figures from the store.
    overwrite
        Replace an existing ``filter_heads.zarr``.

    Returns
    -------
    Path of ``OUT/filter_heads.zarr``.
    """
    model = default_model(model)
    n_prompts, n_test = sizes(model, STUDY, n_prompts, n_test)
    if isinstance(categories, str):
        raise checks.BadArgumentType(
            f"categories={categories!r} is one string; pass a list, e.g. "
            f"categories={categories.split(',')!r} (CLI: --categories fruit,animal)."
        )
    categories = checks.unique("categories", list(categories), flag="--categories")
    check_design(
        n_prompts=n_prompts,
        n_test=n_test,
        threshold=threshold,
        n_random=n_random,
        batch_size=batch_size,
        seed=seed,
        min_prompts=len(categories),
        why=(
            f": the asked category cycles through the {len(categories)} categories, so fewer "
            "prompts leave a category without positive keys (no subspace)"
        ),
    )
    out = Path(out)
    path = out / f"{STUDY}.zarr"
    checkpoint = check_out(path, overwrite)
    if categories_per_list is None:
        categories_per_list = min(3, len(categories))
    params = {
        "heads": heads if heads is None or isinstance(heads, str) else [str(h) for h in heads],
        "n_prompts": n_prompts,
        "n_test": n_test,
        "categories": list(categories),
        "categories_per_list": categories_per_list,
        "items_per_category": items_per_category,
        "questions": list(questions),
        "threshold": threshold,
        "n_random": n_random,
        "n_random_answers": n_random_answers,
        "batch_size": batch_size,
        "chat": chat,
    }
    design = dict(
        categories=categories,
        categories_per_list=categories_per_list,
        items_per_category=items_per_category,
        questions=questions,
    )

    # 1. prompts: one set for the subspaces, a fresh one for geometry and interventions
    train = build_prompts(n_prompts, seed=seed, **design)
    test = build_prompts(n_test, seed=seed + 1, **design)
    lm = open_model(model, remote)
    train_loc = locate(lm.tokenizer, train, chat=chat)
    test_loc = locate(lm.tokenizer, test, chat=chat)
    head_list, ranking = choose_heads(
        lm, heads, STUDY, find=lambda: _find_heads(lm, test, test_loc, batch_size, progress)
    )
    params["heads"] = [h.label for h in head_list]
    params["heads_from"] = heads_source(lm, heads)

    # 2. contrastive covariances, summed in the trace, then SVD and the rank rule
    sums = reduce(
        lm,
        train_loc.ids,
        head_list,
        labels(train),
        keys=train_loc.positions["item"],
        batch_size=batch_size,
        out=checkpoint,
        progress=progress,
    )
    subspaces = decompose(sums, threshold=threshold).merge(sums[SUMS])

    # 3. item keys of fresh prompts, and their PCA in the union of category key subspaces
    captured = capture(
        lm,
        test_loc.ids,
        head_list,
        keys=test_loc.positions["item"],
        batch_size=batch_size,
        progress=progress,
    )
    captured = captured.assign_coords(_key_labels(test))
    geometry = _pca(captured, subspaces)
    # is each category's ΔC real? the permutation null on the fresh prompts' (query, item) pairs
    asked = [p.meta["asked"] for p in test]
    null = null_test(
        {
            (str(head), str(c)): captured_pairs(
                captured, head, [i for i, a in enumerate(asked) if a == c]
            )
            for head in captured["head"].values
            for c in subspaces["feature"].values
        },
        seed=seed,
        threshold=threshold,
        d_head=lm.d_head,
    )

    # 4. category swap vs random subspaces of the same rank: attention (from the capture, no
    # forward pass), then the model's answer (the swap written into the model)
    swaps = _swaps(lm, test, test_loc, captured, subspaces, n_random, seed, batch_size, progress)
    first = locate(lm.tokenizer, test, chat=chat, which="first")
    answers = _answer_swaps(
        lm, test, test_loc, first, captured, subspaces, n_random_answers, seed, batch_size, progress
    )

    # 5. store, then figures from the store
    ds = xr.merge(
        [subspaces, null, captured, geometry, swaps, ranking, answers],
        compat="override",
        combine_attrs="drop",
    )
    params.update(ranking.attrs)  # how the heads were ranked, when find_heads chose them
    write(ds, path, study=STUDY, params=params, model=lm, seed=seed, overwrite=overwrite)
    if figures:
        plot(path)
    return path


def _find_heads(
    lm: Any, prompts: list[Prompt], loc: Located, batch_size: int, progress: bool
) -> xr.Dataset:
    """Every head ranked by how much its last-token query attends to the answered item.

    The answered item is the first item of the asked category ("all" and "first" questions)
    or its last one ("last" questions); the candidates are all items.
    """
    from qktrace.heads import find_heads

    answer = []
    for row, p in zip(loc.positions["item"], prompts, strict=True):
        hits = [
            pos
            for pos, c in zip(row, p.meta["item_categories"], strict=True)
            if c == p.meta["asked"]
        ]
        answer.append(hits[-1] if p.meta["question"] == "last" else hits[0])
    return find_heads(
        lm,
        loc.ids,
        answer,
        keys=loc.positions["item"],
        top=None,
        batch_size=batch_size,
        progress=progress,
    )


def _key_labels(prompts: Sequence[Prompt]) -> dict[str, Any]:
    """Coordinates naming every item key: its item, category and positive/negative label."""
    items = np.array([p.meta["items"] for p in prompts], dtype=object)
    cats = np.array([p.meta["item_categories"] for p in prompts], dtype=object)
    asked = np.array([p.meta["asked"] for p in prompts], dtype=object)
    label = np.where(cats == asked[:, None], "positive", "negative").astype(object)
    return {
        "item": (("prompt", "key"), items),
        "category": (("prompt", "key"), cats),
        "key_label": (("prompt", "key"), label),
        "asked": ("prompt", asked),
        "text": ("prompt", np.array([p.text for p in prompts], dtype=object)),
        "question": ("prompt", np.array([p.meta["question"] for p in prompts], dtype=object)),
    }


def _pca(captured: xr.Dataset, subspaces: xr.Dataset, n_pc: int = 3) -> xr.Dataset:
    """Per head: PCA of item keys inside the union of all category key subspaces."""
    projections, ratios, dims = [], [], []
    for head in captured["head"].values:
        bases = [
            trimmed(
                subspaces["key_basis"].sel(head=head, feature=f).transpose("dk", "component").values
            )
            for f in subspaces["feature"].values
        ]
        basis = union_basis(bases)
        keys = captured["k"].sel(head=head).transpose("prompt", "key", "d_head").values
        proj, ratio = subspace_pca(keys.astype(np.float64), basis, n_pc)
        projections.append(proj)
        ratios.append(ratio)
        dims.append(basis.shape[1])
    return xr.Dataset(
        {
            "key_pc": (("head", "prompt", "key", "pc"), np.stack(projections)),
            "pc_variance_ratio": (("head", "pc"), np.stack(ratios)),
            "union_rank": ("head", np.array(dims)),
        },
        coords={"head": captured["head"].values, "pc": np.arange(1, n_pc + 1)},
    )


def _swaps(
    lm: Any,
    prompts: list[Prompt],
    loc: Located,
    captured: xr.Dataset,
    subspaces: xr.Dataset,
    n_random: int,
    seed: int,
    batch_size: int,
    progress: bool,
) -> xr.Dataset:
    """Swap asked-category key coordinates between the attended item and another category's item.

    Per head and asked category, on the prompts asking for it, computed from the captured q and
    k with no forward pass (`qktrace.interventions.intervene_captured`, equal to the in-trace
    edit); the subspace is named "category" (the prompt's `asked` coordinate says which), the
    baselines are random subspaces of the same rank.
    """
    rng = np.random.default_rng(seed + 2)
    cats = [p.meta["item_categories"] for p in prompts]
    asked = [p.meta["asked"] for p in prompts]
    items = loc.positions["item"]
    # the target: one item of another category per prompt, the same for every head
    target_slot = [
        int(rng.choice([j for j, c in enumerate(row) if c != a]))
        for row, a in zip(cats, asked, strict=True)
    ]
    per_head = []
    for head in captured["head"].values:
        attention = captured["attention"].sel(head=head).isel(query=0).values  # [prompt, key]
        parts = []
        for category in subspaces["feature"].values:
            chosen = [i for i, a in enumerate(asked) if a == category]
            if not chosen:
                continue
            # the attended item: the asked category's item with the most attention
            orig_slot = [
                max(
                    (j for j, c in enumerate(cats[i]) if c == category),
                    key=lambda j, i=i: attention[i, j],
                )
                for i in chosen
            ]
            fx = intervene_captured(
                captured.isel(prompt=chosen),
                str(head),
                subspaces["key_basis"].sel(head=head, feature=category),
                name="category",
                orig=[items[i][s] for i, s in zip(chosen, orig_slot, strict=True)],
                target=[items[i][target_slot[i]] for i in chosen],
                mode="swap",
                n_random=n_random,
                seed=seed,
            )
            parts.append(per_prompt(fx).assign_coords(prompt=chosen))
        per_head.append(xr.concat(parts, dim="prompt").sortby("prompt"))
    return stack_heads(per_head, [str(h) for h in captured["head"].values])


def _answer_swaps(
    lm: Any,
    prompts: list[Prompt],
    loc: Located,
    first: Located,
    captured: xr.Dataset,
    subspaces: xr.Dataset,
    n_random: int,
    seed: int,
    batch_size: int,
    progress: bool,
) -> xr.Dataset:
    """The category swap written into the model, per head and in all heads together: does the
    model's answer move from the attended item to the other category's item?

    Per prompt, orig is the asked category's item that the chosen heads attend to most in
    total (one item for every head set), target the same other-category item as `_swaps`. The
    candidate answers are the items' first tokens as they appear in the list; the answer is
    orig's, the target's answer target's.
    """
    rng = np.random.default_rng(seed + 2)  # the same targets as `_swaps`
    cats = [p.meta["item_categories"] for p in prompts]
    asked = [p.meta["asked"] for p in prompts]
    target_slot = [
        int(rng.choice([j for j, c in enumerate(row) if c != a]))
        for row, a in zip(cats, asked, strict=True)
    ]
    attention = captured["attention"].isel(query=0).sum("head").transpose("prompt", "key").values
    items = loc.positions["item"]
    candidates = [
        [ids[pos] for pos in row]
        for ids, row in zip(first.ids, first.positions["item"], strict=True)
    ]
    parts = []
    for category in subspaces["feature"].values:
        chosen = [i for i, a in enumerate(asked) if a == category]
        if not chosen:
            continue
        orig_slot = [
            max(
                (j for j, c in enumerate(cats[i]) if c == category),
                key=lambda j, i=i: attention[i, j],
            )
            for i in chosen
        ]
        bases = {
            str(h): trimmed(
                subspaces["key_basis"]
                .sel(head=h, feature=category)
                .transpose("dk", "component")
                .values
            )
            for h in captured["head"].values
        }
        fx = answer_effects(
            lm,
            [loc.ids[i] for i in chosen],
            bases,
            candidates=[candidates[i] for i in chosen],
            answer=orig_slot,
            target_answer=[target_slot[i] for i in chosen],
            orig=[items[i][s] for i, s in zip(chosen, orig_slot, strict=True)],
            target=[items[i][target_slot[i]] for i in chosen],
            name="category",
            n_random=n_random,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
        )
        parts.append(answer_per_prompt(fx).assign_coords(prompt=chosen))
    per_prompt_fx = xr.concat(
        parts, dim="prompt", data_vars="all", coords="different", compat="equals"
    ).sortby("prompt")
    return per_prompt_fx.merge(answer_summary(per_prompt_fx))


# --------------------------------------------------------------------------------------------
# figures, from the store


def plot(path: str | Path) -> list[Path]:
    """Draw the study's figures from ``filter_heads.zarr``; PNGs are saved next to it.

    ``filter_heads_ranks.png`` (rank per head and category), ``filter_heads_pca.png`` (item
    keys in the union of category key subspaces, coloured by category; Fig 6) and
    ``filter_heads_swap.png`` (category swap vs random subspaces; Fig 7) and
    ``filter_heads_answer.png`` (what that swap does to the model's answer, per head and in all
    heads together, vs random subspaces).
    """
    from qktrace import store

    path = Path(path)
    ds = store.open(path).load()
    figures = {
        "filter_heads_ranks.png": rank_figure(ds, "Category subspace ranks"),
        "filter_heads_pca.png": pca_figure(
            ds, "category", title="Item keys in the union of category key subspaces"
        ),
        "filter_heads_swap.png": swap_bars(
            ds, "category", title="Swap of the asked category's key coordinates"
        ),
    }
    if "answer_flip_rate" in ds:
        figures["filter_heads_answer.png"] = answer_bars(
            ds, "category", title="The model's answer after the category swap"
        )
    return save_figures(figures, path.parent)
