"""Order-ID binding: the query-key subspace that carries *which position* a box is in (paper §3.2, Fig 8).

Method
------
1. **Prompts** (`studies.binding`): "The stone is in Box K, the map is in Box C, ..., and the
   coin is in Box T. Which box is the map in?" + "Box", with ``n_pairs`` pairs (paper: 9).
   To isolate order, the queried object is the SAME in every prompt (``query_object``; drawn
   with the seed if not given) while its position, the answer's order index, cycles through
   all positions; the other objects and all letters are random.
2. **Contrast.** Query: the last token ("Box"). Keys: the box-letter tokens. Positive: the key of
   the answer's box; negative: the keys of the other boxes. One ΔC per head (feature "order"),
   summed in the trace (`qktrace.sums`), then SVD and the 99% rank rule (`qktrace.decompose`).
   **Significance:** `qktrace.covariance.permutation_null` on the fresh prompts' (query, box
   key) pairs: ``null_rank`` counts the leading components above the null's 95th percentile.
3. **Geometry (Fig 8).** On ``n_test`` fresh prompts the box keys are captured and projected on
   the order key subspace; their PCA, coloured by order index (and by bound object), shows
   whether keys line up by position.
4. **Causal check (Fig 9).** Swap the order-subspace coordinates of the answer's box key and of
   another box key (`qktrace.interventions`) and measure where the attention goes, against random
   subspaces of the same rank.
5. **Store** ``OUT/order_id.zarr`` (feature "order"); figures drawn from it, saved beside it.

Example
-------
    qktrace study order-id --model meta-llama/Llama-3.1-8B-Instruct --remote --n-prompts 2000 \\
        --out out/binding
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from qktrace.covariance import decompose
from qktrace.locks import one_writer
from qktrace.models import Head, Model, Remote
from qktrace.prompts import load_objects, locate
from qktrace.qk import capture
from qktrace.sums import reduce
from studies import binding
from studies._common import (
    N_RANDOM_ANSWERS,
    ModelLike,
    captured_pairs,
    check_design,
    check_out,
    choose_heads,
    default_model,
    heads_source,
    null_test,
    open_model,
    sizes,
    subspace_pca,
    trimmed,
    write,
)

STUDY = "order_id"


def default_query_object(seed: int) -> str:
    """The object every order-ID prompt asks about, drawn from data/objects.json with `seed`."""
    objects = load_objects()
    return str(objects[np.random.default_rng(seed).integers(len(objects))])


def order_subspaces(
    lm: Model,
    heads: Sequence[Head],
    *,
    n_prompts: int,
    n_pairs: int,
    query_object: str,
    threshold: float,
    batch_size: int,
    seed: int,
    chat: bool | None,
    sums_out: Path | None = None,
    progress: bool = True,
) -> xr.Dataset:
    """Steps 1-2: the order-ID ΔC of every head, decomposed (feature "order"), with its sums."""
    prompts = binding.build_prompts(n_prompts, n_pairs, query_object=query_object, seed=seed)
    loc = locate(lm.tokenizer, prompts, chat=chat)
    sums = reduce(
        lm,
        loc.ids,
        list(heads),
        binding.order_labels(prompts),
        keys=loc.positions["box"],
        batch_size=batch_size,
        out=sums_out,
        progress=progress,
    )
    return decompose(sums, threshold=threshold).merge(sums[["qk_sum", "q_sum", "k_sum"]])


@one_writer(f"{STUDY}.zarr")
def run(
    model: ModelLike | None = None,
    *,
    out: str | Path,
    heads: str | Sequence[Any] | None = None,
    n_prompts: int | None = None,
    n_test: int | None = None,
    n_pairs: int = 9,
    query_object: str | None = None,
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
    """Find the order-ID subspace of binding heads; check it by PCA and by swaps.

    Parameters
    ----------
    model
        A `qktrace.load`-ed model, or a hub id / local path (loaded with `remote`); default:
        the organism shipped in data/organism (`qktrace.organism`).
    out
        Directory for ``order_id.zarr`` and its figures.
    heads
        Default: the organism's binding heads on the organism, the paper's binding heads for
        Llama-3.1-8B-Instruct, else found with `qktrace.find_heads`.
    n_prompts, n_test
        Prompts for the subspace; fresh prompts for PCA and swaps. Default 2000 and 500; 900
        and 270 on the organism (11-29 s each on 2 idle CPU cores).
    n_pairs
        Object-box pairs per prompt (paper: 9).
    query_object
        The object every prompt asks about (default: drawn from the objects with `seed`).
    threshold, n_random, n_random_answers, batch_size, seed, remote, chat, figures, overwrite
        As in `studies.filter_heads.run`.

    Returns
    -------
    Path of ``OUT/order_id.zarr``.
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
    checkpoint = check_out(path, overwrite)
    query_object = query_object or default_query_object(seed)
    test = binding.build_prompts(n_test, n_pairs, query_object=query_object, seed=seed + 1)
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
        "query_object": query_object,
        "threshold": threshold,
        "n_random": n_random,
        "n_random_answers": n_random_answers,
        "batch_size": batch_size,
        "chat": chat,
    }

    # 1-2. order-ID ΔC per head
    subspaces = order_subspaces(
        lm,
        head_list,
        n_prompts=n_prompts,
        n_pairs=n_pairs,
        query_object=query_object,
        threshold=threshold,
        batch_size=batch_size,
        seed=seed,
        chat=chat,
        sums_out=checkpoint,
        progress=progress,
    )

    # 3. box keys of fresh prompts in the order subspace
    captured = capture(
        lm,
        test_loc.ids,
        head_list,
        keys=test_loc.positions["box"],
        batch_size=batch_size,
        progress=progress,
    ).assign_coords(binding.key_labels(test))
    geometry = pca(captured, subspaces, "order")
    null = null_test(
        {(str(h), "order"): captured_pairs(captured, h) for h in captured["head"].values},
        seed=seed,
        threshold=threshold,
        d_head=lm.d_head,
    )

    # 4. order swap vs random subspaces
    effects = binding.swaps(
        captured, test, test_loc, subspaces, "order", n_random=n_random, seed=seed
    )
    # what the swap does to the model's answer, per head and in all heads together
    answers = binding.answer_swaps(
        lm,
        test,
        test_loc,
        subspaces,
        "order",
        n_random=n_random_answers,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
    )

    ds = xr.merge(
        [subspaces, null, captured, geometry, effects, ranking, answers],
        compat="override",
        combine_attrs="drop",
    )
    params.update(ranking.attrs)  # how the heads were ranked, when find_heads chose them
    write(ds, path, study=STUDY, params=params, model=lm, seed=seed, overwrite=overwrite)
    if figures:
        plot(path)
    return path


def pca(captured: xr.Dataset, subspaces: xr.Dataset, feature: str, n_pc: int = 3) -> xr.Dataset:
    """Per head: PCA of the captured keys inside the key subspace of `feature`."""
    projections, ratios = [], []
    for head in captured["head"].values:
        basis = trimmed(
            subspaces["key_basis"]
            .sel(head=head, feature=feature)
            .transpose("dk", "component")
            .values
        )
        keys = captured["k"].sel(head=head).transpose("prompt", "key", "d_head").values
        proj, ratio = subspace_pca(keys.astype(np.float64), basis, n_pc)
        projections.append(proj)
        ratios.append(ratio)
    return xr.Dataset(
        {
            "key_pc": (("head", "prompt", "key", "pc"), np.stack(projections)),
            "pc_variance_ratio": (("head", "pc"), np.stack(ratios)),
        },
        coords={"head": captured["head"].values, "pc": np.arange(1, n_pc + 1)},
    )


def plot(path: str | Path) -> list[Path]:
    """Draw the order-ID figures from ``order_id.zarr`` (see `studies.binding.plot`)."""
    return binding.plot(path, STUDY, "order", hues=("order", "object"))
