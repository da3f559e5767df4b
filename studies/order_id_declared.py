"""Order-ID binding (paper §3.2, Fig 8) declared as a `qktrace.pipeline.Study`.

The same design as `studies.order_id` (which it will replace once the three studies are
ported): boxes prompts whose queried object is the same in every prompt while its position
cycles; query the last token, keys the box letters; positive the answer's box, negative the
other boxes (feature "order"); the swap exchanges the answer's box key with another box's.
Everything else is the shared pipeline's.

    from studies.order_id_declared import order_id
    order_id(n_pairs=9).run(out="out/organism")     # the organism; or .run(model, ...)
"""

from __future__ import annotations

from typing import Any

from qktrace.models import Model
from qktrace.pipeline import Study
from qktrace.prompts import Prompt
from studies import binding
from studies._common import PAPER_HEADS, PAPER_MODEL, is_organism
from studies.order_id import default_query_object


def order_id(n_pairs: int = 9, query_object: str | None = None, seed: int = 0) -> Study:
    """The order-ID study with `n_pairs` boxes per prompt, asking every prompt for one object.

    `query_object` defaults to the one `studies.order_id` draws with `seed`.
    """
    binding.check_pairs(n_pairs)
    asked = query_object or default_query_object(seed)

    def prompts(n: int, seed: int) -> list[Prompt]:
        return binding.build_prompts(n, n_pairs, query_object=asked, seed=seed)

    def labels(prompt: Prompt) -> list[tuple[str, str]]:
        return binding.order_labels([prompt])[0]

    def coords(prompt: Prompt) -> dict[str, Any]:
        meta = prompt.meta
        return {
            "order": list(range(len(meta["letters"]))),
            "object": meta["objects"],
            "box": meta["letters"],
            "answer": meta["answer"],
            "query_object": meta["query_object"],
        }

    def heads(model: Model) -> str | None:
        if is_organism(model):
            from qktrace import organism

            return organism.heads("binding")
        return PAPER_HEADS["binding"] if PAPER_MODEL in model.name.lower() else None

    return Study(
        name="order_id",
        prompts=prompts,
        keys="box",
        labels=labels,
        coords=coords,
        answers=lambda prompt: prompt.meta["letters"],
        hues=("order", "object"),
        heads=heads,
        n_prompts=2000,
        n_test=500,
        options={"n_pairs": n_pairs, "query_object": asked},
    )


study = order_id()
