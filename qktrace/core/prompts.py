"""Prompts as text with marked spans, and where those spans land in any tokenizer's tokens.

Why spans and not token strings
-------------------------------
A study needs token positions: the last token of every list item, every box letter, the
query token. Token strings differ from tokenizer to tokenizer (``"Ġapple"`` in byte-level BPE,
``"▁apple"`` in SentencePiece/Metaspace, ``"apple"`` split in two in a small vocabulary), so
matching strings breaks as soon as the model changes. Instead, a `Prompt` is plain text plus
*marked spans*: named lists of character ranges ``(start, end)`` into the text. `locate`
tokenizes the text with a fast tokenizer and reads its offset mapping (the character range of
every token), which maps a character range to token positions in any tokenizer.

Which token is "the span's token"
---------------------------------
A token *overlaps* a span ``[start, end)`` when its character range ``[a, b)`` is non-empty and
``a < end`` and ``b > start``. The span's **last token** is the last overlapping token: the
token that holds the span's last character (for a multi-word item like "polar bear", the token
of "bear"). The **first token** is the first overlapping token. A token may reach past the span
(``"▁list?"`` for the span "list", or ``" A"`` with its leading space for the span "A"); it is
still the span's token. If one token covers the end of one span and the start of the next, both
spans map to it. A span that no token overlaps (empty, outside the text, or dropped by the
tokenizer's normalizer) raises an error naming the prompt and the span text.

Chat templates
--------------
Instruct models see prompts inside their chat template. With ``chat=True`` (or ``chat=None``
and a tokenizer that has a template), the prompt's text becomes the user message, rendered with
``add_generation_prompt=True``, followed by the prompt's `Prompt.answer_prefix` (e.g. ``"Box"``
for the boxes task, so that the query token is the start of the answer, as in the paper). The
rendered text already holds the BOS token, so it is tokenized with ``add_special_tokens=False``.
The user message is found in the rendered text (its last occurrence), and every span is shifted
by where it starts; a template that rewrites the message (e.g. trims it) is handled as long as
the message survives verbatim, otherwise `locate` says so and suggests ``chat=False``. Without
a template, the text (plus ``" " + answer_prefix``) is tokenized with the tokenizer's own
special tokens (``add_special_tokens=True``).

`locate` returns token-id lists, which `qktrace.verbs.capture` and `qktrace.verbs.reduce` take as prompts
(their ``add_special_tokens`` argument is then irrelevant), and the positions of every span
name, ready to pass as ``keys=``.

Data files
----------
Item lists (categories, objects, box letters) live in the repository's ``data/`` directory;
`data_path` is the one place that knows where.
"""

from __future__ import annotations

import importlib.resources
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np

from qktrace.core.errors import BadArgument

__all__ = [
    "Prompt",
    "PromptBuilder",
    "Located",
    "locate",
    "data_path",
    "load_categories",
    "load_objects",
    "load_box_letters",
    "boxes_prompt",
    "boxes_prompts",
    "filter_prompts",
    "BOXES_ANSWER_PREFIX",
    "FILTER_CATEGORIES",
    "FILTER_LEAD_INS",
    "FILTER_QUESTIONS",
]

Span = tuple[int, int]
Which = Literal["first", "last"]


# --------------------------------------------------------------------------------------------
# data


def data_path(name: str) -> Path:
    """Path of a data file shipped with qktrace, e.g. ``data_path("categories.json")``.

    The files live in the repository's ``data/`` directory, installed as the package
    ``qktrace.data`` (so wheels and non-editable installs have them too).
    """
    path = Path(str(importlib.resources.files("qktrace.data"))) / name
    if not path.exists():
        raise FileNotFoundError(
            f"qktrace data file {name!r} not found at {path}. Reinstall qktrace "
            "(pip install -e . from its repository) so that data/ is present."
        )
    return path


@cache
def load_categories() -> dict[str, dict[str, Any]]:
    """Category name -> ``{"plural": str, "items": list[str]}`` from ``data/categories.json``.

    Eleven categories (animal, fruit, liquid, vehicle, country, sport, bird, fish, city, food,
    US state), at least 15 items each, no item in two categories.
    """
    return json.loads(data_path("categories.json").read_text())


@cache
def load_objects() -> list[str]:
    """Objects for the boxes (binding) task, from ``data/objects.json``."""
    return json.loads(data_path("objects.json").read_text())


@cache
def load_box_letters() -> list[str]:
    """Box letters "A".."Z", from ``data/box_letters.json``."""
    return json.loads(data_path("box_letters.json").read_text())


# --------------------------------------------------------------------------------------------
# prompts with marked spans


@dataclass(frozen=True)
class Prompt:
    """A prompt's text with named, marked character spans.

    Attributes
    ----------
    text : str
        The prompt (the user message when a chat template is applied).
    spans : dict[str, list[tuple[int, int]]]
        Span name -> character ranges ``(start, end)`` into `text`, in order, e.g.
        ``{"item": [(2, 7), (10, 15)]}``.
    meta : dict
        Labels of the prompt (asked category, item categories, objects, ...), kept as given.
    answer_prefix : str
        Text that starts the answer (e.g. ``"Box"``): appended after the chat template's
        generation prompt, or after a space without a template.

    Examples
    --------
    >>> p = Prompt("The cat is in Box A.", {"object": [(4, 7)], "box": [(18, 19)]})
    >>> p.span_texts("box")
    ['A']
    """

    text: str
    spans: dict[str, list[Span]]
    meta: dict[str, Any] = field(default_factory=dict)
    answer_prefix: str = ""

    def span_texts(self, name: str) -> list[str]:
        """The text of every span called `name`."""
        return [self.text[s:e] for s, e in self.spans[name]]


class PromptBuilder:
    """Build a `Prompt` piece by piece, marking the pieces that are spans.

    Examples
    --------
    >>> b = PromptBuilder()
    >>> _ = b.add("The ").add("cat", "object").add(" is in Box ").add("A", "box").add(".")
    >>> p = b.build(meta={"answer": "A"})
    >>> p.text, p.spans
    ('The cat is in Box A.', {'object': [(4, 7)], 'box': [(18, 19)]})
    """

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._length = 0
        self._spans: dict[str, list[Span]] = {}

    def add(self, text: str, span: str | None = None) -> PromptBuilder:
        """Append `text`; if `span` is given, mark it as one more span of that name."""
        if span is not None:
            if not text.strip():
                raise BadArgument(
                    f"Span {span!r} would be {text!r}, which has no visible characters; "
                    "mark a piece of text with at least one non-space character."
                )
            self._spans.setdefault(span, []).append((self._length, self._length + len(text)))
        self._parts.append(text)
        self._length += len(text)
        return self

    def build(self, meta: dict[str, Any] | None = None, answer_prefix: str = "") -> Prompt:
        """The `Prompt` built so far."""
        return Prompt(
            "".join(self._parts),
            {k: list(v) for k, v in self._spans.items()},
            dict(meta or {}),
            answer_prefix,
        )


# --------------------------------------------------------------------------------------------
# locating spans in tokens


@dataclass
class Located:
    """Tokenized prompts and the token position of every marked span.

    Attributes
    ----------
    ids : list[list[int]]
        Token ids per prompt, to pass to `qktrace.verbs.capture` / `qktrace.verbs.reduce` as prompts.
    positions : dict[str, list[list[int]]]
        Span name -> per prompt, the token position of each span of that name (its last token,
        or first with ``which="first"``), in span order; ready for ``keys=``.
    texts : list[str]
        The exact text that was tokenized (chat template applied).
    tokens : list[list[str]]
        Token strings per prompt (for labels and checks).
    chat : bool
        Whether the chat template was applied.
    """

    ids: list[list[int]]
    positions: dict[str, list[list[int]]]
    texts: list[str]
    tokens: list[list[str]]
    chat: bool

    def __len__(self) -> int:
        return len(self.ids)

    def span_tokens(self, name: str) -> list[list[str]]:
        """Per prompt, the token string at each position of span `name`."""
        return [[self.tokens[i][p] for p in row] for i, row in enumerate(self.positions[name])]


def _has_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render(
    tokenizer: Any,
    prompt: Prompt,
    *,
    chat: bool,
    chat_kwargs: dict[str, Any] | None = None,
    index: int = 0,
) -> tuple[str, int]:
    """(text to tokenize, character offset of `prompt.text` inside it).

    With `chat`, the user message is rendered by the tokenizer's chat template with
    ``add_generation_prompt=True`` and the answer prefix is appended; otherwise the text is
    returned with ``" " + answer_prefix`` appended (if any).
    """
    if not chat:
        suffix = f" {prompt.answer_prefix}" if prompt.answer_prefix else ""
        return prompt.text + suffix, 0
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt.text}],
        tokenize=False,
        add_generation_prompt=True,
        **(chat_kwargs or {}),
    )
    offset = rendered.rfind(prompt.text)
    if offset < 0:
        raise BadArgument(
            f"Prompt {index} ({_short(prompt.text)}) does not appear verbatim in the chat "
            "template's output, so its marked spans cannot be mapped to tokens (the template "
            f"rewrites the user message). Rendered: {_short(rendered, 200)}. Strip leading and "
            "trailing whitespace from the prompt, or pass chat=False to tokenize it without "
            "the template."
        )
    return rendered + prompt.answer_prefix, offset


def span_token(
    offsets: Sequence[tuple[int, int]], start: int, end: int, which: Which = "last"
) -> int | None:
    """Index of the first or last token whose character range overlaps ``[start, end)``.

    Tokens with an empty range (special tokens added by the tokenizer) never overlap.
    Returns None if no token overlaps.

    Examples
    --------
    >>> span_token([(0, 3), (3, 9), (9, 10)], 4, 9)
    1
    >>> span_token([(0, 3), (3, 9), (9, 10)], 2, 10, which="first")
    0
    """
    hits = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    if not hits:
        return None
    return hits[-1] if which == "last" else hits[0]


def locate(
    tokenizer: Any,
    prompts: Sequence[Prompt],
    *,
    chat: bool | None = None,
    which: Which = "last",
    chat_kwargs: dict[str, Any] | None = None,
) -> Located:
    """Tokenize prompts and find the token position of every marked span.

    Parameters
    ----------
    tokenizer
        A fast `transformers` tokenizer (it must return offset mappings), e.g. ``model.tokenizer``.
    prompts
        `Prompt` objects (see `PromptBuilder`).
    chat
        True: apply the tokenizer's chat template (an error if it has none); False: do not;
        None (default): apply it when the tokenizer has one.
    which
        "last" (default): each span's last token, the token holding its last character;
        "first": its first token.
    chat_kwargs
        Extra arguments for ``apply_chat_template`` (e.g. ``{"enable_thinking": False}``).

    Returns
    -------
    Located
        ``ids`` (token-id lists for `qktrace.verbs.capture`/`qktrace.verbs.reduce`) and ``positions[name]``
        (per prompt, the position of each span of that name).

    Raises
    ------
    ValueError
        If a span cannot be located (naming the prompt and the span text), the chat template
        rewrites the user message, or ``chat=True`` but the tokenizer has no template.

    Examples
    --------
    >>> from qktrace.model.testing import tokenizer
    >>> tok = tokenizer("bpe")
    >>> p = PromptBuilder().add("The ").add("apple", "object").add(" is in Box ").add("A", "box")
    >>> loc = locate(tok, [p.build()], chat=False)
    >>> loc.span_tokens("box")
    [['ĠA']]
    """
    if not getattr(tokenizer, "is_fast", False):
        raise BadArgument(
            f"locate needs a fast tokenizer (it reads character offsets), but got a "
            f"{type(tokenizer).__name__}, which is not one; pass model.tokenizer of a "
            "qktrace.load-ed model, or AutoTokenizer.from_pretrained(<model>) (fast by default)."
        )
    if chat is None:
        chat = _has_template(tokenizer)
    elif chat and not _has_template(tokenizer):
        raise BadArgument(
            f"chat=True but the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no chat "
            "template; pass chat=False (base models) or set tokenizer.chat_template."
        )
    if which not in ("first", "last"):
        raise BadArgument(f"which={which!r}: use 'last' or 'first'.")
    names = list(dict.fromkeys(name for p in prompts for name in p.spans))
    ids: list[list[int]] = []
    texts: list[str] = []
    tokens: list[list[str]] = []
    positions: dict[str, list[list[int]]] = {name: [] for name in names}
    for i, prompt in enumerate(prompts):
        text, shift = render(tokenizer, prompt, chat=chat, chat_kwargs=chat_kwargs, index=i)
        enc = tokenizer(text, add_special_tokens=not chat, return_offsets_mapping=True)
        offsets = [tuple(o) for o in enc["offset_mapping"]]
        for name in names:
            row = []
            for start, end in prompt.spans.get(name, []):
                if not 0 <= start < end <= len(prompt.text):
                    raise BadArgument(
                        f"Prompt {i} ({_short(prompt.text)}): span {name!r} ({start}, {end}) is "
                        f"not a non-empty range inside the text (length {len(prompt.text)}); "
                        "build prompts with PromptBuilder so spans match the text."
                    )
                position = span_token(offsets, start + shift, end + shift, which)
                if position is None:
                    raise BadArgument(
                        f"Prompt {i} ({_short(prompt.text)}): span {name!r} "
                        f"{prompt.text[start:end]!r} at characters ({start}, {end}) overlaps no "
                        "token (the tokenizer dropped or normalized it away). Use text the "
                        "tokenizer keeps, or mark a wider span."
                    )
                row.append(position)
            positions[name].append(row)
        ids.append(list(enc["input_ids"]))
        texts.append(text)
        tokens.append(tokenizer.convert_ids_to_tokens(enc["input_ids"]))
    return Located(ids, positions, texts, tokens, bool(chat))


def _short(text: str, n: int = 80) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


# --------------------------------------------------------------------------------------------
# the studies' prompt families (in the library so that the organism's training data and the
# studies share one builder; `studies.binding` and `studies.filter_heads` re-export them)

BOXES_ANSWER_PREFIX = "Box"
FILTER_CATEGORIES = ("animal", "fruit", "liquid", "vehicle", "country")
FILTER_QUESTIONS = {
    "all": "What are the {plural} in the list?",
    "first": "What is the first {singular} in the list?",
    "last": "What is the last {singular} in the list?",
}
# answer lead-ins (`filter_prompts(answer_lead_in=True)`): the answer restated up to where its
# first item starts, so that the next token is an item; a list answer in the prompt's own
# list format ("- item" lines)
FILTER_LEAD_INS = {
    "all": "The {plural} in the list are:\n-",
    "first": "The first {singular} in the list is",
    "last": "The last {singular} in the list is",
}


def boxes_prompt(objects: Sequence[str], letters: Sequence[str], answer: int) -> Prompt:
    """One boxes prompt asking where ``objects[answer]`` is.

    Examples
    --------
    >>> boxes_prompt(["stone", "map"], ["K", "C"], 1).text
    'The stone is in Box K, and the map is in Box C. Which box is the map in?'
    """
    if len(objects) != len(letters) or not objects:
        raise BadArgument("Give one letter per object, and at least one pair.")
    if not 0 <= answer < len(objects):
        raise BadArgument(f"answer={answer} is not an index of the {len(objects)} pairs.")
    b = PromptBuilder()
    n = len(objects)
    for i, (obj, letter) in enumerate(zip(objects, letters, strict=True)):
        lead = "The " if i == 0 else (", and the " if i == n - 1 else ", the ")
        b.add(lead).add(obj, "object").add(" is in Box ").add(letter, "box")
    b.add(". Which box is the ").add(objects[answer], "query_object").add(" in?")
    meta = {
        "objects": list(objects),
        "letters": list(letters),
        "answer": int(answer),
        "query_object": objects[answer],
    }
    return b.build(meta=meta, answer_prefix=BOXES_ANSWER_PREFIX)


def boxes_prompts(
    n: int, n_pairs: int = 9, *, query_object: str | None = None, seed: int = 0
) -> list[Prompt]:
    """`n` boxes prompts with `n_pairs` pairs; the answer's order index cycles over the pairs.

    Parameters
    ----------
    query_object
        If given, every prompt asks about this same object, placed at the answer's position
        (the order-ID design: only the position varies). Otherwise the queried object is the
        random object at the answer's position.

    Examples
    --------
    >>> ps = boxes_prompts(3, n_pairs=3, query_object="stone")
    >>> [p.meta["answer"] for p in ps], {p.meta["query_object"] for p in ps}
    ([0, 1, 2], {'stone'})
    """
    objects, letters = load_objects(), load_box_letters()
    if not 1 <= n_pairs <= len(letters):
        raise BadArgument(f"n_pairs={n_pairs} must be between 1 and {len(letters)} (box letters).")
    if n_pairs + 1 > len(objects):
        raise BadArgument(f"n_pairs={n_pairs} needs more objects than data/objects.json has.")
    if query_object is not None and query_object not in objects:
        raise BadArgument(
            f"query_object={query_object!r} is not in data/objects.json; pick one of {objects[:8]}..."
        )
    pool = [o for o in objects if o != query_object]
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(n):
        answer = i % n_pairs
        chosen = [str(o) for o in rng.choice(pool, n_pairs, replace=False)]
        if query_object is not None:
            chosen[answer] = query_object
        boxes = [str(x) for x in rng.choice(letters, n_pairs, replace=False)]
        prompts.append(boxes_prompt(chosen, boxes, answer))
    return prompts


def filter_prompts(
    n: int,
    *,
    categories: Sequence[str] = FILTER_CATEGORIES,
    categories_per_list: int | None = None,
    items_per_category: int = 5,
    questions: Sequence[str] = ("all", "first", "last"),
    seed: int = 0,
    answer_lead_in: bool = False,
) -> list[Prompt]:
    """`n` list prompts; spans ``item`` (every list item) and ``category`` (the asked word).

    With `answer_lead_in`, each prompt's `Prompt.answer_prefix` starts the answer up to its
    first item (`FILTER_LEAD_INS`: "The first fruit in the list is", "The fruits in the list
    are:\\n-"), so that the model's next token is an item: without it an instruct model's
    next token restates the question ("The") and a base model's may end the turn.

    Each list holds `items_per_category` items of `categories_per_list` categories (default:
    3, or all if fewer): the asked one, which cycles through `categories`, and others drawn at
    random.

    ``meta``: ``asked`` (category), ``question`` ("all", "first" or "last"), ``items`` and
    ``item_categories`` (in list order).

    Examples
    --------
    >>> p = filter_prompts(1, categories_per_list=2, items_per_category=1, questions=["all"])[0]
    >>> p.meta["asked"], len(p.spans["item"])
    ('animal', 2)
    """
    table = load_categories()
    unknown = [c for c in categories if c not in table]
    if unknown:
        raise BadArgument(f"Unknown categories {unknown}; choose from {sorted(table)}.")
    if len(categories) < 2:
        raise BadArgument("Give at least two categories: negatives come from the other ones.")
    if categories_per_list is None:
        categories_per_list = min(3, len(categories))
    if not 2 <= categories_per_list <= len(categories):
        raise BadArgument(
            f"categories_per_list={categories_per_list} must be between 2 and the number of "
            f"categories ({len(categories)})."
        )
    short = [c for c in categories if len(table[c]["items"]) < items_per_category]
    if short:
        raise BadArgument(
            f"Categories {short} have fewer than items_per_category={items_per_category} "
            "items; lower items_per_category or add items to data/categories.json."
        )
    bad = [q for q in questions if q not in FILTER_QUESTIONS]
    if bad or not questions:
        raise BadArgument(f"questions {list(questions)}: use some of {list(FILTER_QUESTIONS)}.")
    rng = np.random.default_rng(seed)
    prompts = []
    for i in range(n):
        asked = categories[i % len(categories)]
        question = questions[(i // len(categories)) % len(questions)]
        others = [c for c in categories if c != asked]
        chosen = [asked, *rng.choice(others, categories_per_list - 1, replace=False)]
        entries = [
            (str(item), str(cat))
            for cat in chosen
            for item in rng.choice(table[cat]["items"], items_per_category, replace=False)
        ]
        entries = [entries[j] for j in rng.permutation(len(entries))]
        b = PromptBuilder()
        for item, _ in entries:
            b.add("- ").add(item, "item").add("\n")
        word = table[asked]["plural"] if question == "all" else asked
        before, after = FILTER_QUESTIONS[question].split(
            "{plural}" if question == "all" else "{singular}"
        )
        b.add(before).add(word, "category").add(after)
        lead = FILTER_LEAD_INS[question].format(plural=table[asked]["plural"], singular=asked)
        prompts.append(
            b.build(
                meta={
                    "asked": asked,
                    "question": question,
                    "items": [e[0] for e in entries],
                    "item_categories": [e[1] for e in entries],
                },
                answer_prefix=lead if answer_lead_in else "",
            )
        )
    return prompts
