"""Training and evaluation data of the organism, made by the studies' own prompt builders.

The organism must find the studies' prompts in-distribution, so its data comes from the same
code: `qktrace.core.prompts.boxes_prompt` (boxes task, as `studies.binding`) and
`qktrace.core.prompts.filter_prompts` (list filtering, as `studies.filter_heads`), rendered with the
organism tokenizer's
chat template exactly as `qktrace.core.prompts.locate` renders them (the user message, the
generation prompt, then the prompt's answer prefix: "Box" for boxes, nothing for lists).
(The builders live in `qktrace.core.prompts`, so the library never imports `studies`.)

Targets (next tokens)
---------------------
- boxes: the answer's box letter (the query token is "Box");
- filter, "first"/"last" questions: the first/last item of the asked category in the list;
- filter, "all" questions ("What are the fruits in the list?"): every item of the asked
  category is a correct next token; the training target is the uniform distribution over them
  (so the model spreads its answer, and its attention, over the whole category, as a filter
  head does), and a prediction counts as correct when its argmax is one of them.

Training mixture
----------------
- boxes with ``n_pairs`` uniform in a range that grows with the curriculum (2..3 at first, up
  to 2..`max_pairs`; one ``n_pairs`` per batch, so batches need no padding), objects and
  letters drawn without repetition, any pair asked;
- lists over all eleven categories of data/categories.json, 2..5 categories per list, 1..5
  items per category (half of the lists use the studies' default 3 x 5), the three question
  kinds in equal parts;
- more answers per sequence: each chat prompt is answered and followed by up to `extra` more
  question turns about the same context (multi-turn chat, the builders' question wording), and
  every answer is supervised. The study prompt is the conversation's prefix up to its first
  answer, token for token, so it stays in-distribution; the extra turns multiply the training
  signal (binding sat at chance for 800+ steps with one answer per sequence);
- a fraction `plain` of prompts without the chat template (``<s>`` + text + " Box"), so base-
  model style prompts (``chat=False``) work too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from qktrace.core.prompts import (
    FILTER_QUESTIONS,
    Prompt,
    boxes_prompt,
    load_box_letters,
    load_categories,
    load_objects,
    render,
    span_token,
)
from qktrace.core.prompts import filter_prompts as build_filter_prompts

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
    """Right-padded token ids and the positions whose next token is supervised.

    ``rows``/``cols`` index the prediction positions (the token before each answer), ``target``
    holds one next-token distribution per position, ``answers`` the correct token ids, and
    ``first`` marks the first answer of each row (the study's own prompt format).
    """

    input_ids: torch.Tensor  # [batch, tokens]
    rows: torch.Tensor  # [targets]
    cols: torch.Tensor  # [targets]
    target: torch.Tensor  # [targets, vocab]
    answers: list[list[int]]  # correct next-token ids per target
    first: torch.Tensor  # [targets] bool
    aux_rows: torch.Tensor | None = None  # [aux] deep-supervision positions (see aux_targets)
    aux_cols: torch.Tensor | None = None
    aux_ids: torch.Tensor | None = None  # [aux] token each position should hold mid-network
    attn_keys: torch.Tensor | None = None  # [targets, tokens] bool: the keys holding the answer
    n_pairs: int = 0  # boxes per prompt of a boxes batch (0 for lists)


def boxes_prompts(rng: np.random.Generator, n: int, n_pairs: Sequence[int]) -> list[Prompt]:
    """`n` boxes prompts (`qktrace.core.prompts.boxes_prompt`), n_pairs drawn from `n_pairs`."""
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
    chunk: int = 16,
) -> list[Prompt]:
    """`n` list prompts from `qktrace.core.prompts.filter_prompts` with varied list shapes.

    A share `default_share` of them use the studies' default shape (3 categories x 5 items);
    the rest draw categories per list and items per category from the given ranges. The
    category order is shuffled per call, so the builder's cycling over asked categories does
    not favour any of them. Each `chunk` of prompts shares one list shape.
    """
    out: list[Prompt] = []
    while len(out) < n:
        if rng.random() < default_share:
            per_list, items = 3, 5
        else:
            per_list = int(rng.choice(categories_per_list))
            items = int(rng.choice(items_per_category))
        cats = [str(c) for c in rng.permutation(list(categories))]
        out += build_filter_prompts(
            min(n - len(out), chunk),
            categories=cats,
            categories_per_list=min(per_list, len(cats)),
            items_per_category=items,
            seed=int(rng.integers(2**31)),
        )
    return [out[i] for i in rng.permutation(len(out))]


def _filter_answers(meta: dict[str, Any], asked: str, question: str) -> list[str]:
    hits = [i for i, c in zip(meta["items"], meta["item_categories"], strict=True) if c == asked]
    if question == "first":
        return hits[:1]
    if question == "last":
        return hits[-1:]
    return hits


def targets(prompt: Prompt) -> list[str]:
    """The correct next tokens (as strings) of a boxes or list prompt."""
    meta = prompt.meta
    if "letters" in meta:
        return [meta["letters"][meta["answer"]]]
    return _filter_answers(meta, meta["asked"], meta["question"])


def follow_ups(prompt: Prompt, rng: np.random.Generator, extra: int) -> list[tuple[str, list[str]]]:
    """Up to `extra` more questions about the same context: (question text, correct answers).

    Boxes: other pairs, asked with the builder's question ("Which box is the map in?");
    lists: random categories of the list and question kinds, with the builder's templates.
    """
    meta = prompt.meta
    out = []
    if "letters" in meta:
        others = [j for j in range(len(meta["letters"])) if j != meta["answer"]]
        for j in rng.permutation(others)[:extra]:
            text = boxes_prompt(meta["objects"], meta["letters"], int(j)).text
            out.append((text[text.rindex(". ") + 2 :], [meta["letters"][int(j)]]))
        return out
    table = load_categories()
    present = list(dict.fromkeys(meta["item_categories"]))
    for _ in range(extra):
        asked = str(rng.choice(present))
        question = str(rng.choice(list(FILTER_QUESTIONS)))
        word = table[asked]["plural"] if question == "all" else asked
        text = FILTER_QUESTIONS[question].format(plural=word, singular=word)
        out.append((text, _filter_answers(meta, asked, question)))
    return out


def answer_spans(prompt: Prompt, answers: Sequence[str]) -> tuple[str, list[int]]:
    """The span name and indices of the context tokens that hold `answers` (the box letter, or
    the list items), where the query should look."""
    meta = prompt.meta
    if "letters" in meta:
        return "box", [meta["letters"].index(a) for a in answers]
    return "item", [meta["items"].index(a) for a in answers]


def aux_targets(prompt: Prompt) -> tuple[list[tuple[tuple[str, int], str]], str]:
    """Deep-supervision targets: ([(span name, index) -> token], token for the query).

    What the binding and filter circuits need in the middle of the network, made explicit for
    training (see `qktrace.organism.train`): each box letter should carry its object and the
    query its asked object; each list item should carry its category and the query the asked
    category. Returned as (span keys with their target token, the query's target token).
    """
    meta = prompt.meta
    if "letters" in meta:
        return [(("box", j), o) for j, o in enumerate(meta["objects"])], meta["query_object"]
    return [(("item", j), c) for j, c in enumerate(meta["item_categories"])], meta["asked"]


def render_text(tokenizer: Any, prompt: Prompt, chat: bool) -> str:
    """The text the model reads, as `qktrace.core.prompts.locate` renders it."""
    return render(tokenizer, prompt, chat=chat)[0]


def conversation_text(
    tokenizer: Any, prompt: Prompt, turns: Sequence[tuple[str, list[str]]]
) -> str:
    """The prompt (chat-rendered, answer prefix included) answered, then more question turns.

    Its text up to the first answer is exactly what `qktrace.core.prompts.locate` gives for the
    prompt alone, so the studies' prompts are prefixes of the training conversations.
    """
    prefix = f"{prompt.answer_prefix} " if prompt.answer_prefix else ""
    messages = [{"role": "user", "content": prompt.text}]
    messages.append({"role": "assistant", "content": prefix + targets(prompt)[0]})
    for question, answers in turns:
        messages.append({"role": "user", "content": question})
        messages.append({"role": "assistant", "content": prefix + answers[0]})
    return tokenizer.apply_chat_template(messages, tokenize=False)


def encode(
    tokenizer: Any,
    prompts: Sequence[Prompt],
    chat: bool | Sequence[bool] = True,
    turns: Sequence[Sequence[tuple[str, list[str]]]] | None = None,
) -> Batch:
    """Tokenize prompts (chat ones as conversations with `turns`) into a batch with targets.

    Without the chat template a prompt is rendered like `locate` does (``<s>`` text [answer
    prefix]) and only its own answer is supervised.
    """
    flags = [chat] * len(prompts) if isinstance(chat, bool) else list(chat)
    turns = turns or [[] for _ in prompts]
    assistant = tokenizer.convert_tokens_to_ids("<|assistant|>")
    ids, rows, cols, answers, first = [], [], [], [], []
    aux_rows, aux_cols, aux_ids, attn = [], [], [], []
    for i, (prompt, flag, more) in enumerate(zip(prompts, flags, turns, strict=True)):
        n_prefix = len(prompt.answer_prefix.split())
        all_answers = [targets(prompt), *[a for _, a in more]] if flag else [targets(prompt)]
        shift = render(tokenizer, prompt, chat=flag)[1]
        if flag:
            enc = tokenizer(
                conversation_text(tokenizer, prompt, more),
                add_special_tokens=False,
                return_offsets_mapping=True,
            )
            row = enc["input_ids"]
            starts = [j for j, t in enumerate(row) if t == assistant]
            positions = [j + n_prefix for j in starts]
        else:
            enc = tokenizer(render_text(tokenizer, prompt, False), return_offsets_mapping=True)
            row = enc["input_ids"]
            positions = [len(row) - 1]
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        spans, query_target = aux_targets(prompt)
        for (name, j), token in spans:
            start, end = prompt.spans[name][j]
            aux_rows.append(i)
            aux_cols.append(span_token(offsets, start + shift, end + shift))
            aux_ids.append(tokenizer.convert_tokens_to_ids(token))
        aux_rows.append(i)
        aux_cols.append(positions[0])
        aux_ids.append(tokenizer.convert_tokens_to_ids(query_target))
        for t, (pos, answer) in enumerate(zip(positions, all_answers, strict=True)):
            name, index = answer_spans(prompt, answer)
            attn.append(
                [
                    span_token(
                        offsets, prompt.spans[name][j][0] + shift, prompt.spans[name][j][1] + shift
                    )
                    for j in index
                ]
            )
            token_ids = tokenizer.convert_tokens_to_ids(answer)
            if tokenizer.unk_token_id in token_ids:
                raise ValueError(f"An answer of {prompt.text!r} is not in the vocabulary.")
            rows.append(i)
            cols.append(pos)
            answers.append(token_ids)
            first.append(t == 0)
        ids.append(row)
    width = max(len(r) for r in ids)
    input_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    for i, row in enumerate(ids):
        input_ids[i, : len(row)] = torch.tensor(row)
    attn_keys = torch.zeros(len(answers), width, dtype=torch.bool)
    for j, keys in enumerate(attn):
        attn_keys[j, keys] = True
    target = torch.zeros(len(answers), len(tokenizer))
    for j, answer_ids in enumerate(answers):
        target[j, answer_ids] = 1.0 / len(answer_ids)
    return Batch(
        input_ids,
        torch.tensor(rows),
        torch.tensor(cols),
        target,
        answers,
        torch.tensor(first),
        torch.tensor(aux_rows),
        torch.tensor(aux_cols),
        torch.tensor(aux_ids),
        attn_keys,
    )


def training_batch(
    tokenizer: Any,
    rng: np.random.Generator,
    task: str,
    size: int,
    *,
    max_pairs: int,
    plain: float = 0.1,
    extra: int = 3,
    min_pairs: int = 2,
) -> Batch:
    """One training batch of one task ("boxes" or "filter"), each chat prompt followed by up
    to `extra` more question turns about the same context (more answers per sequence)."""
    if task == "boxes":  # one number of pairs per batch: little padding
        k = int(rng.integers(min(min_pairs, max_pairs), max_pairs + 1))
        prompts = boxes_prompts(rng, size, [k])
    elif task == "filter":
        prompts = filter_prompts(rng, size, chunk=size)
    else:
        raise ValueError(f"task={task!r}: use 'boxes' or 'filter'.")
    chat = [bool(rng.random() >= plain) for _ in prompts]
    turns = [follow_ups(p, rng, extra) if c else [] for p, c in zip(prompts, chat, strict=True)]
    batch = encode(tokenizer, prompts, chat, turns)
    batch.n_pairs = k if task == "boxes" else 0
    return batch


def tokenizer_corpus(seed: int = 0) -> list[str]:
    """Texts whose words (beyond data/) make the vocabulary: prompts of both builders, plus marks."""
    rng = np.random.default_rng(seed)
    texts = [p.text for p in boxes_prompts(rng, 50, [1, 2, 9])]
    texts += [p.text for p in filter_prompts(rng, 60, default_share=0.0)]
    texts += [q.format(plural="fruits", singular="fruit") for q in FILTER_QUESTIONS.values()]
    texts.append("Box . , ; : ! ? ' \" - ( ) Which item in the list is a")
    return texts
