"""The boxes task shared by the binding studies (paper §3.2-3.3): prompts, labels, counterfactuals.

Prompt (``n_pairs`` object-box pairs, 9 in the paper)::

    The stone is in Box K, the map is in Box C, ..., and the coin is in Box T.
    Which box is the map in?

followed by the answer prefix "Box" (after the chat template's generation prompt for instruct
models), whose token is the query. Spans: ``object`` (each object in the context), ``box``
(each box letter, the keys), ``query_object`` (the object in the question). Objects and letters
are drawn without repetition per prompt; the answer's order index (its pair's position in the
list) cycles through 0..n_pairs-1 so every position is asked equally often.

The prompt builders (`boxes_prompt`, `build_prompts`) live in `qktrace.core.prompts` (as
`boxes_prompt`, `boxes_prompts`), re-exported here; `studies.order_id` and `studies.lexical`
build on this module.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from qktrace.core.prompts import BOXES_ANSWER_PREFIX as ANSWER_PREFIX
from qktrace.core.prompts import Prompt, boxes_prompt, load_box_letters, load_objects, locate
from qktrace.core.prompts import boxes_prompts as build_prompts
from qktrace.model.loading import Head, Model
from qktrace.verbs.decompose import decompose
from qktrace.verbs.reduce import reduce, stored_sums, study_options

# the help of --n-pairs (`qktrace study order-id --help`, lexical)
PAIRS_HELP = "Object-box pairs per prompt (the paper's 9)."

# the settings an order-ID subspace must share with the lexical run that reuses it
REUSE_KEYS = ("n_pairs", "threshold", "chat")

# the builders live in `qktrace.core.prompts` (the organism's training data uses them too)
__all__ = [
    "ANSWER_PREFIX",
    "boxes_prompt",
    "build_prompts",
    "check_pairs",
    "counterfactuals",
    "order_labels",
    "counterfactual",
    "order_subspaces",
    "reusable_order_subspace",
]


def check_pairs(n_pairs: int) -> None:
    """The binding contrasts need a second box: its key is the negative, and the swap target."""
    from qktrace.core import checks

    letters = len(load_box_letters())
    checks.integer("n_pairs", n_pairs, flag="--n-pairs", example="9")
    if not 2 <= n_pairs <= letters:
        raise checks.BadArgument(
            f"n_pairs={n_pairs} (CLI --n-pairs) must be between 2 and {letters}: the other "
            "boxes' keys are the negatives of the contrast and the targets of the swaps, and "
            f"there are {letters} box letters; pass e.g. n_pairs=9 (the paper's)."
        )


def counterfactuals(prompts: Sequence[Prompt], *, seed: int = 0) -> list[Prompt]:
    """Each prompt with its queried object replaced, in context and question, by an unused one.

    Everything else (the other objects, every letter, the answer's position) stays the same.
    """
    rng = np.random.default_rng(seed)
    return [counterfactual(p, rng) for p in prompts]


def counterfactual(prompt: Prompt, rng: np.random.Generator) -> Prompt:
    """`prompt` with its queried object replaced by one it does not use, drawn with `rng`."""
    unused = [o for o in load_objects() if o not in prompt.meta["objects"]]
    swapped = list(prompt.meta["objects"])
    swapped[prompt.meta["answer"]] = str(rng.choice(unused))
    return boxes_prompt(swapped, prompt.meta["letters"], prompt.meta["answer"])


def order_labels(prompts: Sequence[Prompt]) -> list[list[tuple[str, str]]]:
    """Per prompt, per box key: ("order", "positive") for the answer's box, else "negative"."""
    return [
        [
            ("order", "positive" if j == p.meta["answer"] else "negative")
            for j in range(len(p.meta["letters"]))
        ]
        for p in prompts
    ]


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
    prompts = build_prompts(n_prompts, n_pairs, query_object=query_object, seed=seed)
    loc = locate(lm.tokenizer, prompts, chat=chat)
    sums = reduce(
        lm,
        loc.ids,
        list(heads),
        order_labels(prompts),
        keys=loc.positions["box"],
        batch_size=batch_size,
        out=sums_out,
        progress=progress,
        **study_options(lm),
    )
    return decompose(sums, threshold=threshold).merge(sums[stored_sums(sums)])


def reusable_order_subspace(
    path: Path, stored: xr.Dataset, model: str, heads: Sequence[str], params: Mapping[str, Any]
) -> bool:
    """Whether the order-ID store `stored` (at `path`) holds the order subspace of this run:
    the same model (any copy of the organism), heads among its own, and the same pairs,
    threshold and chat setting. When not, a warning names each difference (store.check_same_run)."""
    from qktrace import store
    from qktrace.study.tools import is_organism

    def facts(model: str, heads: Sequence[str], p: Mapping[str, Any]) -> dict[str, Any]:
        model = "the organism" if is_organism(model) else model
        return {"model": model, "heads": list(heads), **{k: p.get(k) for k in REUSE_KEYS}}

    have = {str(h) for h in stored["head"].values}
    old = facts(str(stored.attrs.get("model")), [h for h in heads if h in have],
                stored.attrs.get("params") or {})  # fmt: skip
    try:
        store.check_same_run(
            path, old, facts(model, heads, params), what="the order-ID subspace",
            fix="lexical computes the order subspace itself instead. To reuse it, run order-id "
            "first with these parameters and the same --out (--overwrite).",
        )  # fmt: skip
    except store.DifferentRunError as err:
        warnings.warn(str(err), stacklevel=2)
        return False
    return True


def attribution_figures(ds: xr.Dataset) -> dict[str, Any]:
    """Figures of a boxes store with a logit attribution (``logit_part``, ``explained``; the
    lexical study's Fig 10), as {name: Figure}: ``attribution``, each key's logit split into
    order, lexical and residual parts, averaged over prompts for the answer's box and the other
    boxes; ``attribution_example``, the same for the first prompt."""
    from qktrace.study import plots

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
        "attribution": plots.stacked_bars(
            mean_parts.transpose("head", "key", "part"),
            x="key",
            stack="part",
            row="head",
            panel_title=title,
            ylabel="attention logit",
            title="Attention logits split into order, lexical and residual parts",
        ),
        "attribution_example": plots.stacked_bars(
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
    return figures
