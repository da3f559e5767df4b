"""Order-ID binding: the query-key subspace that carries *which position* a box is in (paper §3.2, Fig 8).

Method
------
1. **Prompts** (`studies.binding`): "The stone is in Box K, the map is in Box C, ..., and the
   coin is in Box T. Which box is the map in?" + "Box", with ``n_pairs`` pairs (paper: 9).
   To isolate order, the queried object is the SAME in every prompt (``query_object``; drawn
   with the seed if not given) while its position, the answer's order index, cycles through
   all positions; the other objects and all letters are random.
2. **Contrast.** Query: the last token ("Box"). Keys: the box-letter tokens. Positive: the key of
   the answer's box; negative: the keys of the other boxes. One ΔC per head (feature "order").
3. **The rest is the shared pipeline** (`qktrace.study.pipeline`): sums in the trace (resumable), SVD
   and the 99% rank rule, the permutation null (``null_rank``), PCA of fresh prompts' box keys
   coloured by order index and by object (Fig 8), the swap of the answer's box key with another
   box key against random subspaces (Fig 9): attention, and the model's answer (the box
   letters as candidates). Store ``OUT/order_id.zarr``, figures beside it.

Example
-------
    qktrace study order-id --model meta-llama/Llama-3.1-8B-Instruct --remote --n-prompts 2000 \\
        --out out/binding
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from qktrace.core import checks
from qktrace.core.prompts import Prompt, load_objects
from qktrace.studies import binding
from qktrace.studies._common import paper_heads, sizes
from qktrace.study import Study, StudyOption
from qktrace.study.tools import ModelLike

STUDY = "order_id"
QUERY_OBJECT_HELP = "The object every prompt asks about [default: drawn with --seed]."


def default_query_object(seed: int) -> str:
    """The object every order-ID prompt asks about, drawn from data/objects.json with `seed`."""
    objects = load_objects()
    return str(objects[np.random.default_rng(seed).integers(len(objects))])


def order_id(n_pairs: int = 9, query_object: str | None = None, seed: int = 0) -> Study:
    """The order-ID study: `n_pairs` boxes per prompt, every prompt asking for one object
    (default: the one drawn with `seed`)."""
    binding.check_pairs(n_pairs)
    if not query_object and seed < 0:  # refused here, before numpy refuses to draw with it
        raise checks.BadArgument(f"seed={seed} (CLI --seed) is negative (numpy seeds are >= 0); "
                                 "pass e.g. 0.")  # fmt: skip
    asked = query_object or default_query_object(seed)

    def prompts(n: int, seed: int) -> list[Prompt]:
        return binding.build_prompts(n, n_pairs, query_object=asked, seed=seed)

    def coords(prompt: Prompt) -> dict[str, Any]:
        meta = prompt.meta
        return {
            "order": list(range(len(meta["letters"]))),
            "object": meta["objects"],
            "box": meta["letters"],
            "answer": meta["answer"],
            "query_object": meta["query_object"],
        }

    return Study(
        name=STUDY,
        prompts=prompts,
        keys="box",
        labels=lambda prompt: binding.order_labels([prompt])[0],
        coords=coords,
        answers="keys",  # the box letters as the prompt writes them
        hues=("order", "object"),
        heads=lambda model: paper_heads(model, "binding"),
        sizes=lambda model: sizes(model, STUDY, None, None),
        options={
            "n_pairs": StudyOption(n_pairs, binding.PAIRS_HELP),
            "query_object": StudyOption(asked, QUERY_OBJECT_HELP, str),
        },
        make=order_id,
    )


def run(
    model: ModelLike | None = None,
    *,
    out: str | Path,
    n_pairs: int = 9,
    query_object: str | None = None,
    seed: int = 0,
    **settings: Any,
) -> Path:
    """Find the order-ID subspace of binding heads; check it by PCA and by swaps.

    `n_pairs`: object-box pairs per prompt (paper: 9); `query_object`: the object every prompt
    asks about (default: drawn with `seed`). Heads: the organism's on the organism, the paper's
    for Llama-3.1-8B-Instruct, else found with `qktrace.find_heads`. Sizes: 900 / 270 on the
    organism, 300 / 100 on smollm2, else 2000 / 500. The other settings are
    `qktrace.study.pipeline.run_study`'s. Returns the path of ``OUT/order_id.zarr``.
    """
    study = order_id(n_pairs, query_object, seed)
    return study.run(model, out=out, seed=seed, **settings)


study = order_id()  # the default design, for load_study("qktrace.studies.order_id")
