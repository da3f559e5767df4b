"""The boxes task shared by the binding studies (paper §3.2-3.3): prompts, labels, counterfactuals.

Prompt (``n_pairs`` object-box pairs, 9 in the paper)::

    The stone is in Box K, the map is in Box C, ..., and the coin is in Box T.
    Which box is the map in?

followed by the answer prefix "Box" (after the chat template's generation prompt for instruct
models), whose token is the query. Spans: ``object`` (each object in the context), ``box``
(each box letter, the keys), ``query_object`` (the object in the question). Objects and letters
are drawn without repetition per prompt; the answer's order index (its pair's position in the
list) cycles through 0..n_pairs-1 so every position is asked equally often.

The prompt builders (`boxes_prompt`, `build_prompts`) live in `qktrace.prompts` (as
`boxes_prompt`, `boxes_prompts`), re-exported here; `studies.order_id` and `studies.lexical`
build on this module.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from qktrace.prompts import BOXES_ANSWER_PREFIX as ANSWER_PREFIX
from qktrace.prompts import Located, Prompt, boxes_prompt, load_box_letters, load_objects
from qktrace.prompts import boxes_prompts as build_prompts
from studies._common import (
    answer_bars,
    answer_effects,
    answer_per_prompt,
    answer_summary,
    pca_figure,
    per_prompt,
    rank_figure,
    save_figures,
    stack_heads,
    swap_bars,
    trimmed,
)

# the builders live in `qktrace.prompts` (the organism's training data uses them too)
__all__ = [
    "ANSWER_PREFIX",
    "boxes_prompt",
    "build_prompts",
    "check_pairs",
    "counterfactuals",
    "order_labels",
    "key_labels",
    "targets",
    "swaps",
    "answer_swaps",
    "find",
    "plot",
]


def check_pairs(n_pairs: int) -> None:
    """The binding contrasts need a second box: its key is the negative, and the swap target."""
    from qktrace import checks

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
    objects = load_objects()
    rng = np.random.default_rng(seed)
    out = []
    for p in prompts:
        unused = [o for o in objects if o not in p.meta["objects"]]
        swapped = list(p.meta["objects"])
        swapped[p.meta["answer"]] = str(rng.choice(unused))
        out.append(boxes_prompt(swapped, p.meta["letters"], p.meta["answer"]))
    return out


def order_labels(prompts: Sequence[Prompt]) -> list[list[tuple[str, str]]]:
    """Per prompt, per box key: ("order", "positive") for the answer's box, else "negative"."""
    return [
        [
            ("order", "positive" if j == p.meta["answer"] else "negative")
            for j in range(len(p.meta["letters"]))
        ]
        for p in prompts
    ]


def key_labels(prompts: Sequence[Prompt]) -> dict[str, Any]:
    """Coordinates of every box key: order index, bound object, letter, positive/negative."""
    n = len(prompts[0].meta["letters"])
    answer = np.array([p.meta["answer"] for p in prompts])
    return {
        "order": (("prompt", "key"), np.tile(np.arange(n), (len(prompts), 1))),
        "object": (("prompt", "key"), np.array([p.meta["objects"] for p in prompts], dtype=object)),
        "box": (("prompt", "key"), np.array([p.meta["letters"] for p in prompts], dtype=object)),
        "key_label": (
            ("prompt", "key"),
            np.where(np.arange(n)[None, :] == answer[:, None], "positive", "negative").astype(
                object
            ),
        ),
        "answer": ("prompt", answer),
        "text": ("prompt", np.array([p.text for p in prompts], dtype=object)),
        "query_object": (
            "prompt",
            np.array([p.meta["query_object"] for p in prompts], dtype=object),
        ),
    }


def targets(prompts: Sequence[Prompt], *, seed: int = 0) -> list[int]:
    """Per prompt, the order index of a random box other than the answer's (swap target)."""
    rng = np.random.default_rng(seed)
    out = []
    for p in prompts:
        others = [j for j in range(len(p.meta["letters"])) if j != p.meta["answer"]]
        out.append(int(rng.choice(others)) if others else p.meta["answer"])
    return out


def swaps(
    captured: xr.Dataset,
    prompts: Sequence[Prompt],
    loc: Located,
    subspaces: xr.Dataset,
    feature: str,
    *,
    n_random: int,
    seed: int,
) -> xr.Dataset:
    """Per head: swap `feature` key coordinates between the answer's box and another box.

    The orig key is the answer's box letter, the target a random other box letter (the same for
    every head); the effect of the swap is compared with `n_random` random subspaces of the
    same rank. Computed from the captured box keys (`captured`, with attention) with no
    forward pass (`qktrace.interventions.intervene_captured`, equal to the in-trace edit).
    Returns per-prompt effects stacked over heads, with per-head summaries.
    """
    from qktrace.interventions import intervene_captured

    boxes = loc.positions["box"]
    answer = [p.meta["answer"] for p in prompts]
    target = targets(prompts, seed=seed + 2)
    per_head = []
    for head in subspaces["head"].values:
        fx = intervene_captured(
            captured,
            str(head),
            subspaces["key_basis"].sel(head=head, feature=feature),
            name=feature,
            orig=[row[a] for row, a in zip(boxes, answer, strict=True)],
            target=[row[t] for row, t in zip(boxes, target, strict=True)],
            mode="swap",
            n_random=n_random,
            seed=seed,
        )
        per_head.append(per_prompt(fx))
    return stack_heads(per_head, [str(h) for h in subspaces["head"].values])


def answer_swaps(
    lm: Any,
    prompts: Sequence[Prompt],
    loc: Located,
    subspaces: xr.Dataset,
    feature: str,
    *,
    n_random: int,
    seed: int,
    batch_size: int,
    progress: bool = True,
) -> xr.Dataset:
    """The same swap as `swaps` (answer box <-> target box, in the `feature` key subspace),
    written into the model, per head and in all heads together: does its answer move to the
    target's letter?

    The candidate answers are the box letters' tokens as they appear in the prompt (the
    model continues "Box" with one of them); the answer is the queried box's letter, the
    target's answer the target box's letter. Returns per-prompt answer-level effects with their
    summaries (`studies._common.answer_effects`).
    """
    boxes = loc.positions["box"]
    answer = [p.meta["answer"] for p in prompts]
    target = targets(prompts, seed=seed + 2)
    bases = {
        str(h): trimmed(
            subspaces["key_basis"].sel(head=h, feature=feature).transpose("dk", "component").values
        )
        for h in subspaces["head"].values
    }
    effects = answer_effects(
        lm,
        loc.ids,
        bases,
        candidates=[[ids[pos] for pos in row] for ids, row in zip(loc.ids, boxes, strict=True)],
        answer=answer,
        target_answer=target,
        orig=[row[a] for row, a in zip(boxes, answer, strict=True)],
        target=[row[t] for row, t in zip(boxes, target, strict=True)],
        name=feature,
        n_random=n_random,
        seed=seed,
        batch_size=batch_size,
        progress=progress,
    )
    return answer_per_prompt(effects).merge(answer_summary(effects))


def find(
    lm: Any, prompts: Sequence[Prompt], loc: Located, batch_size: int, progress: bool = True
) -> xr.Dataset:
    """Every head ranked by how much its last-token query attends to the answer's box letter."""
    from qktrace.heads import find_heads

    boxes = loc.positions["box"]
    answer = [row[p.meta["answer"]] for row, p in zip(boxes, prompts, strict=True)]
    return find_heads(
        lm, loc.ids, answer, keys=boxes, top=None, batch_size=batch_size, progress=progress
    )


def plot(path: str | Path, study: str, feature: str, hues: Sequence[str]) -> list[Path]:
    """Figures of a binding store, saved next to it as ``<study>_<what>.png``.

    ``_ranks`` (rank per head and feature), ``_pca_<hue>`` for each key coordinate in `hues`
    (box keys in the `feature` key subspace, coloured by order index or bound object; Fig 8),
    ``_swap`` (the `feature` swap vs random subspaces; Fig 9) and ``_answer`` (what the
    swap does to the model's answer, per head and in all heads together, vs random subspaces).
    """
    from qktrace import store

    path = Path(path)
    ds = store.open(path).load()
    figures = {
        f"{study}_ranks.png": rank_figure(ds, "Binding subspace ranks"),
        f"{study}_swap.png": swap_bars(
            ds, feature, title=f"Swap of {feature} key coordinates: answer box <-> another box"
        ),
    }
    if "answer_flip_rate" in ds:
        figures[f"{study}_answer.png"] = answer_bars(
            ds,
            feature,
            title=f"The model's answer after the {feature} swap (answer <-> another box)",
        )
    for hue in hues:
        figures[f"{study}_pca_{hue}.png"] = pca_figure(
            ds, hue, title=f"Box keys in the {feature} key subspace, coloured by {hue}"
        )
    return save_figures(figures, path.parent)
