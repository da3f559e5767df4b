"""Edit one head's keys (or queries) inside a feature subspace, and watch where its attention goes.

The mechanism
-------------
A subspace found by `qktrace.decompose` claims to carry a feature: the order index of a box,
the category of an item. The causal test is to change a key's coordinates inside that subspace
and nothing else, and see whether the head's attention follows. For one head, inside ONE nnsight
trace per batch, at the inputs of the layer's attention function (post-RoPE q and k, exactly as
the softmax sees them; see `qktrace.model.loading`):

1. ``before``: the query's attention (last token by default) is computed from the unedited q
   and k with the model's own mask, scaling and soft cap (`qktrace.core.ops.attention_rows`).
2. Random baselines: the same edit in ``random=RandomBaseline(n, seed)``: n random orthonormal
   subspaces of the same rank (seeded; the same draws for every batch), computed *functionally*,
   only for this head's attention row, so they cost a few small matrix products and no extra
   forward pass.
3. The real edit is written IN PLACE into the traced tensor, so the model's attention (and
   everything downstream of it) really computes with the edited key; ``after`` is computed from
   the edited tensors. ``verify=True`` also reads the model's own attention weights from the
   output of the attention call (eager attention only), as a check that the edit took.

Edits (the `edit=` argument: a mode, or an `Edit` with its side, positions `at` and `source`),
with V an orthonormal basis [d_head, r] of the subspace and c = x V the coordinates:

- "swap" exchanges the coordinates of the keys at `orig` and `target`:
  k_o += (c_t - c_o) V^T and k_t += (c_o - c_t) V^T (the paper's Fig 4, 7 and 9);
- "ablate" sets them to zero at the positions `at` (project out the subspace);
- "patch" sets them to those of given `source` vectors at `at`, e.g. keys captured from a
  counterfactual prompt (`qktrace.capture(...).k`). Keys carry their position's rotary phase:
  patch from the same position of another prompt unless you mean to move it.

No forward pass is needed for key edits: a key edit changes only the edited keys' logits, so
`intervene_captured` computes the same metrics from a `qktrace.capture` (q, k, logits and
attention at the candidate keys), equal to the traced edit's to float precision; the studies use
it. What the edit does to the model's *answer* is `qktrace.intervene_answers`.

Only the span of `basis` matters (it is orthonormalized here).

Grouped-query attention: whose key is edited
--------------------------------------------
Under GQA several query heads read one key head (Llama-3.1-8B: groups of 4; SmolLM2 17.3-17.5
share one). A subspace is found for one *query* head (its ΔC pairs that head's q with the
shared k), so the edit a researcher means by "swap this head's keys" is the key as that query
head sees it, leaving the other heads of its group alone. The edit's `key_scope`
(``Edit("swap", key_scope="key_head")``) says which:

- ``"query_head"`` (default): only the chosen query head sees the edited key. Transformers'
  attention functions repeat the key heads inside the call (eager: ``repeat_kv(key,
  module.num_key_value_groups)``; sdpa: the same or ``enable_gqa``), so a key handed to the
  call with one copy per query head would be repeated again unless the module's group count
  were changed, which a trace on a shared (NDIF) model must not do and which differs per
  implementation. Instead the edit leaves the call's k alone and, after the call, replaces the
  chosen head's slice of its output with softmax(q_h k'_h^T scaling + mask) v, computed from
  the head's own edited copy k'_h of the keys (`qktrace.core.ops.head_attention_output`, with the
  model's mask, scaling and soft cap). That is exactly the head's attention with the edited
  key, for every attention implementation, and the rest of the layer reads it; the other heads
  of the group keep the call's own output. The random baselines are per query head too: each
  head's own draws, not one shared edit.
- ``"key_head"``: the shared key head itself is edited (in place, before the call), so every
  query head of its group (attr ``heads_sharing_key``) reads the edited key.

Without GQA (one query head per key head) the two are the same edit. `intervene` and
`intervene_captured` report only the chosen head's attention, which both scopes give alike
(the traced pass stops right after the edited layer is read); the scope decides what the model
computes downstream, which `qktrace.intervene_answers` reads. Query edits
(``Edit(..., side="query")``) touch only the chosen head.

Metrics
-------
Per prompt and subspace, with a_o and a_t the attention on the orig and target keys:
``p_target`` = a_t / (a_o + a_t) before and after, and its change ``delta_p_target``, NaN
where a_o = a_t = 0 (both keys masked, e.g. outside a sliding window; left out of the means);
``attention_target`` before and after; and ``flip``: the argmax of attention moved from orig to
target. The argmax is taken over the *candidate keys* the caller passes (`keys`, by default just
orig and target), not the whole row, because attention sinks (the first token, punctuation)
dominate whole rows; a prompt flips when orig was the argmax before and target is after, and
``flip_rate`` counts flips among the prompts whose argmax was orig before (``attends_orig``).
"""

from __future__ import annotations

import functools
import numbers
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from typing import Any, Literal, TypeVar, cast

import nnsight
import numpy as np
import torch
import xarray as xr

from qktrace.core import checks, ops
from qktrace.core.errors import BadArgument, BadArgumentType
from qktrace.core.linalg import SIDES, Side
from qktrace.model.loading import Head, Model, check_model, parse_heads
from qktrace.run.batching import (
    BATCH_SIZE,
    Batch,
    Plan,
    Positions,
    PromptInput,
    plan_run,
    resolve_positions,
    run,
)
from qktrace.verbs.attribute import as_basis, orthogonalize

__all__ = ["Edit", "RandomBaseline", "intervene", "intervene_captured"]

F = TypeVar("F", bound=Callable[..., Any])

Mode = Literal["swap", "ablate", "patch"]
KeyScope = Literal["query_head", "key_head"]
MODES = ("swap", "ablate", "patch")
KEY_SCOPES = ("query_head", "key_head")


@dataclass(frozen=True, eq=False)
class Edit:
    """What an intervention does inside the subspace, and where: ``Edit("ablate", at=pos)``.

    mode
        "swap" exchanges the coordinates of the keys at orig and target; "ablate" sets them to
        zero; "patch" sets them to those of `source`.
    side
        "key" (default) edits keys; "query" edits the head's queries (ablate and patch only);
        "both" edits keys and queries (`qktrace.intervene_answers` only: its bases are pairs).
    at
        Positions to edit for "ablate"/"patch", one or a list per prompt. Default: orig (key
        side) or the query position (query side). A swap edits orig and target.
    source
        For "patch": the vectors whose coordinates are copied, [n_prompts, d_head] (one per
        prompt) or [n_prompts, n_at, d_head] (one per edited position), or a DataArray with
        dims ``prompt`` and ``d_head`` (e.g. ``capture(...).k.sel(head="16.19")``).
    key_scope
        Under grouped-query attention, where a key edit is written: "query_head" (default) edits
        the key as the chosen query head sees it, reaching no other head of its group;
        "key_head" edits the shared key head, which every query head of the group reads (module
        docstring, "Grouped-query attention"). Without GQA the two are the same edit.

    A bare mode string stands for ``Edit(mode)``. The checks of the combination run here, when
    the edit is made, before any model work.
    """

    mode: Mode = "swap"
    side: Side | Literal["both"] = "key"
    at: Positions | None = None
    source: Any = None
    key_scope: KeyScope = "query_head"

    def __post_init__(self) -> None:
        checks.choice("mode", self.mode, MODES)
        checks.choice("side", self.side, (*SIDES, "both"))
        checks.choice("key_scope", self.key_scope, KEY_SCOPES)
        if self.mode == "swap" and self.side != "key":
            raise checks.BadArgument(
                "A swap exchanges the coordinates of two keys (orig and target), so it needs "
                "side='key'. To edit the query, use Edit('ablate', side='query'), or "
                "Edit('patch', side='query', source=...) with queries of other prompts "
                "(e.g. capture(...).q)."
            )
        if self.mode == "swap" and self.at is not None:
            raise checks.BadArgument("A swap edits the keys at orig and target: drop at=.")
        if self.mode == "patch" and self.source is None:
            raise checks.BadArgument(
                "Edit('patch') needs source=: the vectors whose coordinates to copy, "
                "[n_prompts, d_head] or [n_prompts, n_at, d_head]."
            )
        if self.mode != "patch" and self.source is not None:
            raise checks.BadArgument(
                f"source= is only used by Edit('patch'), not Edit({self.mode!r})."
            )

    @classmethod
    def of(cls, edit: Edit | str) -> Edit:
        """`edit` as an `Edit` ("swap" -> Edit("swap"))."""
        if isinstance(edit, Edit):
            return edit
        if isinstance(edit, str):
            return cls(edit)  # type: ignore[arg-type]
        raise checks.BadArgumentType(
            f"edit is a {type(edit).__name__} ({edit!r}); pass 'swap', 'ablate', or an Edit, "
            "e.g. Edit('patch', source=keys, at=positions)."
        )


@dataclass(frozen=True)
class RandomBaseline:
    """The random subspaces of the same rank an effect is compared with: `n` draws, seeded.

    n
        How many random orthonormal subspaces, each of the edited subspace's rank, get the same
        edit as the recovered one; 0 turns the baselines off.
    seed
        The numpy seed of the draws (>= 0); the same draws serve every batch.

    A verb's ``random=`` takes one, or an int n for ``RandomBaseline(n)``, or None for the
    verb's default: ``intervene(..., random=RandomBaseline(20, seed=1))``, ``random=0``.
    """

    n: int
    seed: int = 0

    def __post_init__(self) -> None:
        examples = {"n": "RandomBaseline(10) (0: none)", "seed": "RandomBaseline(10, seed=0)"}
        for field, example in examples.items():
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                raise BadArgumentType(
                    f"RandomBaseline {field}={checks.shown(value)} ({type(value).__name__}) is "
                    f"not an integer; pass an int >= 0, e.g. {example}."
                )
            if value < 0:
                raise BadArgument(
                    f"RandomBaseline {field}={value} is negative; pass an int >= 0, e.g. {example}."
                )
            object.__setattr__(self, field, int(value))

    @classmethod
    def of(cls, random: RandomBaseline | int | None, default_n: int) -> RandomBaseline:
        """`random` as a `RandomBaseline`: None -> RandomBaseline(default_n), n ->
        RandomBaseline(n)."""
        if random is None:
            return cls(default_n)
        if isinstance(random, RandomBaseline):
            return random
        if isinstance(random, numbers.Integral) and not isinstance(random, bool):
            return cls(checks.integer("random", random, low=0, example=str(default_n)))
        raise BadArgumentType(
            f"random={checks.shown(random)} ({type(random).__name__}) is not a RandomBaseline "
            f"or a number of draws; pass e.g. random=RandomBaseline({default_n}, seed=0), or "
            f"random={default_n}."
        )


def old_keywords(default_n: int, *, stacklevel: int = 3) -> Callable[[F], F]:
    """Let a verb take its old ``n_random=``, ``seed=`` (qktrace 0.1) as
    ``random=RandomBaseline(n_random, seed)`` and ``key_scope=`` as
    ``edit=Edit(..., key_scope=...)``, with a DeprecationWarning, for one release.

    The old checks run first, with their old messages; `default_n` is the verb's default n;
    `stacklevel` points the warning at the verb's caller (one more under another wrapper).
    """

    def wrap(func: F) -> F:
        verb = func.__name__

        @functools.wraps(func)
        def call(*args: Any, **kwargs: Any) -> Any:
            if "n_random" in kwargs or "seed" in kwargs:
                kwargs["random"] = _old_random(verb, kwargs, default_n, stacklevel)
            if "key_scope" in kwargs:
                kwargs["edit"] = _old_key_scope(verb, kwargs, stacklevel)
            return func(*args, **kwargs)

        return call  # type: ignore[return-value]

    return wrap


def _old_random(
    verb: str, kwargs: dict[str, Any], default_n: int, stacklevel: int
) -> RandomBaseline:
    """``n_random=``, ``seed=`` (popped from `kwargs`) as the `RandomBaseline` they mean."""
    old = "= and ".join(k for k in ("n_random", "seed") if k in kwargs)
    if "random" in kwargs:
        raise BadArgument(
            f"{verb}() got both random= and {old}=; n_random= and seed= are the old form of "
            "random=RandomBaseline(n, seed=...): pass random= only."
        )
    warnings.warn(
        f"{verb}(n_random=..., seed=...) is now {verb}(random=RandomBaseline(n, seed=...)); "
        "the old names go in the next release.",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    n = checks.integer("n_random", kwargs.pop("n_random", default_n), low=0,
                       example=str(default_n))  # fmt: skip
    seed = checks.integer("seed", kwargs.pop("seed", 0), low=0, example="0")
    return RandomBaseline(n, seed)


def _old_key_scope(verb: str, kwargs: dict[str, Any], stacklevel: int) -> Edit:
    """``key_scope=`` (popped from `kwargs`) written into the verb's edit."""
    key_scope = kwargs.pop("key_scope")
    edit = Edit.of(kwargs.get("edit", "swap"))
    if edit.key_scope != "query_head":
        raise BadArgument(
            f"{verb}() got key_scope= and an edit with key_scope={edit.key_scope!r}; "
            "key_scope= is the old form of Edit(..., key_scope=...): give it in the Edit only."
        )
    warnings.warn(
        f"{verb}(key_scope=...) is now {verb}(edit=Edit(mode, key_scope=...)); the old name "
        "goes in the next release.",
        DeprecationWarning,
        stacklevel=stacklevel,
    )
    return replace(edit, key_scope=key_scope)


@old_keywords(10)
def intervene(
    model: Model,
    prompts: Sequence[PromptInput],
    head: Any,
    basis: Any,
    *,
    orig: Sequence[int],
    target: Sequence[int],
    query: Positions = "last",
    keys: Positions | None = None,
    edit: Edit | Mode = "swap",
    name: str | None = None,
    random: RandomBaseline | int | None = None,
    verify: bool = False,
    batch_size: int = BATCH_SIZE,
    add_special_tokens: bool = True,
    progress: bool = True,
) -> xr.Dataset:
    """Edit one head's keys (or queries) inside a subspace and compare its attention before/after.

    Every prompt and position is checked first; then batches are padded and run one at a time
    (`qktrace.run.batching.run`), so a run holds one batch in memory besides its per-prompt results.

    Parameters
    ----------
    model
        From `qktrace.load`; local, `remote="local"` or NDIF.
    prompts
        Strings (tokenized here) or token-id lists.
    head
        One query head: "16.19" or (16, 19).
    basis
        The subspace: an array [d_head, r] (key basis V for a key edit, query basis U for a
        query edit), or a DataArray from `qktrace.decompose`, e.g.
        ``sub.key_basis.sel(head="16.19", feature="order")`` (NaN columns beyond the rank are
        dropped). Only its span matters.
    orig, target
        One token position per prompt (negative counts from the end): the key the head attends
        to, and the key the edit should move attention to. A swap exchanges their coordinates.
    keys
        Candidate key positions per prompt, among which the argmax (for `flip`) is taken and
        attention is reported; must include orig and target. Default: just orig and target.
    edit
        "swap" (default), "ablate", or an `Edit` for the rest: ``Edit("ablate", side="query")``,
        ``Edit("patch", source=k, at=positions)``, ``Edit("swap", key_scope="key_head")`` (see
        `Edit` and the module docstring). Its `key_scope` ("query_head" or "key_head": under
        grouped-query attention, whether the key edit is the key as this head sees it or the
        key head its group shares) leaves the head's attention reported here the same; it is
        recorded in the attrs (``key_scope``, ``heads_reached``).
    name
        The subspace's name in the `subspace` coordinate; default: the basis' ``feature``
        coordinate if it has one, else "subspace".
    query
        The query position: "last" or one position per prompt.
    random
        The random baselines: a `RandomBaseline` (n random orthonormal subspaces of the same
        rank, drawn with its seed; the same draws serve every batch), an int n for
        ``RandomBaseline(n)``, or None for ``RandomBaseline(10)``; 0 turns them off. Recorded
        as the attrs ``n_random`` and ``seed``.
    batch_size, add_special_tokens, progress
        Prompts per trace, whether the tokenizer adds its special tokens (BOS), and a progress
        bar.
    verify
        Also return ``model_attention``: the model's own attention weights of the head after the
        edit, read from the attention call's output (needs ``attn_implementation="eager"``).

    Returns
    -------
    xr.Dataset
        Coordinates: ``subspace`` (`name`, then "random_0", ...; bool ``random`` marks the
        baselines), ``prompt``, ``key`` (candidate slots; ``key_position`` is -1 and values NaN
        where a prompt has fewer), ``key_token``, ``key_role`` ("orig", "target" or ""),
        ``orig_position``, ``target_position``, ``query_position``.
        Variables: ``attention_before``/``logit_before`` (prompt, key) and
        ``attention_after``/``logit_after`` (subspace, prompt, key), logits scaled and before
        any soft cap; ``p_target_before`` (prompt), ``p_target_after`` and ``delta_p_target``
        (subspace, prompt), NaN where orig and target both get no attention;
        ``attention_target_before``/``_after``; ``argmax_before`` (prompt)
        and ``argmax_after`` (subspace, prompt) as key positions; ``attends_orig`` (prompt);
        ``flip`` (subspace, prompt); means over prompts ``mean_delta_p_target``, ``flip_rate``,
        ``mean_attention_target_after`` (subspace) and ``mean_attention_target_before``;
        beside ``flip_rate`` and ``mean_delta_p_target`` their 95% intervals ``*_low``/``*_high``
        (Wilson; bootstrap over prompts) and, per recovered subspace, ``*_p_vs_random``
        (`qktrace.core.intervals.swap_intervals`);
        ``basis`` (d_head, component), the orthonormalized subspace. attrs: provenance
        (`qktrace.store.provenance`), head, layer, kv_head, heads_sharing_key, key_scope,
        heads_reached (the heads whose attention the edit changes), side, mode, rank.

    Notes
    -----
    The keywords ``n_random=``, ``seed=`` (as ``random=RandomBaseline(n_random, seed)``) and
    ``key_scope=`` (as ``edit=Edit(..., key_scope=...)``) of qktrace 0.1 still work, with a
    DeprecationWarning, for one release.

    Examples
    --------
    >>> fx = qktrace.intervene(model, prompts, "16.1", V_order, name="order",
    ...                        orig=answer_pos, target=other_pos, keys=box_pos)  # doctest: +SKIP
    >>> fx.flip_rate.to_series()  # doctest: +SKIP
    >>> fx.delta_p_target.where(fx.random).mean()  # doctest: +SKIP
    """
    h, edit, baseline = _check_intervene(
        model, prompts, head, basis, orig, target, edit, name, random, verify, progress
    )
    n = len(prompts)
    name, v = _subspace(basis, name, model.d_head, h.label)
    sources = _source_array(edit.source, n, model.d_head) if edit.mode == "patch" else None
    stage = _Stage(orig, target, edit, sources)
    plan = _plan(model, prompts, query, keys, orig, target, stage, batch_size, add_special_tokens)
    parts = _run_intervene(model, plan, stage, h, edit, v, baseline, verify, progress)
    ds = _dataset(parts, _subspace_names(name, baseline.n))
    from qktrace.store import provenance

    params = {
        "head": h.label,
        "name": name,
        "mode": edit.mode,
        "side": edit.side,
        "rank": v.shape[1],
        "n_random": baseline.n,
        "n_prompts": n,
        "query": query if isinstance(query, str) else "per-prompt",
        "key_scope": edit.key_scope,
    }
    attrs = provenance("intervene", params, model=model, seed=baseline.seed)
    return ds.assign(basis=(("d_head", "component"), v.astype(np.float32))).assign_attrs(
        attrs, **_head_attrs(model, h, edit), name=name, side=edit.side,
        mode=edit.mode, rank=v.shape[1],
    )  # fmt: skip


def _check_intervene(
    model: Model,
    prompts: Sequence[PromptInput],
    head: Any,
    basis: Any,
    orig: Sequence[int],
    target: Sequence[int],
    edit: Edit | Mode,
    name: str | None,
    random: RandomBaseline | int | None,
    verify: bool,
    progress: bool,
) -> tuple[Head, Edit, RandomBaseline]:
    """`intervene`'s checks, before any model work: its head, its edit and its baselines."""
    check_model("model", model)
    for flag_name, value in (("verify", verify), ("progress", progress)):
        checks.flag(flag_name, value)
    baseline = RandomBaseline.of(random, 10)
    checks.fits_in_memory("random", baseline.n, 8 * model.d_head**2, "its random subspaces")
    if isinstance(basis, str | bytes) or not hasattr(basis, "__len__"):
        raise BadArgumentType(
            f"basis={basis!r} ({type(basis).__name__}) is not a basis; pass an array "
            "[d_head, r] (numpy, torch or xarray), e.g. the key_basis of qktrace.decompose."
        )
    if name is not None and not isinstance(name, str):
        raise BadArgumentType(f"name={name!r} is not a str; pass a subspace name or None.")
    h = _one_head(model, head)
    edit = Edit.of(edit)
    _one_side(edit, "intervene")
    n = len(checks.prompts("prompts", prompts))
    checks.one_per_prompt("orig", orig, n)
    checks.one_per_prompt("target", target, n)
    if edit.at is not None and not isinstance(edit.at, str):
        checks.positions("at", edit.at, n)
    if verify:
        _check_eager(model)
    return h, edit, baseline


def _one_side(edit: Edit, verb: str) -> None:
    """`intervene` and `intervene_captured` edit keys or queries, not both."""
    if edit.side == "both":
        raise checks.BadArgument(
            f"{verb} edits one side, keys or queries: side='both' is for "
            "qktrace.intervene_answers. Call it once per side."
        )


def _plan(
    model: Model,
    prompts: Sequence[PromptInput],
    query: Positions,
    keys: Positions | None,
    orig: Sequence[int],
    target: Sequence[int],
    stage: _Stage,
    batch_size: int,
    add_special_tokens: bool,
) -> Plan:
    """The batches of the run, every position checked (candidate keys default to orig, target)."""
    keys_name = "Key"
    if keys is None:  # the default candidates: orig and target
        keys, keys_name = [[o, t] for o, t in zip(orig, target, strict=True)], "Orig/target"
    return plan_run(
        model, prompts, query, keys, batch_size, add_special_tokens, check=stage.check,
        keys_name=keys_name,
    )  # fmt: skip


def _random_bases(d_head: int, rank: int, baseline: RandomBaseline) -> list[np.ndarray]:
    """The random baselines: `baseline.n` orthonormal subspaces [d_head, rank], drawn with its
    seed."""
    from qktrace.verbs.decompose import random_subspaces

    n = baseline.n
    return list(random_subspaces(d_head, rank, n, baseline.seed)) if n else []


def _subspace_names(name: str, n_random: int) -> list[str]:
    """The ``subspace`` coordinate: the recovered subspace's name, then its random baselines."""
    return [name] + [f"random_{i}" for i in range(n_random)]


def _run_intervene(
    model: Model,
    plan: Plan,
    stage: _Stage,
    h: Head,
    edit: Edit,
    v: np.ndarray,
    baseline: RandomBaseline,
    verify: bool,
    progress: bool,
) -> list[tuple[_Keys, dict[str, np.ndarray], np.ndarray, np.ndarray]]:
    """Trace every batch: per batch its candidate keys, arrays and orig/target slots."""
    basis_t = torch.tensor(v, dtype=torch.float32)
    randoms = _random_bases(model.d_head, v.shape[1], baseline)
    random_t = torch.tensor(np.array(randoms), dtype=torch.float32) if baseline.n else None

    def step(batch: Batch) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
        edit_index, source_t, orig_slot, target_slot = stage(batch)
        values = _intervene_batch(
            model, batch, h.layer, h.head, edit.side, edit.mode, basis_t, random_t, edit_index,
            source_t, verify,
        )  # fmt: skip
        return values, orig_slot, target_slot

    hint = (
        "intervene keeps no partial results: rerun it when NDIF is reachable (a study rerun "
        "with the same --out resumes from the sums and captures it saved)."
    )
    return [
        (_Keys.of(batch), values, orig_slot, target_slot)
        for batch, (values, orig_slot, target_slot) in run(
            plan, step, desc="intervene", resume_hint=hint, progress=progress
        )
    ]


def _head_attrs(model: Model, h: Head, edit: Edit) -> dict[str, Any]:
    """The edited head's attrs: its layer and key head, the heads sharing its key, and the
    heads whose attention the edit changes."""
    group = [g for g in range(model.n_heads) if model.kv_head(g) == model.kv_head(h.head)]
    reached = group if edit.side == "key" and edit.key_scope == "key_head" else [h.head]
    return {
        "head": h.label,
        "layer": h.layer,
        "q_head": h.head,
        "kv_head": model.kv_head(h.head),
        "heads_sharing_key": [f"{h.layer}.{g}" for g in group],
        "key_scope": edit.key_scope,
        "heads_reached": [f"{h.layer}.{g}" for g in reached],
    }


def _one_head(model: Model, head: Any) -> Head:
    """The one head `intervene` edits, checked against the model."""
    if isinstance(head, tuple) and len(head) == 2 and all(isinstance(x, int) for x in head):
        head = [head]  # (layer, head), or a Head
    heads = parse_heads(head)
    if len(heads) != 1:
        raise checks.BadArgument(
            f"intervene edits one head at a time, got {[h.label for h in heads]}: call it once "
            "per head."
        )
    model.check_heads(heads)
    return heads[0]


def _check_eager(model: Model) -> None:
    implementation = getattr(model.lm.config, "_attn_implementation", None)
    if implementation != "eager":
        raise checks.BadArgument(
            f"verify=True reads the model's own attention weights, which only eager attention "
            f"returns ({model.name} uses {implementation!r}): load it with "
            "attn_implementation='eager', or drop verify."
        )


def _subspace(basis: Any, name: str | None, d_head: int, head: str) -> tuple[str, np.ndarray]:
    """(the subspace's name, its orthonormal basis [d_head, r]); refuses a zero basis."""
    if name is None:
        feature = getattr(basis, "coords", {}).get("feature")
        name = str(feature.item()) if feature is not None and feature.ndim == 0 else "subspace"
    v = orthogonalize([as_basis(basis, d_head, what=f"Basis {name!r}", head=head)])[0]
    if v.shape[1] == 0:
        raise checks.BadArgument(f"Basis {name!r} is numerically zero: give it non-zero columns.")
    return name, v


@old_keywords(10)
def intervene_captured(
    captured: xr.Dataset,
    head: Any,
    basis: Any,
    *,
    orig: Sequence[int],
    target: Sequence[int],
    edit: Edit | Mode = "swap",
    name: str | None = None,
    random: RandomBaseline | int | None = None,
) -> xr.Dataset:
    """`intervene`'s key-side metrics, computed from a capture with no forward pass.

    A key edit changes only the logits of the edited keys, so the head's attention after the
    edit follows from the captured q, k, logits and attention (`qktrace.capture` with
    ``attention=True``): the edited keys' logits are recomputed with the head's scaling and
    soft cap (coordinates ``scaling``, ``softcap``), and the softmax normalizer is corrected
    for them (log Z = capped logit - log attention of the most attended candidate). Keys the
    model's mask hides (zero attention although their logit is not negligible: a sliding
    window) stay hidden. The candidate keys are the captured keys; orig, target and `at` must
    be among them. The Dataset is the one `intervene` returns for ``side="key"``, equal to its
    in-trace values to float precision (tests/test_interventions.py); use `intervene` for query
    edits and `intervene_answers` for what the model then says.

    Parameters
    ----------
    captured
        From `qktrace.capture` (one query per prompt, ``attention=True``), with `head`.
    head, basis, orig, target, edit, name, random
        As in `intervene`, key side: the edit's `at` gives key positions per prompt (default:
        orig), its `source` is [n_prompts, d_head] or [n_prompts, n_at, d_head]; `random`
        defaults to ``RandomBaseline(10)``. ``n_random=``, ``seed=`` and ``key_scope=`` still
        work for one release, with a DeprecationWarning (as in `intervene`).
    """
    edit = Edit.of(edit)
    baseline = _check_captured(captured, edit, random)
    label, ds = _captured_head(captured, head)
    n, d_head = ds.sizes["prompt"], ds.sizes["d_head"]
    checks.one_per_prompt("orig", orig, n, what="key position")
    checks.one_per_prompt("target", target, n, what="key position")
    name, v = _subspace(basis, name, d_head, label)
    keys = _CapturedKeys(ds)
    orig_slot = np.array([keys.slot(p, o, "orig") for p, o in enumerate(orig)])
    target_slot = np.array([keys.slot(p, t, "target") for p, t in enumerate(target)])
    if (orig_slot == target_slot).any():
        p = int(np.argmax(orig_slot == target_slot))
        raise BadArgument(f"Prompt {p}: orig and target are the same key; name two keys.")
    edit_slot, first = _captured_edit_slots(edit, keys, orig_slot, target_slot)
    src = None
    if edit.mode == "patch":
        array = _source_array(edit.source, n, d_head)
        if array.shape[1] == 1:
            array = np.repeat(array, edit_slot.shape[1], axis=1)
        src = torch.tensor(array[:, : edit_slot.shape[1]], dtype=torch.float64)
    bases = [v, *_random_bases(d_head, v.shape[1], baseline)]
    values = _edited_attention(ds, bases, edit.mode, edit_slot, first, src)
    names = _subspace_names(name, baseline.n)
    out = _metrics(keys.keys, values, orig_slot, target_slot, names).assign_coords(
        prompt=ds["prompt"].values
    )
    from qktrace.store import provenance

    rank, mode = v.shape[1], edit.mode
    params = {"head": label, "name": name, "mode": mode, "side": "key", "rank": rank,
              "n_random": baseline.n, "n_prompts": n}  # fmt: skip
    attrs = provenance("intervene_captured", params, inputs=captured.attrs, seed=baseline.seed)
    return out.assign(basis=(("d_head", "component"), v.astype(np.float32))).assign_attrs(
        attrs, head=label, name=name, side="key", mode=mode, rank=rank, n_random=baseline.n,
        key_scope=edit.key_scope, forward_passes=0,
    )  # fmt: skip


def _check_captured(
    captured: xr.Dataset, edit: Edit, random: RandomBaseline | int | None
) -> RandomBaseline:
    """`intervene_captured`'s checks of its edit, its baselines and the capture's variables."""
    if edit.side != "key":
        raise checks.BadArgument(
            "intervene_captured computes key edits; for a query edit use qktrace.intervene."
        )
    baseline = RandomBaseline.of(random, 10)
    for var in ("q", "k", "logit", "attention"):
        if var not in captured:
            raise BadArgument(
                f"captured has no {var!r}: pass a `qktrace.capture` result made with "
                "attention=True."
            )
    if "softcap" not in captured.coords:
        raise BadArgument(
            "captured has no 'softcap' coordinate (made by an older qktrace): capture again."
        )
    return baseline


def _captured_head(captured: xr.Dataset, head: Any) -> tuple[str, xr.Dataset]:
    """(the head's label, its capture at the one query of each prompt)."""
    label = parse_heads([head] if isinstance(head, tuple) else head)[0].label
    if label not in captured["head"].values:
        raise BadArgument(
            f"head {label!r} is not in captured (heads {list(map(str, captured['head'].values))})"
            ": capture it too."
        )
    ds = captured.sel(head=label)
    if ds.sizes["query"] != 1:
        raise BadArgument(
            "intervene_captured takes one query per prompt: capture with query='last'."
        )
    return label, ds.isel(query=0)


class _CapturedKeys:
    """The captured candidate keys of one head: their slots, and a position's slot."""

    def __init__(self, ds: xr.Dataset) -> None:
        self.slots = ds["key_position"].transpose("prompt", "key").values
        self.n_tokens = ds["n_tokens"].values
        tokens = ds["key_token"].transpose("prompt", "key").values if "key_token" in ds else None
        self.keys = _Keys(
            slots=self.slots,
            tokens=tokens if tokens is not None else np.full(self.slots.shape, "", dtype=object),
            texts=ds["prompt_text"].values,
            n_tokens=self.n_tokens,
            query_position=ds["query_position"].values,
        )

    def slot(self, p: int, position: int, what: str) -> int:
        """The slot of key `position` (negative counts from the end) of prompt `p`."""
        pos = position + int(self.n_tokens[p]) if position < 0 else position
        row = self.slots[p].tolist()
        if pos not in row:
            raise BadArgument(
                f"Prompt {p}: the {what} position {position} is not among its captured keys "
                f"{[s for s in row if s >= 0]}: capture that key too."
            )
        return row.index(pos)


def _captured_edit_slots(
    edit: Edit, keys: _CapturedKeys, orig_slot: np.ndarray, target_slot: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The edited key slots per prompt [prompt, m] (a shorter row repeats its last slot) and
    which of them are not repeats."""
    at, n = edit.at, len(orig_slot)
    if edit.mode == "swap":
        rows = [[o, t] for o, t in zip(orig_slot, target_slot, strict=True)]
    elif at is None:
        rows = [[o] for o in orig_slot]
    else:
        if len(at) != n:
            raise BadArgument(f"at= must give key positions for each of the {n} prompts.")
        per_prompt = cast(Sequence[int | Sequence[int]], at)
        rows = [
            [keys.slot(p, int(x), "at=") for x in ([row] if isinstance(row, int) else row)]
            for p, row in enumerate(per_prompt)
        ]
        if any(len(set(r)) != len(r) or not r for r in rows):
            raise BadArgument("at= must give each prompt one or more distinct key positions.")
    width = max(len(r) for r in rows)
    edit_slot = np.array([[r[min(j, len(r) - 1)] for j in range(width)] for r in rows])
    first = np.array([[j < len(r) for j in range(width)] for r in rows])  # not a repeat
    return edit_slot, first


def _edited_attention(
    ds: xr.Dataset,
    bases: list[np.ndarray],
    mode: str,
    edit_slot: np.ndarray,
    first: np.ndarray,
    src: torch.Tensor | None,
) -> dict[str, np.ndarray]:
    """The head's logits and attention at the captured keys before and after the edit in each
    basis, with no forward pass (see `intervene_captured`)."""
    n = ds.sizes["prompt"]
    q = torch.tensor(ds["q"].transpose("prompt", "d_head").values, dtype=torch.float64)
    k = torch.tensor(ds["k"].transpose("prompt", "key", "d_head").values, dtype=torch.float64)
    logit = ds["logit"].transpose("prompt", "key").values.astype(np.float64)
    attention = ds["attention"].transpose("prompt", "key").values.astype(np.float64)
    slots = ds["key_position"].transpose("prompt", "key").values
    scaling = float(ds["scaling"])
    softcap = float(ds["softcap"])
    cap = (lambda x: x) if not np.isfinite(softcap) else (lambda x: np.tanh(x / softcap) * softcap)

    rows = np.arange(n)[:, None]
    picked = k[torch.arange(n)[:, None], torch.tensor(edit_slot)]  # [prompt, m, d]
    stack = torch.tensor(np.stack(bases), dtype=torch.float64)[:, None]  # [S, 1, d, r]
    edited = ops.edit_in_subspace(picked, stack, mode, src)  # [S, prompt, m, d]
    # the edit's change of each edited key's logit: only the part of q and k in the edited
    # subspaces counts (so coordinates of q and k in those subspaces suffice, `project=`)
    change = (((edited - picked) @ q[:, :, None])[..., 0] * scaling).numpy()  # [S, prompt, m]
    new_logit = logit[rows, edit_slot][None] + change

    a = np.where(slots >= 0, attention, np.nan)
    best = np.nanargmax(np.where(np.isfinite(a), a, -1.0), axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_z = cap(logit[np.arange(n), best]) - np.log(a[np.arange(n), best])
        allowed = (a > 0) | (cap(logit) - log_z[:, None] < -80.0)
        # every key the edit changes leaves the normalizer, then comes back with its new logit
        allowed_e = allowed[rows, edit_slot] & first
        removed = np.where(allowed_e, a[rows, edit_slot], 0.0).sum(-1)
        new_weight = np.where(allowed_e, np.exp(cap(new_logit) - log_z[:, None]), 0.0)
        denom = 1.0 - removed + new_weight.sum(-1)  # [S, prompt]
        logit_after = np.repeat(logit[None], len(bases), axis=0)
        weight_after = np.repeat(np.where(allowed, a, 0.0)[None], len(bases), axis=0)
        for j in range(edit_slot.shape[1]):
            logit_after[:, np.arange(n), edit_slot[:, j]] = new_logit[:, :, j]
            weight_after[:, np.arange(n), edit_slot[:, j]] = new_weight[:, :, j] + np.where(
                first[:, j], 0.0, weight_after[:, np.arange(n), edit_slot[:, j]]
            )
        attention_after = weight_after / denom[:, :, None]
    return {
        "logit_before": logit,
        "attention_before": attention,
        "logit_after": logit_after.transpose(1, 0, 2),
        "attention_after": attention_after.transpose(1, 0, 2),
    }


def _source_array(source: Any, n_prompts: int, d_head: int) -> np.ndarray:
    """Patch sources as float32 [n_prompts, m, d_head]."""
    if isinstance(source, xr.DataArray):
        extra = [d for d in source.dims if d not in ("prompt", "d_head")]
        for d in list(extra):
            if source.sizes[d] == 1 and d in ("head", "query"):
                source = source.isel({d: 0})
                extra.remove(d)
        if "prompt" not in source.dims or "d_head" not in source.dims or len(extra) > 1:
            raise BadArgument(
                f"source has dims {source.dims}; expected (prompt, d_head) or (prompt, <slot>, "
                "d_head), e.g. capture(...).k.sel(head='16.19').isel(key=0)."
            )
        source = source.transpose("prompt", *extra, "d_head").values
    array = np.asarray(source, dtype=np.float32)
    if array.ndim == 2:
        array = array[:, None, :]
    if array.ndim != 3 or array.shape[0] != n_prompts or array.shape[2] != d_head:
        raise BadArgument(
            f"source has shape {tuple(array.shape)}; expected [n_prompts, d_head] = "
            f"[{n_prompts}, {d_head}] or [n_prompts, n_at, d_head] = [{n_prompts}, n_at, {d_head}]."
        )
    return array


class _Stage:
    """Where `intervene` edits each batch: the padded edit index [b, m], patch sources [b, m, d]
    and the orig/target key slots. `check` runs the same checks on a batch's positions when
    `plan_run` plans the run, so a bad position stops it before any trace."""

    def __init__(
        self,
        orig: Sequence[int],
        target: Sequence[int],
        edit: Edit,
        sources: np.ndarray | None,
    ) -> None:
        self.orig, self.target, self.edit, self.sources = orig, target, edit, sources

    def check(
        self, start: int, lengths: list[int], query: list[list[int]], keys: list[list[int]]
    ) -> None:
        self._positions(start, lengths, query, keys)

    def __call__(
        self, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor | None, np.ndarray, np.ndarray]:
        enc = batch.encoded
        query = [row.tolist() for row in batch.query_slots]
        keys = [row.tolist() for row in batch.key_slots]
        edit, orig_slot, target_slot = self._positions(batch.start, enc.lengths, query, keys)
        width = max(len(r) for r in edit)
        index = torch.tensor(
            [
                [enc.padded(i, r[min(j, len(r) - 1)]) for j in range(width)]
                for i, r in enumerate(edit)
            ]
        )
        source_t = None
        if self.sources is not None:
            rows = []
            for i, r in enumerate(edit):
                src = self.sources[batch.start + i]
                src = np.broadcast_to(src, (len(r), src.shape[1])) if src.shape[0] == 1 else src
                rows.append([src[min(j, len(r) - 1)] for j in range(width)])
            source_t = torch.tensor(np.array(rows), dtype=torch.float32)
        return index, source_t, np.array(orig_slot), np.array(target_slot)

    def _positions(
        self, start: int, lengths: list[int], query: list[list[int]], keys: list[list[int]]
    ) -> tuple[list[list[int]], list[int], list[int]]:
        """Positions to edit per prompt, and the orig and target slots among its keys."""
        if any(len(row) != 1 for row in query):
            raise BadArgument("intervene takes one query position per prompt (e.g. query='last').")
        n = len(lengths)
        o_pos = _one_position(self.orig[start : start + n], lengths, "Orig", start)
        t_pos = _one_position(self.target[start : start + n], lengths, "Target", start)
        orig_slot, target_slot = [], []
        for i, (o, t) in enumerate(zip(o_pos, t_pos, strict=True)):
            p = start + i
            if o == t:
                raise BadArgument(
                    f"Prompt {p}: orig and target are the same position {o}; they must name two "
                    "different keys (the attended one and the one attention should move to)."
                )
            row = keys[i]
            for what, pos in (("orig", o), ("target", t)):
                if pos not in row:
                    raise BadArgument(
                        f"Prompt {p}: the {what} position {pos} is not among its candidate keys "
                        f"{[s for s in row if s >= 0]}: add it to keys= (or leave keys=None)."
                    )
            orig_slot.append(row.index(o))
            target_slot.append(row.index(t))
        at = self.edit.at
        if self.edit.mode == "swap":
            edit = [[o, t] for o, t in zip(o_pos, t_pos, strict=True)]
        elif at is not None:
            spec = at if isinstance(at, str) else cast(Positions, list(at[start : start + n]))
            edit = resolve_positions(spec, lengths, "Edit (at=)", start)
        elif self.edit.side == "key":
            edit = [[o] for o in o_pos]
        else:
            edit = [[row[0]] for row in query]
        for i, r in enumerate(edit):
            if not r or len(set(r)) != len(r):
                raise BadArgument(
                    f"Prompt {start + i}: at= gives {r}; give each prompt one or more "
                    "distinct positions to edit."
                )
            if self.sources is not None:
                src = self.sources[start + i]
                src = np.broadcast_to(src, (len(r), src.shape[1])) if src.shape[0] == 1 else src
                given = int(np.isfinite(src).all(axis=1).sum())
                if given != len(r) or not np.isfinite(src[: len(r)]).all():
                    raise BadArgument(
                        f"Prompt {start + i}: source has {given} finite vectors for {len(r)} "
                        "edited positions: give one per position, in order (NaN rows pad a "
                        "shorter prompt), or one per prompt."
                    )
        return edit, orig_slot, target_slot


def _one_position(spec: Sequence[int], lengths: list[int], what: str, first: int) -> list[int]:
    """One position per prompt, resolved (negative counts from the end) and checked."""
    rows = resolve_positions(list(spec), lengths, what, first)
    for i, row in enumerate(rows):
        if len(row) != 1:
            raise BadArgument(
                f"{what} of prompt {first + i} is {row}: give one position per prompt."
            )
    return [row[0] for row in rows]


def _intervene_batch(
    model: Model,
    batch: Batch,
    layer: int,
    head: int,
    side: str,
    mode: str,
    basis: torch.Tensor,
    randoms: torch.Tensor | None,
    edit_index: torch.Tensor,
    source: torch.Tensor | None,
    verify: bool,
) -> dict[str, np.ndarray]:
    """One trace: before, random-baseline and after logits/attention of the head at the keys."""
    inputs = model.attention_inputs(layer)
    kv = model.kv_head(head)
    scaling, softcap = model.scaling(layer), model.softcap(layer)
    query_index, key_index = batch.query_index, batch.key_index
    n_random = 0 if randoms is None else randoms.shape[0]
    with torch.inference_mode(), model.trace(batch.encoded.inputs) as tracer:
        q, k, mask = inputs.read()
        q_sel = ops.gather_heads(q, [head], query_index)
        logit, prob = ops.attention_rows(q_sel, k, [kv], mask, query_index, scaling, softcap)
        saved = [ops.at_keys(logit, key_index), ops.at_keys(prob, key_index)]
        rows = k[:, kv] if side == "key" else q[:, head]  # a view: [batch, tokens, d_head]
        if n_random:
            # baselines, functionally: n edited copies of this head's rows, [n, batch, tokens, d]
            x = rows.float()
            edited = ops.edit_in_subspace(
                ops.gather_positions(x, edit_index),
                randoms[:, None],  # type: ignore[index]  # a tensor whenever n_random > 0
                mode,
                source,
            )
            x_rand = ops.put_positions(x, edit_index, edited)
            if side == "key":
                q_rand = q_sel.expand(-1, n_random, -1, -1)
                k_rand, kv_rand = x_rand.transpose(0, 1), list(range(n_random))
            else:
                q_rand = ops.gather_positions(x_rand, query_index).transpose(0, 1)
                k_rand, kv_rand = k, [kv] * n_random
            logit, prob = ops.attention_rows(
                q_rand, k_rand, kv_rand, mask, query_index, scaling, softcap
            )
            saved += [ops.at_keys(logit, key_index), ops.at_keys(prob, key_index)]
        # the real edit, in place: the model's own attention computes with it
        # (computed in float32, written back in the model's dtype)
        picked = ops.gather_positions(rows, edit_index).float()
        edited = ops.edit_in_subspace(picked, basis, mode, source)
        ops.put_positions(rows, edit_index, edited, inplace=True)
        q_sel = ops.gather_heads(q, [head], query_index)
        logit, prob = ops.attention_rows(q_sel, k, [kv], mask, query_index, scaling, softcap)
        saved += [ops.at_keys(logit, key_index), ops.at_keys(prob, key_index)]
        if verify:
            weights = inputs.weights()[:, [head]]
            saved.append(ops.at_keys(ops.at_queries(weights, query_index), key_index))
        nnsight.save(saved)
        if not verify:  # verify reads the model's own attention call: let it run in full
            tracer.stop()
    return _batch_values([s[:, :, 0].float().cpu().numpy() for s in saved], n_random, verify)


def _batch_values(arrays: list[np.ndarray], n_random: int, verify: bool) -> dict[str, np.ndarray]:
    """The saved [batch, 1 or n, key] arrays of one trace (before; the random baselines when
    there are any; after; the model's own attention with `verify`) -> named values, the
    recovered subspace's "after" first, then the baselines'."""
    out = {"logit_before": arrays[0][:, 0], "attention_before": arrays[1][:, 0]}
    after = arrays[2:4] if not n_random else arrays[4:6]
    out["logit_after"], out["attention_after"] = after[0], after[1]
    if n_random:
        out["logit_after"] = np.concatenate([out["logit_after"], arrays[2]], axis=1)
        out["attention_after"] = np.concatenate([out["attention_after"], arrays[3]], axis=1)
    if verify:
        out["model_attention"] = arrays[-1][:, 0]
    return out


def _dataset(
    parts: list[tuple[_Keys, dict[str, np.ndarray], np.ndarray, np.ndarray]],
    names: list[str],
) -> xr.Dataset:
    """Per-batch keys, arrays and orig/target slots of a traced run -> the labelled metrics."""
    keys = _Keys(*(np.concatenate([getattr(p[0], f.name) for p in parts]) for f in fields(_Keys)))
    values = {k: np.concatenate([p[1][k] for p in parts]) for k in parts[0][1]}
    orig_slot = np.concatenate([p[2] for p in parts])
    target_slot = np.concatenate([p[3] for p in parts])
    return _metrics(keys, values, orig_slot, target_slot, names)


@dataclass
class _Keys:
    """The candidate keys of every prompt: positions (-1 = none), tokens, and prompt facts."""

    slots: np.ndarray
    tokens: np.ndarray
    texts: np.ndarray
    n_tokens: np.ndarray
    query_position: np.ndarray

    @classmethod
    def of(cls, batch: Batch) -> _Keys:
        """The candidate keys of a batch's prompts (only what the result keeps of the batch)."""
        tokens = [
            [batch.encoded.tokens[i][p] if p >= 0 else "" for p in row]
            for i, row in enumerate(batch.key_slots)
        ]
        return cls(
            slots=batch.key_slots,
            tokens=np.array(tokens, dtype=object),
            texts=np.array(batch.texts, dtype=object),
            n_tokens=np.array(batch.encoded.lengths),
            query_position=batch.query_slots[:, 0],
        )


def _mean_where_defined(x: np.ndarray) -> np.ndarray:
    """Mean over axis 0 of the non-NaN values; NaN (and no warning) where there are none."""
    defined = ~np.isnan(x)
    n = defined.sum(0)
    total = np.where(defined, x, 0.0).sum(0)
    return np.divide(total, n, out=np.full(total.shape, np.nan, dtype=total.dtype), where=n > 0)


def _metrics(
    keys: _Keys,
    values: dict[str, np.ndarray],
    orig_slot: np.ndarray,
    target_slot: np.ndarray,
    names: list[str],
) -> xr.Dataset:
    """Per-prompt logits/attention at the candidate keys -> the labelled Dataset with the metrics.

    values: ``logit_before``/``attention_before`` [prompt, key], ``logit_after``/
    ``attention_after`` [prompt, subspace, key], optionally ``model_attention`` [prompt, key].
    """
    slots = keys.slots
    valid = slots >= 0
    rows = np.arange(len(slots))

    def hide(x: np.ndarray) -> np.ndarray:
        return np.where(valid if x.ndim == 2 else valid[:, None], x, np.nan)

    a_before = hide(values["attention_before"])  # [prompt, key]
    a_after = hide(values["attention_after"])  # [prompt, subspace, key]
    l_before, l_after = hide(values["logit_before"]), hide(values["logit_after"])
    best_before = _argmax(a_before)  # slot
    best_after = _argmax(a_after)  # [prompt, subspace]
    attends_orig = best_before == orig_slot
    flip = attends_orig[:, None] & (best_after == target_slot[:, None])
    p_before = _p_target(a_before, orig_slot, target_slot)
    p_after = np.stack(
        [_p_target(a_after[:, s], orig_slot, target_slot) for s in range(len(names))], axis=1
    )
    at_before = a_before[rows, target_slot]
    at_after = a_after[rows, :, target_slot]
    ps = ("subspace", "prompt")
    n_orig = int(attends_orig.sum())
    data: dict[str, Any] = {
        "logit_before": (("prompt", "key"), l_before),
        "attention_before": (("prompt", "key"), a_before),
        "logit_after": (("subspace", "prompt", "key"), l_after.transpose(1, 0, 2)),
        "attention_after": (("subspace", "prompt", "key"), a_after.transpose(1, 0, 2)),
        "p_target_before": ("prompt", p_before),
        "p_target_after": (ps, p_after.T),
        "delta_p_target": (ps, (p_after - p_before[:, None]).T),
        "attention_target_before": ("prompt", at_before),
        "attention_target_after": (ps, at_after.T),
        "argmax_before": ("prompt", slots[rows, best_before]),
        "argmax_after": (ps, np.take_along_axis(slots, best_after, axis=1).T),
        "attends_orig": ("prompt", attends_orig),
        "flip": (ps, flip.T),
        "mean_delta_p_target": ("subspace", _mean_where_defined(p_after - p_before[:, None])),
        "flip_rate": ("subspace", flip.sum(0) / n_orig if n_orig else np.full(len(names), np.nan)),
        "mean_attention_target_before": ((), float(np.nanmean(at_before))),
        "mean_attention_target_after": ("subspace", np.nanmean(at_after, axis=0)),
    }
    if "model_attention" in values:
        data["model_attention"] = (("prompt", "key"), hide(values["model_attention"]))
    from qktrace.core.intervals import swap_intervals

    ds = xr.Dataset(data, coords=_key_coords(keys, orig_slot, target_slot, names))
    return ds.assign(swap_intervals(ds).data_vars)


def _p_target(a: np.ndarray, orig_slot: np.ndarray, target_slot: np.ndarray) -> np.ndarray:
    """a_t / (a_o + a_t) per prompt; NaN where both are 0 (e.g. keys outside a sliding window)."""
    rows = np.arange(len(a))
    o, t = a[rows, ..., orig_slot], a[rows, ..., target_slot]
    total = o + t
    share = np.full(total.shape, np.nan, dtype=np.result_type(t, total))
    return np.divide(t, total, out=share, where=total > 0)


def _argmax(a: np.ndarray) -> np.ndarray:
    """The most attended candidate key (last axis), NaN (no key) never."""
    return np.where(np.isnan(a), -np.inf, a).argmax(-1)


def _key_coords(
    keys: _Keys, orig_slot: np.ndarray, target_slot: np.ndarray, names: list[str]
) -> dict[str, Any]:
    """The coordinates of `intervene`'s result: subspaces, prompts and their candidate keys."""
    slots = keys.slots
    rows = np.arange(len(slots))
    role = np.full(slots.shape, "", dtype=object)
    role[rows, orig_slot] = "orig"
    role[rows, target_slot] = "target"
    return {
        "subspace": names,
        "random": ("subspace", np.array([False] + [True] * (len(names) - 1))),
        "prompt": np.arange(len(slots)),
        "prompt_text": ("prompt", keys.texts),
        "n_tokens": ("prompt", keys.n_tokens),
        "query_position": ("prompt", keys.query_position),
        "orig_position": ("prompt", slots[rows, orig_slot]),
        "target_position": ("prompt", slots[rows, target_slot]),
        "key_position": (("prompt", "key"), slots),
        "key_token": (("prompt", "key"), keys.tokens),
        "key_role": (("prompt", "key"), role),
    }
