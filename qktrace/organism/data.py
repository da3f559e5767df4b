"""Training and evaluation data of the organism, made by the studies' own prompt builders.

The organism must find the studies' prompts in-distribution, so its data comes from the same
code: `studies.binding.boxes_prompt` / `studies.binding.build_prompts` (boxes task) and
`studies.filter_heads.build_prompts` (list filtering), rendered with the organism tokenizer's
chat template exactly as `qktrace.prompts.locate` renders them (the user message, the
generation prompt, then the prompt's answer prefix: "Box" for boxes, nothing for lists).
(This is the one place where `qktrace` imports `studies`: only when data is made, for training
and evaluation; loading the shipped checkpoint does not need it.)

Targets (one next token per prompt)
-----------------------------------
- boxes: the answer's box letter (the query token is "Box");
- filter, "first"/"last" questions: the first/last item of the asked category in the list;
- filter, "all" questions ("What are the fruits in the list?"): every item of the asked
  category is a correct next token; the training target is the uniform distribution over them
  (so the model spreads its answer, and its attention, over the whole category, as a filter
  head does), and a prediction counts as correct when its argmax is one of them.

Training mixture
----------------
- boxes with ``n_pairs`` uniform in a range that grows with the curriculum (2..3 at first, up
  to 2..`max_pairs`), objects and letters drawn without repetition, any pair asked;
- lists over all eleven categories of data/categories.json, 2..5 categories per list, 1..5
  items per category (half of the lists use the studies' default 3 x 5), the three question
  kinds in equal parts;
- a fraction `plain` of prompts without the chat template (``<s>`` + text + " Box"), so base-
  model style prompts (``chat=False``) work too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qktrace.prompts import Prompt, load_box_letters, load_categories, load_objects, render

__all__ = [
    "Batch",
    "boxes_prompts",
    "filter_prompts",
    "targets",
    "encode",
    "training_batch",
    "tokenizer_corpus",
]

ALL_CATEGORIES = tuple(load_categories())


@dataclass
class Batch:
    """Right-padded token ids, each row's last position, and its target distribution."""

    input_ids: torch.Tensor  # [batch, tokens]
    last: torch.Tensor  # [batch] index of each prompt's last token
    target: torch.Tensor  # [batch, vocab] target distribution over the next token
    answers: list[list[int]]  # correct next-token ids per prompt


def boxes_prompts(rng: np.random.Generator, n: int, n_pairs: Sequence[int]) -> list[Prompt]:
    """`n` boxes prompts (`studies.binding.boxes_prompt`), n_pairs drawn from `n_pairs`."""
    from studies.binding import boxes_prompt

    objects, letters = load_objects(), load_box_letters()
    out = []
    for _ in range(n):
        k = int(rng.choice(n_pairs))
        chosen = [str(o) for o in rng.choice(objects, k, replace=False)]
        boxes = [str(x) for x in rng.choice(letters, k, replace=False)]
        out.append(boxes_prompt(chosen, boxes, int(rng.integers(k))))
    return out


def filter_prompts(
    rng: np.random.Generator,
    n: int,
    *,
    categories: Sequence[str] = ALL_CATEGORIES,
    categories_per_list: Sequence[int] = (2, 3, 4, 5),
    items_per_category: Sequence[int] = (1, 2, 3, 4, 5),
    default_share: float = 0.5,
) -> list[Prompt]:
    """`n` list prompts from `studies.filter_heads.build_prompts` with varied list shapes.

    A share `default_share` of them use the studies' default shape (3 categories x 5 items);
    the rest draw categories per list and items per category from the given ranges. The
    category order is shuffled per call, so the builder's cycling over asked categories does
    not favour any of them.
    """
    from studies.filter_heads import build_prompts

    out: list[Prompt] = []
    while len(out) < n:
        if rng.random() < default_share:
            per_list, items = 3, 5
        else:
            per_list = int(rng.choice(categories_per_list))
            items = int(rng.choice(items_per_category))
        cats = [str(c) for c in rng.permutation(list(categories))]
        chunk = min(n - len(out), 16)
        out += build_prompts(
            chunk,
            categories=cats,
            categories_per_list=min(per_list, len(cats)),
            items_per_category=items,
            seed=int(rng.integers(2**31)),
        )
    return [out[i] for i in rng.permutation(len(out))]


def targets(prompt: Prompt) -> list[str]:
    """The correct next tokens (as strings) of a boxes or list prompt."""
    meta = prompt.meta
    if "letters" in meta:
        return [meta["letters"][meta["answer"]]]
    hits = [
        i for i, c in zip(meta["items"], meta["item_categories"], strict=True) if c == meta["asked"]
    ]
    if meta["question"] == "first":
        return hits[:1]
    if meta["question"] == "last":
        return hits[-1:]
    return hits


def render_text(tokenizer: Any, prompt: Prompt, chat: bool) -> str:
    """The text the model reads, as `qktrace.prompts.locate` renders it."""
    return render(tokenizer, prompt, chat=chat)[0]


def encode(tokenizer: Any, prompts: Sequence[Prompt], chat: bool | Sequence[bool] = True) -> Batch:
    """Tokenize prompts (rendered like `locate`) into a right-padded batch with targets."""
    flags = [chat] * len(prompts) if isinstance(chat, bool) else list(chat)
    ids = []
    for prompt, flag in zip(prompts, flags, strict=True):
        text = render_text(tokenizer, prompt, flag)
        ids.append(tokenizer(text, add_special_tokens=not flag)["input_ids"])
    width = max(len(r) for r in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row)
    last = torch.tensor([len(r) - 1 for r in ids])
    vocab = len(tokenizer)
    target = torch.zeros(len(ids), vocab)
    answers = []
    for i, prompt in enumerate(prompts):
        answer = tokenizer.convert_tokens_to_ids(targets(prompt))
        if tokenizer.unk_token_id in answer:
            raise ValueError(f"An answer of {prompt.text!r} is not in the organism's vocabulary.")
        answers.append(answer)
        target[i, answer] = 1.0 / len(answer)
    return Batch(input_ids, last, target, answers)


def training_batch(
    tokenizer: Any,
    rng: np.random.Generator,
    task: str,
    size: int,
    *,
    max_pairs: int,
    plain: float = 0.1,
) -> Batch:
    """One training batch of one task ("boxes" or "filter")."""
    if task == "boxes":
        prompts = boxes_prompts(rng, size, list(range(2, max_pairs + 1)))
    elif task == "filter":
        prompts = filter_prompts(rng, size)
    else:
        raise ValueError(f"task={task!r}: use 'boxes' or 'filter'.")
    chat = [bool(rng.random() >= plain) for _ in prompts]
    return encode(tokenizer, prompts, chat)


def tokenizer_corpus(seed: int = 0) -> list[str]:
    """Texts whose words (beyond data/) make the vocabulary: prompts of both builders, plus marks."""
    rng = np.random.default_rng(seed)
    texts = [p.text for p in boxes_prompts(rng, 50, [1, 2, 9])]
    texts += [p.text for p in filter_prompts(rng, 60, default_share=0.0)]
    texts.append("Box . , ; : ! ? ' \" - ( ) Which item in the list is a")
    return texts
