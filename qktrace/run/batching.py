"""Prompts to traceable batches: tokenizing, padding, position resolving and batch planning.

Every verb that runs the model (capture, reduce, intervene, find_heads, the answer checks) plans
its batches here, so all of them tokenize and pad a prompt the same way. Prompts are padded with
explicit `position_ids` (left- or right-padding gives the same rotary positions as the unpadded
prompt); `plan_run` tokenizes every prompt once and validates the whole run before any forward
pass, keeping only the token ids (4 bytes a token); a batch is padded only when it runs, so a run
keeps one batch in memory. `run` is the one loop of every verb: it pads each batch (or request
of several), runs it with retries (`qktrace.model.remote.with_retries`), shows progress and skips what
a resumed run has done. `head_coords` labels heads in results.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar, overload

import numpy as np
import torch
from tqdm.auto import tqdm

from qktrace.core import checks
from qktrace.core.deprecation import renamed_attributes
from qktrace.core.errors import BadArgument
from qktrace.model.loading import Head, Model, check_model, iter_batches
from qktrace.model.remote import with_retries

Positions = Literal["last", "all"] | Sequence[int] | Sequence[Sequence[int]]
# the argument a position spec came from, named in errors
_ARGUMENT = {
    "Query": "query",
    "Key": "keys",
    "Orig/target": "orig/target",
    "Orig": "orig",
    "Target": "target",
    "Edit (at=)": "at",
}
# what the verbs take as one prompt: text, or token ids (not `qktrace.core.prompts.Prompt`, the
# text with marked spans that studies build; `locate` turns those into ids)
PromptInput = str | Sequence[int]
# Prompts per trace: the one default of every verb that runs the model, of the studies and of
# the CLI. It sets memory per trace and the number of traces (round trips on NDIF), not the
# results: prompts are padded with their own positions, so a batch of any size gives the same
# values to float rounding.
BATCH_SIZE = 16


@dataclass
class Encoded:
    """A padded batch ready for `model.trace`, plus where each prompt's tokens sit in it."""

    inputs: dict[str, torch.Tensor]
    lengths: list[int]
    starts: list[int]
    tokens: list[list[str]]

    def padded(self, prompt: int, position: int) -> int:
        """Index in the padded row of the prompt's (unpadded) token `position`."""
        return self.starts[prompt] + position


def _token_ids(
    model: Model, prompts: Sequence[PromptInput], add_special_tokens: bool, first: int = 0
) -> list[list[int]]:
    """Token ids of each prompt (strings are tokenized); an empty prompt raises, numbered from `first`."""
    tokenizer = model.tokenizer
    ids: list[list[int]] = []
    for i, prompt in enumerate(prompts):
        if isinstance(prompt, str):
            row = tokenizer(prompt, add_special_tokens=add_special_tokens)["input_ids"]
        else:
            row = [int(t) for t in prompt]
        if not row:
            raise BadArgument(
                f"Prompt {first + i} ({prompt!r}) has no tokens: remove it or give it text."
            )
        ids.append(row)
    return ids


def encode(
    model: Model, prompts: Sequence[PromptInput], *, add_special_tokens: bool = True, first: int = 0
) -> Encoded:
    """Tokenize and pad a batch the way qktrace traces it (tokenizer's padding side)."""
    checks.prompts("prompts", prompts)
    tokenizer = model.tokenizer
    ids = _token_ids(model, prompts, add_special_tokens, first)
    lengths = [len(r) for r in ids]
    width = max(lengths)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    left = getattr(tokenizer, "padding_side", "right") == "left"
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
    position_ids = torch.zeros((len(ids), width), dtype=torch.long)
    starts = []
    for i, row in enumerate(ids):
        start = width - len(row) if left else 0
        starts.append(start)
        input_ids[i, start : start + len(row)] = torch.tensor(row)
        attention_mask[i, start : start + len(row)] = 1
        position_ids[i, start : start + len(row)] = torch.arange(len(row))
    tokens = [tokenizer.convert_ids_to_tokens(r) for r in ids]
    inputs = {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": position_ids,
    }
    return Encoded(inputs, lengths, starts, tokens)


def resolve_positions(
    spec: Positions, lengths: Sequence[int], what: str, first: int = 0
) -> list[list[int]]:
    """Per-prompt token positions from "last", "all", one int per prompt, or a list per prompt.

    Negative positions count from the end of the prompt. A position outside the prompt raises an
    error naming the prompt (numbered from `first`), the position and the prompt's length.
    """
    if isinstance(spec, str):
        if spec == "last":
            return [[n - 1] for n in lengths]
        if spec == "all":
            return [list(range(n)) for n in lengths]
        raise BadArgument(
            f"{what} positions must be 'last', 'all' or a list per prompt, not {spec!r}."
        )
    if len(spec) != len(lengths):
        raise BadArgument(
            f"{what} positions were given for {len(spec)} prompts but there are {len(lengths)}: "
            "pass one position (or one list of positions) per prompt."
        )
    checks.positions(_ARGUMENT.get(what, what), spec, len(lengths), first)
    resolved = []
    items: Sequence[Any] = spec
    for i, (item, n) in enumerate(zip(items, lengths, strict=True)):
        row = [int(item)] if isinstance(item, int | np.integer) else [int(p) for p in item]
        fixed = []
        for p in row:
            q = p + n if p < 0 else p
            if not 0 <= q < n:
                raise BadArgument(
                    f"{what} position {p} is outside prompt {first + i}, which has {n} tokens "
                    f"(valid: 0..{n - 1} or -{n}..-1). Check how the position was computed "
                    "(chat template, special tokens) or shorten the list."
                )
            fixed.append(q)
        resolved.append(fixed)
    return resolved


def _index_tensor(
    enc: Encoded, positions: list[list[int]], width: int | None = None
) -> tuple[torch.Tensor, np.ndarray]:
    """Padded-row indices [batch, n] (missing slots point at a valid token) and slot positions (-1 = none)."""
    width = width if width is not None else max(len(p) for p in positions)
    index = torch.zeros((len(positions), width), dtype=torch.long)
    slots = np.full((len(positions), width), -1, dtype=np.int64)
    for i, row in enumerate(positions):
        index[i] = enc.padded(i, row[-1] if row else enc.lengths[i] - 1)
        for j, p in enumerate(row):
            index[i, j] = enc.padded(i, p)
            slots[i, j] = p
    return index, slots


def by_layer(model: Model, heads: Sequence[Head]) -> dict[int, list[Head]]:
    """The heads grouped by layer, layers in ascending order (the order they are traced)."""
    layers: dict[int, list[Head]] = {}
    for h in heads:
        layers.setdefault(h.layer, []).append(h)
    return dict(sorted(layers.items()))


def layer_reads(
    model: Model, layers: dict[int, list[Head]]
) -> list[tuple[int, list[int], list[int], float, float | None]]:
    """Per layer of `by_layer`: (layer, its query heads, their key heads, the attention's
    scaling, its logit softcap or None): what a trace body reads at that layer."""
    return [
        (
            layer,
            [h.head for h in hs],
            [model.kv_head(h.head) for h in hs],
            model.scaling(layer),
            model.softcap(layer),
        )
        for layer, hs in layers.items()
    ]


def given_order(layers: dict[int, list[Head]], heads: Sequence[Head]) -> list[int]:
    """Indices that put results computed layer by layer back in the order `heads` were given."""
    computed = [h for hs in layers.values() for h in hs]
    return [computed.index(h) for h in heads]


@dataclass
class Batch:
    """One batch, tokenized and with its padded query/key indices resolved."""

    start: int
    texts: list[str]
    encoded: Encoded
    query_index: torch.Tensor
    query_slots: np.ndarray
    key_index: torch.Tensor
    key_slots: np.ndarray


@dataclass
class Plan:
    """The batches of a run, validated up front by `plan_run`; iterating pads one at a time.

    Keeps each prompt's token ids (flat, 4 bytes a token; `lengths` per prompt) and nothing
    else per prompt, so a run over many prompts holds one padded batch in memory and tokenizes
    each prompt once. `sha256` fingerprints what the run computes on (token ids, positions,
    extra rows such as labels).
    """

    model: Model
    prompts: Sequence[PromptInput]
    query: Positions
    keys: Positions
    batch_size: int
    add_special_tokens: bool
    query_width: int
    key_width: int
    sha256: str
    token_ids: array
    offsets: array

    @property
    def lengths(self) -> list[int]:
        """Tokens of each prompt (unpadded)."""
        o = self.offsets
        return [o[i + 1] - o[i] for i in range(len(o) - 1)]

    def ids(self, prompt: int) -> list[int]:
        """The token ids of prompt `prompt`."""
        return self.token_ids[self.offsets[prompt] : self.offsets[prompt + 1]].tolist()

    def __len__(self) -> int:
        return -(-len(self.prompts) // self.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        for start, chunk in iter_batches(self.prompts, self.batch_size):
            yield self.batch(start, chunk)

    def starts(self) -> list[tuple[int, int]]:
        """(first prompt, number of prompts) of every batch, without tokenizing."""
        n, b = len(self.prompts), self.batch_size
        return [(start, min(b, n - start)) for start in range(0, n, b)]

    def batch(self, start: int, chunk: Sequence[PromptInput] | None = None) -> Batch:
        """The batch of prompts `start..`, padded now from the token ids `plan_run` kept."""
        if chunk is None:
            chunk = self.prompts[start : start + self.batch_size]
        n = len(chunk)
        ids = [self.ids(i) for i in range(start, start + n)]
        enc = encode(self.model, ids, add_special_tokens=self.add_special_tokens, first=start)
        q_pos = resolve_positions(_slice(self.query, start, n), enc.lengths, "Query", start)
        k_pos = resolve_positions(_slice(self.keys, start, n), enc.lengths, "Key", start)
        q_index, q_slots = _index_tensor(enc, q_pos, self.query_width)
        k_index, k_slots = _index_tensor(enc, k_pos, self.key_width)
        texts = [p if isinstance(p, str) else self.model.tokenizer.decode(list(p)) for p in chunk]
        return Batch(start, texts, enc, q_index, q_slots, k_index, k_slots)


# check(start, lengths, query positions, key positions) of one batch's prompts, resolved
Check = Callable[[int, list[int], list[list[int]], list[list[int]]], None]


def _vocab_size(model: Model) -> int | None:
    """The number of token ids the model embeds (None when its config does not say)."""
    size = getattr(getattr(model.lm, "config", None), "vocab_size", None)
    return size if isinstance(size, int) and size > 0 else None


def plan_run(
    model: Model,
    prompts: Sequence[PromptInput],
    query: Positions,
    keys: Positions,
    batch_size: int,
    add_special_tokens: bool = True,
    *,
    extra: Sequence[Any] | None = None,
    check: Check | None = None,
    keys_name: str = "Key",
) -> Plan:
    """Validate a run before any model work, in one pass that keeps only the token ids.

    Tokenizes every prompt (once: the plan keeps the ids) to check it (not empty, within the
    model's context, every position inside it), to fix the query/key widths all batches share
    (so batches stack and append to a store without ragged padding), and to hash token ids,
    positions and `extra[i]` (per-prompt rows, e.g. labels) into `Plan.sha256`.
    `check(start, lengths, query_positions, key_positions)` may validate more per batch.
    `keys_name` names the key positions in errors (a verb whose keys default to other
    arguments names those). (Called `prepare` before 0.2; that name stays for one release.)
    """
    _check_run(model, prompts, query, keys, batch_size, add_special_tokens, keys_name)
    kept = _Kept()
    for start, chunk in iter_batches(prompts, batch_size):
        ids = _token_ids(model, chunk, add_special_tokens, start)
        lengths = [len(row) for row in ids]
        _check_context(model, lengths, start)
        q_pos = resolve_positions(_slice(query, start, len(chunk)), lengths, "Query", start)
        k_pos = resolve_positions(_slice(keys, start, len(chunk)), lengths, keys_name, start)
        if check is not None:
            check(start, lengths, q_pos, k_pos)
        rows = None if extra is None else [extra[start + i] for i in range(len(chunk))]
        kept.add(ids, q_pos, k_pos, rows)
    if kept.key_width == 0:
        raise BadArgument("No key positions given: pass at least one key position per prompt.")
    return Plan(
        model,
        prompts,
        query,
        keys,
        batch_size,
        add_special_tokens,
        kept.query_width,
        kept.key_width,
        kept.digest.hexdigest()[:16],
        kept.token_ids,
        kept.offsets,
    )


# the name of `plan_run` before 0.2, kept for one release
__getattr__ = renamed_attributes(__name__, {"prepare": "plan_run"})


def _check_run(
    model: Model,
    prompts: Sequence[PromptInput],
    query: Positions,
    keys: Positions,
    batch_size: int,
    add_special_tokens: bool,
    keys_name: str,
) -> None:
    """`plan_run`'s arguments, checked before any prompt is tokenized."""
    check_model("model", model)
    checks.prompts("prompts", prompts)
    checks.token_ids("prompts", prompts, _vocab_size(model))
    checks.integer("batch_size", batch_size, low=1, example="16")
    checks.flag("add_special_tokens", add_special_tokens)
    for spec, what in ((query, "Query"), (keys, keys_name)):
        checks.positions(_ARGUMENT.get(what, what.lower()), spec, len(prompts))
        if not isinstance(spec, str) and len(spec) != len(prompts):
            raise BadArgument(
                f"{what} positions were given for {len(spec)} prompts but there are "
                f"{len(prompts)}: pass one position (or one list of positions) per prompt."
            )


@dataclass
class _Kept:
    """What `plan_run` keeps of the prompts as it walks them: flat token ids and their offsets,
    the widest query and key rows, and the running hash of ids, positions and extra rows."""

    digest: Any = field(default_factory=hashlib.sha256)
    token_ids: array = field(default_factory=lambda: array("i"))
    offsets: array = field(default_factory=lambda: array("q", [0]))
    query_width: int = 0
    key_width: int = 0

    def add(
        self,
        ids: list[list[int]],
        query: list[list[int]],
        keys: list[list[int]],
        extra: list[Any] | None,
    ) -> None:
        """Keep one batch of prompts: their ids, and their rows in the hash."""
        for row in ids:
            self.token_ids.extend(row)
            self.offsets.append(len(self.token_ids))
        for i, (row, qp, kp) in enumerate(zip(ids, query, keys, strict=True)):
            item = [row, qp, kp] if extra is None else [row, qp, kp, extra[i]]
            self.digest.update(json.dumps(item, default=str).encode() + b"\n")
        self.query_width = max(self.query_width, *(len(p) for p in query))
        self.key_width = max(self.key_width, *(len(p) for p in keys))


def plan_batches(
    model: Model,
    prompts: Sequence[PromptInput],
    query: Positions,
    keys: Positions,
    batch_size: int,
    add_special_tokens: bool = True,
) -> list[Batch]:
    """Every batch, validated and tokenized up front (`plan_run`, then all of its batches)."""
    return list(plan_run(model, prompts, query, keys, batch_size, add_special_tokens))


T = TypeVar("T")


@overload
def run(
    plan: Plan,
    step: Callable[[Batch], T],
    *,
    desc: str,
    resume_hint: str | Callable[[int], str],
    progress: bool = ...,
    done: int = ...,
    batches_per_request: None = ...,
) -> Iterator[tuple[Batch, T]]: ...


@overload
def run(
    plan: Plan,
    step: Callable[[list[Batch]], T],
    *,
    desc: str,
    resume_hint: str | Callable[[int], str],
    progress: bool = ...,
    done: int = ...,
    batches_per_request: int,
) -> Iterator[tuple[list[Batch], T]]: ...


def run(
    plan: Plan,
    step: Callable[[Any], T],
    *,
    desc: str,
    resume_hint: str | Callable[[int], str],
    progress: bool = True,
    done: int = 0,
    batches_per_request: int | None = None,
) -> Iterator[tuple[Any, T]]:
    """The loop of every verb: yield `(batch, step(batch))` for each batch of `plan`, in order.

    Each batch is padded when its turn comes and `step` (one trace) runs under
    `qktrace.model.remote.with_retries`: transient remote failures are retried, and the last one stops
    the run with an error naming the prompts and `resume_hint` (a string, or a function of the
    first prompt not done). A tqdm bar (`desc`, unless not `progress`) counts prompts; it
    advances when the caller has handled a batch (e.g. written it), so it shows what is kept.
    `done` prompts (a resumed run's, a whole number of batches) are skipped. With
    `batches_per_request` (0: all in one) `step` gets a list of that many batches, one request.
    """
    todo = [(start, n) for start, n in plan.starts() if start >= done]
    per = 1 if batches_per_request is None else batches_per_request or len(todo) or 1
    bar = tqdm(
        total=len(plan.prompts), initial=done, desc=desc, unit="prompt", disable=not progress
    )
    try:
        for r in range(0, len(todo), per):
            request = todo[r : r + per]
            start, end = request[0][0], request[-1][0] + request[-1][1]
            batches = [plan.batch(first) for first, _ in request]
            unit = batches if batches_per_request is not None else batches[0]
            del batches
            value = with_retries(
                step,
                unit,
                what=f"prompts {start}..{end - 1}",
                resume_hint=resume_hint(start) if callable(resume_hint) else resume_hint,
            )
            yield unit, value
            del unit, value
            bar.update(end - start)
    finally:
        bar.close()


def _check_context(model: Model, lengths: Sequence[int], start: int) -> None:
    limit = model.max_positions
    if limit is None:
        return
    for i, n in enumerate(lengths):
        if n > limit:
            raise BadArgument(
                f"Prompt {start + i} has {n} tokens, more than {model.name}'s context of {limit}: "
                "shorten it (fewer items or entities) or use a model with a longer context."
            )


def _slice(spec: Positions, start: int, n: int) -> Positions:
    return spec if isinstance(spec, str) else spec[start : start + n]


def head_coords(model: Model, heads: list[Head]) -> dict[str, Any]:
    """The `head` coordinate and its per-head labels (layer, query/key head, scaling, soft cap)."""
    return {
        "head": [h.label for h in heads],
        "layer": ("head", [h.layer for h in heads]),
        "q_head": ("head", [h.head for h in heads]),
        "kv_head": ("head", [model.kv_head(h.head) for h in heads]),
        "scaling": ("head", [model.scaling(h.layer) for h in heads]),
        # NaN where the family has no attention-logit soft cap (all but Gemma 2)
        "softcap": ("head", [model.softcap(h.layer) or np.nan for h in heads]),
    }
