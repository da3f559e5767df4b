"""Edit query-key subspaces of one or more heads in the trace and read what the model then says.

`qktrace.intervene` measures where one head's attention goes after an edit; this asks the next
question: does the model's *answer* change? `intervene_answers` writes the edit into the traced
q and/or k of every chosen head (several heads of a layer, or heads across layers), lets the
model run on, and reads its next-token distribution at the query position (the last token,
where the answer starts).

It is a separate verb, not an option of `intervene`, because it edits several heads at once
and its result is about the model's output, not one head's attention row.

Sharing forward passes
----------------------
Each batch of b prompts is stacked S = 2 + n times into ONE trace of S·b rows (n: the random
baselines' draws, ``random=RandomBaseline(n, seed)``): copy 0 is
left alone (the answer before), copy 1 gets the recovered subspaces' edit, copies 2.. get the
same edit in random subspaces of the same rank (per head, seeded). The edit of copy s is
x + (new - c) V_s^T with V_s the copy's basis; copy 0's basis is zero, so it is not edited.
So a study's answer-level effects cost one forward pass of S·b rows per batch.

Candidates and their surface forms
----------------------------------
A model says "apple" as " apple", "Apple" or "apple" depending on what came before (a chat
template's answer starts a line; a sentence puts a space before it). So a string candidate
counts by the first tokens of its usual surface forms: as given, with and without a leading
space, with its first letter upper- and lower-case (a one-character candidate keeps its case:
"a" is a word, not Box A), deduplicated; a form whose tokenization starts with a bare space
token ("Ġ", "▁": every candidate starts so) counts by its first token after it; p(candidate) is the sum of its forms' probabilities
and its logit the logsumexp of theirs (log p(candidate) up to the softmax normaliser, which
cancels in every difference). A first token shared by two candidates of a prompt says neither,
so it counts for none; a candidate left with no token of its own is unscored (NaN, never the
argmax; a `CandidateMassWarning` names the prompts; on a small vocabulary whose first tokens
are letters, give such candidates as token ids). This is the default because
a single surface form undercounts an answer by whatever the model puts on the others, and
which form a model uses is a fact about the model, not about the answer. A token id counts as
itself only; a tuple of ids and/or strings gives a candidate's forms exactly (a string by the
first token of the string as given), e.g. ``("apple",)`` for the single form.

Metrics
-------
Per prompt, over the candidate answers (``candidate`` dim): ``answer_logit`` and
``answer_prob`` (the softmax over the whole vocabulary) before and after;
``answer_candidate_mass``: the probability all candidates hold before the edit (its mean,
``mean_answer_candidate_mass``, below `LOW_CANDIDATE_MASS` warns: the candidates are not what
the model says, and their argmax is a ranking of tokens it would not produce); ``p_answer`` and
``p_target_answer`` (the answer's and the target's answer's probability) before/after;
``answer_logit_diff`` = logit(answer) - logit(target's answer) before/after and its change;
``answer_flip``: the argmax among the candidates was the answer before and is the target's
answer after; ``answer_moved``: it was the answer before and is another candidate after; the
rates ``answer_flip_rate`` and ``answer_moved_rate`` count among the prompts answered correctly
before (``answer_correct``).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, cast

import nnsight
import numpy as np
import torch
import xarray as xr

from qktrace.core import checks, ops
from qktrace.core.errors import BadArgument, BadArgumentType
from qktrace.core.linalg import SIDES, union_basis
from qktrace.model.loading import Head, Model, check_model, parse_heads
from qktrace.run.batching import (
    BATCH_SIZE,
    Batch,
    Plan,
    PromptInput,
    plan_run,
    resolve_positions,
    run,
)
from qktrace.verbs.attribute import as_basis, orthogonalize
from qktrace.verbs.intervene import Edit, RandomBaseline, old_keywords

__all__ = ["CandidateMassWarning", "intervene_answers"]

F = TypeVar("F", bound=Callable[..., Any])
AnswerMode = Literal["swap", "ablate"]
ANSWER_MODES = ("swap", "ablate")
Candidate = int | str | tuple[int | str, ...]
# below this mean probability on the candidates, their argmax says little about the answer
LOW_CANDIDATE_MASS = 0.1


class CandidateMassWarning(UserWarning):
    """The candidate answers hold little of the next-token probability: not what the model says."""


def low_mass_note(mass: float) -> str:
    """What to tell the user when the candidates hold `mass` on average ("" when it is enough)."""
    if not mass < LOW_CANDIDATE_MASS:  # NaN (no prompts) says nothing either way
        return ""
    return (
        f"the candidates are not what the model says: they hold {mass:.2g} of the next-token "
        f"probability on average (below {LOW_CANDIDATE_MASS}), so the answer flip rates rank "
        "tokens the model would not produce. Look at the model's top next tokens after a "
        "prompt; then give candidates as the model writes them (strings count by their usual "
        "surface forms), or end each prompt with an answer lead-in (Prompt.answer_prefix, "
        "e.g. 'The first fruit in the list is') so that the next token is the answer."
    )


def unscored_note(unscored: np.ndarray) -> str:
    """What to tell the user about candidates [prompt, candidate] with no first token of their
    own ("" when there are none)."""
    if not unscored.any():
        return ""
    prompts = np.flatnonzero(unscored.any(-1))
    shown = ", ".join(map(str, prompts[:5])) + (", ..." if len(prompts) > 5 else "")
    return (
        f"{int(unscored.sum())} candidates of {len(prompts)} of {len(unscored)} prompts "
        f"({shown}) start with no token of their own (every first token of their surface forms "
        "is shared with another candidate, unknown or blank): they are unscored (NaN), and a "
        "prompt whose answer is one of them does not count as answered. Give such candidates "
        "as token ids or as tuples of forms that start with tokens of their own."
    )


def _old_edit_keywords(func: F) -> F:
    """Let `intervene_answers` take its old ``mode=``, ``side=`` and ``at=`` (qktrace 0.1) as
    ``edit=Edit(mode, side=side, at=at)``, with a DeprecationWarning, for one release.

    The old checks run first, with their old messages; a swap ignores ``at=`` as it did.
    """

    @functools.wraps(func)
    def call(*args: Any, **kwargs: Any) -> Any:
        old = [k for k in ("mode", "side", "at") if k in kwargs]
        if not old:
            return func(*args, **kwargs)
        if "edit" in kwargs:
            raise BadArgument(
                f"intervene_answers() got both edit= and {'='.join(old)}=; mode=, side= and at= "
                "are the old form of edit=Edit(mode, side=..., at=...): pass edit= only."
            )
        warnings.warn(
            "intervene_answers(mode=..., side=..., at=...) is now "
            "intervene_answers(edit=Edit(mode, side=..., at=...)); the old names go in the "
            "next release.",
            DeprecationWarning,
            stacklevel=2,
        )
        mode = kwargs.pop("mode", "swap")
        side = kwargs.pop("side", "key")
        at = kwargs.pop("at", None)
        checks.choice("mode", mode, ANSWER_MODES)
        if side not in (*SIDES, "both"):
            raise BadArgument(f"side must be 'key', 'query' or 'both', not {side!r}.")
        if mode == "swap" and side != "key":
            raise BadArgument("mode='swap' exchanges two keys' coordinates: use side='key'.")
        kwargs["edit"] = Edit(mode, side=side, at=None if mode == "swap" else at)
        return func(*args, **kwargs)

    return call  # type: ignore[return-value]


@_old_edit_keywords
@old_keywords(3, stacklevel=4)  # under _old_edit_keywords: one frame more to the caller
def intervene_answers(
    model: Model,
    prompts: Sequence[PromptInput],
    bases: Mapping[Any, Any],
    *,
    candidates: Sequence[Sequence[Candidate]],
    answer: Sequence[int],
    target_answer: Sequence[int],
    orig: Sequence[int] | None = None,
    target: Sequence[int] | None = None,
    edit: Edit | AnswerMode = "swap",
    name: str = "subspace",
    random: RandomBaseline | int | None = None,
    batch_size: int = BATCH_SIZE,
    add_special_tokens: bool = True,
    progress: bool = True,
) -> xr.Dataset:
    """Edit the subspaces of several heads inside the trace; compare the model's answers before/after.

    Parameters
    ----------
    model
        From `qktrace.load`; local, `remote="local"` or NDIF.
    prompts
        Strings or token-id lists; the answer is the next token after the last one.
    bases
        Head -> subspace: ``{"16.19": V, "20.26": V2}``, each [d_head, r] or a `decompose`
        DataArray (NaN columns dropped). For ``side="both"`` each value is a pair
        ``(key_basis, query_basis)``. Heads may share a layer.
    candidates
        Per prompt, the candidate answers: strings (counted by the first tokens of their usual
        surface forms, see the module docstring), token ids (that token only), or tuples of
        ids/strings (exactly these forms).
    answer, target_answer
        Per prompt, the index in `candidates` of the correct answer and of the answer the edit
        should lead to (the target key's answer).
    orig, target
        Per prompt, the key positions whose coordinates "swap" exchanges (negative counts from
        the end); "ablate" on keys ablates orig unless `at` is given.
    edit
        "swap" (default: exchange the coordinates of the keys at orig and target), "ablate"
        (project the subspace out of the keys at orig), or an `Edit` (as in `intervene`; swap
        and ablate only): ``Edit("ablate", side="query")`` ablates the query at the last
        token, ``Edit("ablate", side="both")`` keys and query (then each value of `bases` is a
        pair), ``Edit("ablate", at=positions)`` the keys at other positions per prompt.
        The edit's `key_scope` says, under grouped-query attention, whose keys a key edit
        changes. "query_head" (default): the keys as the chosen query head sees them, each
        head's own edit in its own subspace (and its own random draws, seed + its index),
        reaching no other head of its group (see `qktrace.verbs.intervene`, "Grouped-query
        attention"). ``Edit("swap", key_scope="key_head")``: the shared key head, which every
        query head of the group reads; heads of one group then get one key edit in the union of
        their key subspaces (two swaps in one subspace would undo each other), and random draws
        of the union's rank. Without GQA the two are the same edit.
    name
        The recovered subspaces' name in the ``subspace`` coordinate.
    random
        The random baselines: a `RandomBaseline` (n random orthonormal subspaces of each edit's
        rank, seeded: seed + the index of the edit's first head; query edits seed + n_heads +
        index), edited in copies of the batch in the same trace; an int n for
        ``RandomBaseline(n)``; None for ``RandomBaseline(3)``. The default is 3, not
        `intervene`'s 10, because here each draw costs a copy of every prompt in the forward
        pass (the model runs on after the edit), where `intervene`'s draws cost a few small
        matrix products for one head's attention row. Recorded as the attrs ``n_random`` and
        ``seed``.
    batch_size, add_special_tokens, progress
        Prompts per trace (each stacked 2 + n times), whether the tokenizer adds its special
        tokens (BOS), and a progress bar.

    Returns
    -------
    xr.Dataset
        Coordinates ``subspace`` (`name`, "random_0", ...; bool ``random``), ``prompt``,
        ``candidate`` (with ``candidate_token`` per prompt: the counted tokens, "|"-joined).
        Variables named with ``answer``:
        ``answer_logit_before``/``answer_prob_before`` (prompt, candidate),
        ``answer_candidate_mass`` (prompt: the candidates' summed probability before the edit),
        ``answer_logit_after``/``answer_prob_after`` (subspace, prompt, candidate);
        ``p_answer_before``, ``p_target_answer_before``, ``answer_logit_diff_before``,
        ``answer_argmax_before``, ``answer_correct`` (prompt); ``p_answer_after``,
        ``p_target_answer_after``, ``delta_p_answer``, ``delta_p_target_answer``,
        ``answer_logit_diff_after``, ``delta_answer_logit_diff``, ``answer_argmax_after``,
        ``answer_flip``, ``answer_moved`` (subspace, prompt); summaries over prompts
        ``mean_answer_candidate_mass`` (a `CandidateMassWarning` when below
        `LOW_CANDIDATE_MASS`), ``answer_flip_rate``, ``answer_moved_rate``,
        ``mean_delta_p_answer``, ``mean_delta_p_target_answer``,
        ``mean_delta_answer_logit_diff`` (subspace), with 95% intervals and recovered-vs-random
        p-values beside them (`qktrace.core.intervals.answer_intervals`). attrs: heads, side, mode,
        key_scope, ranks,
        forward_passes (traces run) and rows (prompt copies run).

    Notes
    -----
    The keywords of qktrace 0.1 still work for one release, with a DeprecationWarning:
    ``mode=``, ``side=`` and ``at=`` as ``edit=Edit(mode, side=side, at=at)``; ``n_random=``
    and ``seed=`` as ``random=RandomBaseline(n_random, seed)``; ``key_scope=`` as
    ``edit=Edit(..., key_scope=...)``.

    Examples
    --------
    >>> fx = qktrace.intervene_answers(model, prompts, {"2.1": V}, candidates=letters,
    ...        answer=ans, target_answer=other, orig=ans_pos, target=other_pos)  # doctest: +SKIP
    >>> fx.answer_flip_rate.to_series()  # doctest: +SKIP
    """
    edit = _answer_edit(edit)
    baseline = _check_answers(
        model, prompts, bases, candidates, answer, target_answer, name, random, progress
    )
    key_scope = edit.key_scope
    heads, key_v, query_v = _head_bases(model, bases, edit.side)
    ids, counted = candidate_tokens(model.tokenizer, candidates)
    answer_i, target_i = _answer_indices(answer, target_answer, ids.shape[1])
    plan = plan_run(model, prompts, "last", "last", batch_size, add_special_tokens)
    at = cast(Sequence[Sequence[int]] | None, edit.at)
    key_edit = _key_positions(edit.mode, edit.side, orig, target, at, plan.lengths)
    edits = _Edits.of(model, heads, key_v, query_v, key_scope, baseline)
    logits, logprobs = _run_answers(model, plan, edits, key_edit, edit.mode, ids, counted, progress)
    ds = _answer_metrics(logits, logprobs, answer_i, target_i, _subspace_names(name, baseline.n))
    if note := low_mass_note(float(ds["mean_answer_candidate_mass"])):
        warnings.warn(f"intervene_answers: {note}", CandidateMassWarning, stacklevel=2)
    if note := unscored_note(~np.asarray(counted.any(-1))):
        warnings.warn(f"intervene_answers: {note}", CandidateMassWarning, stacklevel=2)
    from qktrace.store import provenance

    labels, mode, side = [h.label for h in heads], edit.mode, edit.side
    params = {"heads": labels, "name": name, "mode": mode, "side": side, "n_random": baseline.n,
              "n_prompts": len(prompts), "key_scope": key_scope}  # fmt: skip
    attrs = provenance("intervene_answers", params, model=model, seed=baseline.seed)
    ranks = [int(cast(np.ndarray, k if k is not None else q).shape[1])
             for k, q in zip(key_v, query_v, strict=True)]  # fmt: skip
    tokens = _counted_tokens(model.tokenizer, ids, counted)
    return ds.assign_coords(candidate_token=(("prompt", "candidate"), tokens)).assign_attrs(
        attrs, heads=labels, side=side, mode=mode, key_scope=key_scope, ranks=ranks,
        key_edit_ranks=edits.key_ranks(), forward_passes=len(plan),
        rows=edits.copies * len(prompts),
    )  # fmt: skip


def _answer_edit(edit: Edit | str) -> Edit:
    """`edit` as an `Edit` that `intervene_answers` makes: a swap or an ablation."""
    edit = Edit.of(edit)
    if edit.mode not in ANSWER_MODES:
        raise BadArgument(
            f"intervene_answers swaps or ablates (edit='swap' or 'ablate'), not "
            f"Edit({edit.mode!r}); qktrace.intervene patches one head."
        )
    return edit


def _check_answers(
    model: Model,
    prompts: Sequence[PromptInput],
    bases: Mapping[Any, Any],
    candidates: Sequence[Sequence[Candidate]],
    answer: Sequence[int],
    target_answer: Sequence[int],
    name: str,
    random: RandomBaseline | int | None,
    progress: bool,
) -> RandomBaseline:
    """`intervene_answers`' checks of its arguments, before any model work; its baselines."""
    check_model("model", model)
    checks.flag("progress", progress)
    checks.mapping("bases", bases, "one basis [d_head, r] per head, e.g. {'16.19': basis}")
    baseline = RandomBaseline.of(random, 3)
    checks.fits_in_memory("random", baseline.n, 8 * model.d_head**2 * len(bases),
                          "its random subspaces", example="3")  # fmt: skip
    checks.prompts("prompts", prompts)
    checks.one_per_prompt("candidates", candidates, len(prompts), "list of candidate answers")
    for what, value in (("answer", answer), ("target_answer", target_answer)):
        checks.one_int_per_prompt(what, value, len(prompts), "index into its candidates", low=0)
    if not isinstance(name, str):
        raise BadArgumentType(f"name={name!r} is not a str; pass the subspace's name.")
    if not bases:
        raise BadArgument("bases is empty: give at least one head -> subspace, e.g. {'2.1': V}.")
    for what, spec in (
        ("candidates", candidates),
        ("answer", answer),
        ("target_answer", target_answer),
    ):
        if isinstance(spec, str) or len(spec) != len(prompts):
            raise BadArgument(f"{what} must give one entry per prompt ({len(prompts)} prompts).")
    return baseline


def _head_bases(
    model: Model, bases: Mapping[Any, Any], side: str
) -> tuple[list[Head], list[np.ndarray | None], list[np.ndarray | None]]:
    """The edited heads, and each one's orthonormal key and query basis (None: not edited)."""
    heads: list[Head] = []
    key_v: list[np.ndarray | None] = []
    query_v: list[np.ndarray | None] = []
    for spec, value in bases.items():
        (h,) = parse_heads([spec] if isinstance(spec, tuple) else spec)
        heads.append(h)
        if side == "both":
            if not (isinstance(value, tuple) and len(value) == 2):
                raise BadArgument(
                    f"side='both' needs bases[{h.label!r}] = (key_basis, query_basis), got "
                    f"{type(value).__name__}."
                )
            kb, qb = value
        else:
            kb, qb = (value, None) if side == "key" else (None, value)
        for which, b, out in (("key", kb, key_v), ("query", qb, query_v)):
            out.append(
                None
                if b is None
                else orthogonalize(
                    [as_basis(b, model.d_head, what=f"{which} basis", head=h.label)]
                )[0]
            )
    model.check_heads(heads)
    return heads, key_v, query_v


def _answer_indices(
    answer: Sequence[int], target_answer: Sequence[int], n_cand: int
) -> tuple[np.ndarray, np.ndarray]:
    """The answer's and the target answer's index among each prompt's candidates."""
    answer_i, target_i = np.asarray(answer, dtype=int), np.asarray(target_answer, dtype=int)
    if ((answer_i < 0) | (answer_i >= n_cand) | (target_i < 0) | (target_i >= n_cand)).any():
        raise BadArgument(f"answer and target_answer must index the {n_cand} candidates.")
    return answer_i, target_i


def _subspace_names(name: str, n_random: int) -> list[str]:
    """The ``subspace`` coordinate: the recovered subspaces' name, then the random draws'."""
    return [name] + [f"random_{i}" for i in range(n_random)]


@dataclass
class _Edits:
    """The edits of each layer, per head: stacked bases [S, d, r] for the S = 2 + n (random
    draws) copies of a batch (copy 0 zero: not edited; 1 the recovered subspace; 2.. random).

    key_edits (layer, kv head, bases) edit a shared key head; head_key_edits (layer, query
    head, kv head, bases) a copy of the keys only that query head reads; query_edits (layer,
    query head, bases) a head's query."""

    key_edits: list[tuple[int, int, torch.Tensor]]
    head_key_edits: list[tuple[int, int, int, torch.Tensor]]
    query_edits: list[tuple[int, int, torch.Tensor]]
    copies: int

    @classmethod
    def of(
        cls,
        model: Model,
        heads: list[Head],
        key_v: list[np.ndarray | None],
        query_v: list[np.ndarray | None],
        key_scope: str,
        baseline: RandomBaseline,
    ) -> _Edits:
        """The edits of `heads`, random draws seeded per head (see `intervene_answers`)."""
        from qktrace.verbs.decompose import random_subspaces

        n_random, seed = baseline.n, baseline.seed

        def stacked(v: np.ndarray, seed_i: int) -> torch.Tensor:
            rank = v.shape[1]
            rand = list(random_subspaces(model.d_head, rank, n_random, seed_i)) if n_random else []
            return torch.tensor(np.stack([np.zeros_like(v), v, *rand]), dtype=torch.float32)

        # key_scope "key_head": heads that read one key head (grouped-query attention) get ONE
        # key edit, in the union of their key subspaces: two swaps in one subspace would undo
        # each other. "query_head": each head its own edit of its own copy of the keys.
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (h, v) in enumerate(zip(heads, key_v, strict=True)):
            if v is not None:
                groups.setdefault((h.layer, model.kv_head(h.head)), []).append(i)
        key_edits, head_key_edits = [], []
        for (layer, kv), members in groups.items():
            if key_scope == "key_head" or model.n_kv_heads == model.n_heads:
                union = union_basis([cast(np.ndarray, key_v[i]) for i in members])
                key_edits.append((layer, kv, stacked(union, seed + members[0])))
            else:
                for i in members:
                    own = cast(np.ndarray, key_v[i])
                    head_key_edits.append((layer, heads[i].head, kv, stacked(own, seed + i)))
        query_edits = [
            (h.layer, h.head, stacked(v, seed + len(heads) + i))
            for i, (h, v) in enumerate(zip(heads, query_v, strict=True))
            if v is not None
        ]
        return cls(key_edits, head_key_edits, query_edits, 2 + n_random)

    def key_ranks(self) -> dict[str, int]:
        """The rank of each key edit, by key head ("layer.kvK") or query head ("layer.h")."""
        ranks = {f"{layer}.kv{kv}": int(stack.shape[-1]) for layer, kv, stack in self.key_edits}
        ranks |= {f"{layer}.{h}": int(st.shape[-1]) for layer, h, _, st in self.head_key_edits}
        return ranks


def _run_answers(
    model: Model,
    plan: Plan,
    edits: _Edits,
    key_edit: np.ndarray | None,
    mode: str,
    ids: np.ndarray,
    counted: np.ndarray,
    progress: bool,
) -> tuple[np.ndarray, np.ndarray]:
    """Trace every batch: the candidates' logits and log-probabilities [S, prompt, candidate]."""
    copies = edits.copies

    def step(batch: Batch) -> tuple[np.ndarray, np.ndarray]:
        rows = slice(batch.start, batch.start + len(batch.texts))
        edit_index = None
        if key_edit is not None:
            edit_index = torch.tensor(
                [[batch.encoded.padded(i, p) for p in r] for i, r in enumerate(key_edit[rows])]
            )
        forms = torch.tensor(ids[rows].reshape(len(batch.texts), -1))
        logit, logprob = _answers_batch(
            model, batch, edits.key_edits, edits.head_key_edits, edits.query_edits, edit_index,
            mode, forms, copies,
        )  # fmt: skip
        shape = (copies, *ids[rows].shape)  # [S, b, candidate, form]
        return merge_forms(logit.reshape(shape), counted[rows]), merge_forms(
            logprob.reshape(shape), counted[rows]
        )

    hint = "intervene_answers keeps no partial results: rerun it."
    results = [
        values for _, values in run(plan, step, desc="answers", resume_hint=hint, progress=progress)
    ]
    logits = np.concatenate([r[0] for r in results], axis=1)  # [S, prompt, candidate]
    logprobs = np.concatenate([r[1] for r in results], axis=1)
    return logits, logprobs


def _counted_tokens(tokenizer: Any, ids: np.ndarray, counted: np.ndarray) -> np.ndarray:
    """Each candidate's counted tokens, "|"-joined, [prompt, candidate]."""
    convert = tokenizer.convert_ids_to_tokens
    return np.array(
        [
            ["|".join(convert([int(t) for t in c[k]])) for c, k in zip(row, keep, strict=True)]
            for row, keep in zip(ids, counted, strict=True)
        ],
        dtype=object,
    )


def candidate_tokens(
    tokenizer: Any, candidates: Sequence[Sequence[Candidate]]
) -> tuple[np.ndarray, np.ndarray]:
    """The candidates' counted tokens: ids [prompt, candidate, form] and which of them count
    (bool, same shape; padding and first tokens shared by two candidates of a prompt do not;
    a candidate with no first token of its own counts none: unscored)."""
    rows = []
    for p, row in enumerate(candidates):
        if isinstance(row, str | int):
            raise BadArgument(
                f"candidates[{p}] is {row!r}: give a list of candidate answers per prompt."
            )
        rows.append([_forms(tokenizer, c, p) for c in row])
    widths = {len(r) for r in rows}
    if len(widths) != 1 or 0 in widths:
        raise BadArgument(
            f"candidates must give every prompt the same number (>= 1) of answers, got {widths}."
        )
    n_forms = max(1, *(len(f) for forms in rows for f in forms))
    ids = np.zeros((len(rows), widths.pop(), n_forms), dtype=np.int64)
    counted = np.zeros(ids.shape, dtype=bool)
    for p, prompt_forms in enumerate(rows):
        owners: dict[int, set[int]] = {}
        for c, forms in enumerate(prompt_forms):
            for t in forms:
                owners.setdefault(t, set()).add(c)
        for c, forms in enumerate(prompt_forms):
            mine = [t for t in forms if len(owners[t]) == 1]
            ids[p, c, : len(mine)] = mine
            counted[p, c, : len(mine)] = True
    return ids, counted


def _forms(tokenizer: Any, candidate: Candidate, prompt: int) -> list[int]:
    """The first tokens that count for one candidate (see the module docstring), deduplicated."""
    if isinstance(candidate, bool) or not isinstance(candidate, int | str | tuple | list):
        raise BadArgument(
            f"Prompt {prompt}: candidate {candidate!r} must be a string, a token id or a tuple "
            "of them (its forms)."
        )
    if isinstance(candidate, int):
        return [int(candidate)]
    if isinstance(candidate, str):
        word = candidate.lstrip()
        if not word:
            raise BadArgument(f"Prompt {prompt}: candidate {candidate!r} is blank.")
        cases = [word] if len(word) == 1 else [word, word[0].upper() + word[1:],
                                               word[0].lower() + word[1:]]  # fmt: skip
        texts: list[int | str] = [candidate, *(s + w for w in cases for s in ("", " "))]
        derived = True
    else:
        texts, derived = list(candidate), False
    unknown = getattr(tokenizer, "unk_token_id", None)
    out: list[int] = []
    for text in texts:
        if isinstance(text, int) and not isinstance(text, bool):
            token = int(text)
        else:
            tokens = tokenizer(str(text), add_special_tokens=False)["input_ids"]
            if not tokens:
                raise BadArgument(f"Prompt {prompt}: candidate form {text!r} has no tokens.")
            if derived:  # a bare space token ("Ġ", "▁"), which every candidate shares, says
                # nothing: count the form by its first token with a letter in it
                tokens = [t for t in tokens if tokenizer.decode([t]).strip()] or tokens[:1]
            token = int(tokens[0])
        # a derived form the tokenizer cannot spell (unknown) says nothing either
        if derived and (token == unknown or not tokenizer.decode([token]).strip()):
            continue
        if token not in out:
            out.append(token)
    return out


def merge_forms(values: np.ndarray, counted: np.ndarray) -> np.ndarray:
    """Per candidate, logsumexp over its counted forms: [S, b, C, F] -> [S, b, C]; NaN for a
    candidate with none (unscored)."""
    kept = np.where(counted[None], values, -np.inf)
    scored = np.asarray(counted.any(-1))
    top = np.where(scored[None, ..., None], kept.max(-1, keepdims=True), 0.0)
    with np.errstate(divide="ignore"):  # log(0) where unscored, replaced below
        merged = (top + np.log(np.exp(kept - top).sum(-1, keepdims=True)))[..., 0]
    return np.where(scored[None], merged, np.nan)


def _key_positions(
    mode: str,
    side: str,
    orig: Sequence[int] | None,
    target: Sequence[int] | None,
    at: Sequence[Sequence[int]] | None,
    lengths: list[int],
) -> np.ndarray | None:
    """Key positions to edit per prompt [prompt, m] (resolved), or None for query-only edits."""
    if side == "query":
        return None
    if mode == "swap":
        if orig is None or target is None:
            raise BadArgument("mode='swap' needs orig= and target=: the two keys per prompt.")
        spec = [[o, t] for o, t in zip(orig, target, strict=True)]
    elif at is not None:
        spec = [list(r) if not isinstance(r, int) else [r] for r in at]
    elif orig is not None:
        spec = [[o] for o in orig]
    else:
        raise BadArgument("Key ablation needs at= (positions per prompt) or orig=.")
    rows = resolve_positions(spec, lengths, "Edit")
    for p, r in enumerate(rows):
        if len(set(r)) != len(r):
            raise BadArgument(
                f"Prompt {p}: the edited key positions {r} repeat; give distinct ones."
            )
    widths = {len(r) for r in rows}
    if len(widths) != 1:
        raise BadArgument("Give every prompt the same number of key positions to edit.")
    return np.array(rows)


def _answers_batch(
    model: Model,
    batch: Batch,
    key_edits: list[tuple[int, int, torch.Tensor]],
    head_key_edits: list[tuple[int, int, int, torch.Tensor]],
    query_edits: list[tuple[int, int, torch.Tensor]],
    edit_index: torch.Tensor | None,
    mode: str,
    candidate_ids: torch.Tensor,
    copies: int,
) -> tuple[np.ndarray, np.ndarray]:
    """One trace of `copies` stacked copies of the batch: the logits/log-probs of the tokens
    `candidate_ids` [b, n] at the last position, [S, b, n].

    key_edits (layer, kv head, bases) edit the shared key head in place; head_key_edits
    (layer, query head, kv head, bases) edit a copy of the keys only that query head reads,
    and replace its slice of the attention call's output with the attention it computes; copy
    0 (the unedited rows) keeps the call's own output."""
    b = len(batch.texts)
    inputs = {k: v.repeat(copies, 1) for k, v in batch.encoded.inputs.items()}
    last = batch.query_index[:, 0].repeat(copies)  # [S*b]
    query_index = last[:, None]
    ids = candidate_ids.repeat(copies, 1)
    # None only where no key is edited (query edits), so no key edit reads it
    index = cast(torch.Tensor, None if edit_index is None else edit_index.repeat(copies, 1))

    def per_row(stack: torch.Tensor) -> torch.Tensor:  # [S, d, r] -> [S*b, d, r]
        return stack.repeat_interleave(b, dim=0)

    layers = sorted({cast(int, e[0]) for e in (*key_edits, *head_key_edits, *query_edits)})
    # read before the trace: the trace body may hold no qktrace object but `ops` ones (NDIF)
    reads = [model.attention_inputs(layer) for layer in layers]
    scale = {layer: (model.scaling(layer), model.softcap(layer)) for layer in layers}
    lm = model.lm
    with torch.inference_mode(), model.trace(inputs):
        for layer, read in zip(layers, reads, strict=True):
            q, k, v, mask = read.read_all()
            for _, kv, stack in (e for e in key_edits if e[0] == layer):
                rows = k[:, kv]  # a view [S*b, tokens, d]: the write reaches the model
                picked = ops.gather_positions(rows, index).float()
                edited = ops.edit_in_subspace(picked, per_row(stack), mode)
                ops.put_positions(rows, index, edited, inplace=True)
            for _, head, stack in (e for e in query_edits if e[0] == layer):
                rows = q[:, head]
                picked = ops.gather_positions(rows, query_index).float()
                edited = ops.edit_in_subspace(picked, per_row(stack), "ablate")
                ops.put_positions(rows, query_index, edited, inplace=True)
            own = [e for e in head_key_edits if e[0] == layer]
            if own:
                scaling, softcap = scale[layer]
                outputs = []
                for _, head, kv, stack in own:  # each query head's own copy of the keys
                    keys = k[:, kv].float()
                    picked = ops.gather_positions(keys, index)
                    edited = ops.edit_in_subspace(picked, per_row(stack), mode)
                    keys = ops.put_positions(keys, index, edited)
                    outputs.append(
                        ops.head_attention_output(
                            q[:, head], keys, v[:, kv], mask, scaling, softcap
                        )
                    )
                output = read.output()
                for (_, head, _, _), values in zip(own, outputs, strict=True):
                    ops.put_head_output(output[b:], head, values[b:])
        saved = nnsight.save(list(ops.answer_scores(lm.output.logits, last, ids)))
    logit, logprob = (s.float().cpu().numpy().reshape(copies, b, -1) for s in saved)
    return logit, logprob


def _answer_metrics(
    logits: np.ndarray,
    logprobs: np.ndarray,
    answer: np.ndarray,
    target: np.ndarray,
    names: list[str],
) -> xr.Dataset:
    """Candidate logits/log-probs [S, prompt, C] (copy 0 unedited) -> the labelled metrics."""
    rows = np.arange(logits.shape[1])
    prob = np.exp(logprobs)
    before_l, after_l = logits[0], logits[1:]
    before_p, after_p = prob[0], prob[1:]
    diff_before = before_l[rows, answer] - before_l[rows, target]
    diff_after = after_l[:, rows, answer] - after_l[:, rows, target]
    # unscored candidates (NaN) never win; a prompt whose answer is unscored is never correct
    ranked = np.where(np.isnan(logits), -np.inf, logits)
    argmax_before = ranked[0].argmax(-1)
    argmax_after = ranked[1:].argmax(-1)
    correct = (argmax_before == answer) & np.isfinite(before_l[rows, answer])
    flip = correct[None] & (argmax_after == target[None])
    moved = correct[None] & (argmax_after != answer[None])
    n_correct = int(correct.sum())
    mass = np.nansum(before_p, -1)
    ps, pc = ("subspace", "prompt"), ("prompt", "candidate")
    p_answer_after = after_p[:, rows, answer]
    p_target_after = after_p[:, rows, target]
    data = {
        "answer_logit_before": (pc, before_l),
        "answer_prob_before": (pc, before_p),
        "answer_logit_after": (("subspace", *pc), after_l),
        "answer_prob_after": (("subspace", *pc), after_p),
        "p_answer_before": ("prompt", before_p[rows, answer]),
        "p_target_answer_before": ("prompt", before_p[rows, target]),
        "answer_logit_diff_before": ("prompt", diff_before),
        "answer_argmax_before": ("prompt", argmax_before),
        "answer_correct": ("prompt", correct),
        "answer_candidate_mass": ("prompt", mass),
        "mean_answer_candidate_mass": ((), mass.mean() if len(mass) else np.nan),
        "p_answer_after": (ps, p_answer_after),
        "p_target_answer_after": (ps, p_target_after),
        "delta_p_answer": (ps, p_answer_after - before_p[rows, answer]),
        "delta_p_target_answer": (ps, p_target_after - before_p[rows, target]),
        "answer_logit_diff_after": (ps, diff_after),
        "delta_answer_logit_diff": (ps, diff_after - diff_before),
        "answer_argmax_after": (ps, argmax_after),
        "answer_flip": (ps, flip),
        "answer_moved": (ps, moved),
        **_answer_summaries(
            flip,
            moved,
            n_correct,
            p_answer_after - before_p[rows, answer],
            p_target_after - before_p[rows, target],
            diff_after - diff_before,
        ),
    }
    coords = {
        "subspace": names,
        "random": ("subspace", np.array([False] + [True] * (len(names) - 1))),
        "prompt": rows,
        "answer_index": ("prompt", answer),
        "target_answer_index": ("prompt", target),
    }
    from qktrace.core.intervals import answer_intervals

    ds = xr.Dataset(data, coords=coords)
    return ds.assign(answer_intervals(ds, "subspace", "random").data_vars)


def _answer_summaries(
    flip: np.ndarray,
    moved: np.ndarray,
    n_correct: int,
    delta_p_answer: np.ndarray,
    delta_p_target_answer: np.ndarray,
    delta_logit_diff: np.ndarray,
) -> dict[str, Any]:
    """The per-subspace summaries over prompts: flip and moved rates among the prompts answered
    correctly before, and the mean changes [subspace, prompt] over the scored prompts."""
    n_subspaces = len(flip)
    return {
        "answer_flip_rate": (
            "subspace",
            flip.sum(1) / n_correct if n_correct else np.full(n_subspaces, np.nan),
        ),
        "answer_moved_rate": (
            "subspace",
            moved.sum(1) / n_correct if n_correct else np.full(n_subspaces, np.nan),
        ),
        "mean_delta_p_answer": ("subspace", _nanmean(delta_p_answer)),
        "mean_delta_p_target_answer": ("subspace", _nanmean(delta_p_target_answer)),
        "mean_delta_answer_logit_diff": ("subspace", _nanmean(delta_logit_diff)),
    }


def _nanmean(values: np.ndarray) -> np.ndarray:
    """Mean over prompts (axis 1) of the scored ones; NaN, without a warning, where none is."""
    n = np.isfinite(values).sum(1)
    total = np.where(np.isfinite(values), values, 0.0).sum(1)
    return np.where(n > 0, total / np.maximum(n, 1), np.nan)
