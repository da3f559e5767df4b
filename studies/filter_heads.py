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
   trace (`qktrace.verbs.reduce`) and decomposed (`qktrace.decompose`): SVD, 99% rank rule, query
   and key bases. Positives are all items of the asked category for every question variant.
   **Significance:** `qktrace.verbs.decompose.permutation_null` on the fresh prompts' (query, item)
   pairs (labels shuffled 100 times): ``null_rank`` counts the leading components above the
   null's 95th percentile.
3. **Geometry (Fig 6).** On ``n_test`` fresh prompts, the item keys are captured and projected
   onto the union of all category key subspaces of the head; a PCA of those coordinates,
   coloured by item category, shows whether keys cluster by category.
4. **Causal check (Fig 7).** On the same fresh prompts, per head: the *attended* item is the
   item of the asked category with the highest attention from the query; the *target* is an
   item of another category (drawn at random). Their coordinates inside the asked category's
   key subspace are swapped (`qktrace.verbs.intervene`, mode "swap", key side), and the change of
   p(target | {orig, target}) and the flip rate (attention argmax moves from orig to target)
   are compared with random subspaces of the same rank.
   The same swap is then written into the model (`qktrace.intervene_answers`), per head and in
   all heads together (orig: the item the heads attend to most in total): does the model's
   answer move from the attended item to the target item (their first tokens as candidates)?
5. **Store.** Everything lands in ``OUT/filter_heads.zarr`` (labelled, with provenance); the
   figures are drawn from that store and saved beside it. Steps 2-5 are the shared pipeline's
   (`qktrace.study.pipeline`); this file declares the prompts, labels, answer key and swap.

Paper settings: Llama-3.1-8B-Instruct, heads 16.19, 20.26, 20.14; 2000 prompts for the
subspaces and 1000 for the interventions; five items per category.

Example
-------
    qktrace study filter-heads --model meta-llama/Llama-3.1-8B-Instruct --remote \\
        --n-prompts 2000 --n-test 1000 --out out/filter_heads
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from qktrace.core import checks
from qktrace.core.prompts import FILTER_CATEGORIES, FILTER_QUESTIONS, Prompt
from qktrace.core.prompts import filter_prompts as build_prompts
from qktrace.studies._common import paper_heads, sizes
from qktrace.study import Study, StudyOption
from qktrace.study.tools import ModelLike

STUDY = "filter_heads"
CATEGORIES = FILTER_CATEGORIES
QUESTIONS = FILTER_QUESTIONS

# the help of its options on the command line (`qktrace study filter-heads --help`)
CATEGORIES_HELP = "Comma-separated categories (more in data/categories.json)."
LEAD_IN_HELP = (
    "End each prompt with the start of its answer ('The first fruit in the list is'), so that "
    "the model's next token is an item and the answer-level swaps read what it says (the query "
    "is then the lead-in's last token)."
)


def labels(prompts: Sequence[Prompt]) -> list[list[tuple[str, str]]]:
    """Per prompt, per item key: (asked category, "positive" if the item is of it else "negative")."""
    return [
        [
            (p.meta["asked"], "positive" if cat == p.meta["asked"] else "negative")
            for cat in p.meta["item_categories"]
        ]
        for p in prompts
    ]


def filter_heads(
    categories: Sequence[str] = CATEGORIES,
    categories_per_list: int | None = None,
    items_per_category: int = 5,
    questions: Iterable[str] = QUESTIONS,
    answer_lead_in: bool = False,
) -> Study:
    """The filter-heads study with this prompt design (see `build_prompts`)."""
    design: dict[str, Any] = dict(
        categories=list(categories),
        categories_per_list=min(3, len(categories)) if categories_per_list is None
        else categories_per_list,
        items_per_category=items_per_category,
        questions=list(questions),
        answer_lead_in=bool(answer_lead_in),
    )  # fmt: skip

    def of_asked(prompt: Prompt) -> list[int]:
        meta = prompt.meta
        return [j for j, c in enumerate(meta["item_categories"]) if c == meta["asked"]]

    def answer(prompt: Prompt) -> int:
        """The answered item: the asked category's first ("all", "first") or last ("last")."""
        return of_asked(prompt)[-1 if prompt.meta["question"] == "last" else 0]

    def swap(prompt: Prompt, rng: np.random.Generator) -> tuple[list[int], int]:
        """Orig: the asked category's item attended most; target: another category's item."""
        asked = of_asked(prompt)
        others = [j for j in range(len(prompt.meta["items"])) if j not in asked]
        return asked, int(rng.choice(others))

    def coords(prompt: Prompt) -> dict[str, Any]:
        meta = prompt.meta
        return {"item": meta["items"], "category": meta["item_categories"],
                "asked": meta["asked"], "question": meta["question"]}  # fmt: skip

    return Study(
        name=STUDY,
        prompts=lambda n, seed: build_prompts(n, seed=seed, **design),
        keys="item",
        labels=lambda prompt: labels([prompt])[0],
        answer=answer,
        swap=swap,
        subspace="category",
        coords=coords,
        answers="keys",  # each item's first token, as the list writes it
        hues=("category",),
        heads=lambda model: paper_heads(model, STUDY),
        sizes=lambda model: sizes(model, STUDY, None, None),
        options={
            **design,
            "categories": StudyOption(design["categories"], CATEGORIES_HELP, list),
            "answer_lead_in": StudyOption(design["answer_lead_in"], LEAD_IN_HELP, bool),
        },
        make=filter_heads,
    )


def run(
    model: ModelLike | None = None,
    *,
    out: str | Path,
    categories: Sequence[str] = CATEGORIES,
    categories_per_list: int | None = None,
    items_per_category: int = 5,
    questions: Iterable[str] = QUESTIONS,
    answer_lead_in: bool = False,
    n_prompts: int | None = None,
    **settings: Any,
) -> Path:
    """Find each category's query/key subspace in filter heads; check it by PCA and by swaps.

    Heads: the organism's on the organism, the paper's (16.19, 20.26, 20.14) for
    Llama-3.1-8B-Instruct, else found with `qktrace.find_heads`. Sizes: 900 / 300 on the
    organism, 300 / 100 on smollm2, else the paper's 2000 / 1000. `answer_lead_in`: end each
    prompt with the answer's start ("The first fruit in the list is"), so that the query is its
    last token and the model's next token an item (the answer-level swaps then read what the
    model says; the contrasts are then taken at that query). The other settings are
    `qktrace.study.pipeline.run_study`'s. Returns the path of ``OUT/filter_heads.zarr``.
    """
    if isinstance(categories, str):
        raise checks.BadArgumentType(
            f"categories={categories!r} is one string; pass a list, e.g. "
            f"categories={categories.split(',')!r} (CLI: --categories fruit,animal)."
        )
    categories = checks.unique("categories", list(categories), flag="--categories")
    check_categories(categories)
    if n_prompts is not None and n_prompts < len(categories):
        raise checks.BadArgument(
            f"n_prompts={n_prompts} (CLI --n-prompts) is too few: the asked category cycles "
            f"through the {len(categories)} categories, so fewer prompts leave a category "
            f"without positive keys (no subspace); pass n_prompts >= {len(categories)}."
        )
    study = filter_heads(
        categories, categories_per_list, items_per_category, questions, answer_lead_in
    )
    return study.run(model, out=out, n_prompts=n_prompts, **settings)


def check_categories(categories: Sequence[str]) -> None:
    """Refuse unknown category names and fewer than two, before the model loads."""
    import difflib

    from qktrace.core.prompts import load_categories

    known = sorted(load_categories())
    for name in categories:
        if name not in known:
            close = difflib.get_close_matches(str(name), known, n=1)
            raise checks.BadArgument(
                f"categories (CLI --categories) has {name!r}, which is not a category"
                + (f" (did you mean {close[0]!r}?)" if close else "")
                + f"; choose from {', '.join(known)} (data/categories.json)."
            )
    if len(categories) < 2:
        raise checks.BadArgument(
            f"categories (CLI --categories) has {len(categories)} ({list(categories)}); give at "
            "least two: a category's negatives are the items of the others."
        )


study = filter_heads()  # the default design, for load_study("qktrace.studies.filter_heads")
