"""A declared study's prompts, tokenized and resolved, with every declaration checked first.

`prepare` calls the study's functions on each prompt (labels, answer, swap, coords) and
checks what they return against the prompt's keys before any forward pass. Each error is a
`StudyError` that names the study, the prompt (its index and text) and the fix.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from qktrace.core.errors import StudyError
from qktrace.core.prompts import Prompt, locate
from qktrace.verbs.reduce import CONTRASTS, Label


class StudyFields(Protocol):
    """What `prepare` reads of a study: the fields of `qktrace.study.pipeline.Study` it calls.

    A protocol here, not that class, because the pipeline (which defines and runs studies)
    imports this module.
    """

    @property
    def name(self) -> str: ...
    @property
    def source(self) -> str: ...
    @property
    def prompts(self) -> Callable[[int, int], Sequence[Prompt]]: ...
    @property
    def keys(self) -> str: ...
    @property
    def query(self) -> str: ...
    @property
    def labels(self) -> Callable[[Prompt], Sequence[Label]]: ...
    @property
    def counterfactual(self) -> Callable[[Prompt, np.random.Generator], Prompt] | None: ...
    @property
    def answer(self) -> Callable[[Prompt], int] | None: ...
    @property
    def swap(
        self,
    ) -> Callable[[Prompt, np.random.Generator], tuple[int | list[int], int]] | None: ...
    @property
    def coords(self) -> Callable[[Prompt], Mapping[str, Any]] | None: ...
    @property
    def answers(self) -> Callable[[Prompt], Sequence[str]] | Literal["keys"] | None: ...


# coordinate names the pipeline writes itself; a study's own coordinates may not take them
RESERVED = {"prompt", "key", "query", "head", "text", "key_label", "key_feature", "swap_feature"}
RESERVED |= {"answer_text", "key_position", "key_token", "query_position", "prompt_text"}
# the variables, coordinates and dims a study's store has: a prompt coordinate of one of these
# names could not be stored beside them (refused before any forward pass)
STORE_NAMES = (
    frozenset(
        """
    answer_argmax_after answer_argmax_before answer_candidate_mass answer_candidate_token
    answer_correct answer_flip answer_flip_rate answer_heads answer_index answer_logit_after
    answer_logit_before answer_logit_diff_after answer_logit_diff_before answer_moved
    answer_moved_rate answer_prob_after answer_prob_before answer_random answer_subspace
    argmax_after argmax_before attends_orig attention attention_after attention_before
    attention_target_after attention_target_before component contrast d_head
    delta_answer_logit_diff delta_c delta_p_answer delta_p_target delta_p_target_answer dk dq
    feature flip flip_rate k k_sum key_basis key_pc key_role kv_head layer logit logit_after
    logit_before logit_part explained part part_rank mean_answer_candidate_mass
    mean_attention_target_after mean_attention_target_before mean_delta_answer_logit_diff
    mean_delta_p_answer mean_delta_p_target mean_delta_p_target_answer n_tokens null_quantile
    null_rank null_singular_values orig_position p_answer_after p_answer_before p_target_after
    p_target_answer_after p_target_answer_before p_target_before pair_count pc
    pc_variance_ratio q q_head q_sum qk_sum query_basis query_token random rank scaling
    singular_values softcap subspace target_answer_index target_position union_rank
""".split()
    )
    - RESERVED
)


@dataclass
class Prepared:
    """A study's prompts, tokenized, with every declared position, label and swap resolved."""

    prompts: list[Prompt]
    ids: list[list[int]]
    keys: list[list[int]]  # per prompt, the token position of each key
    query: Literal["last"] | list[int]  # "last" or one token position per prompt
    labels: list[list[Label]]
    answer: list[int]  # per prompt, index of the answer key
    swap: list[tuple[int, int, str]]  # per prompt, (orig key, target key, feature swapped)
    coords: dict[str, Any]
    first_keys: list[list[int]]  # per prompt, the position of each key span's first token
    # per prompt, the keys of which the most attended is the swap's orig (None: swap[i][0])
    orig_choices: list[list[int] | None]
    counterfactual_ids: list[list[int]] | None = None  # subspace prompts of a counterfactual study
    counterfactual_keys: list[list[int]] | None = None

    def answer_features(self) -> list[str]:
        """Per prompt, the feature of its answer key (labelled positive, so never None)."""
        features = []
        for row, answer in zip(self.labels, self.answer, strict=True):
            label = row[answer]
            assert label is not None, "the answer key is labelled (checked by prepare)"
            features.append(str(label[0]))
        return features


@dataclass
class At:
    """One prompt of a study, for calling the study's functions on it and naming it in errors."""

    study: StudyFields
    index: int
    prompt: Any

    def error(self, problem: str, fix: str) -> StudyError:
        text = _short(self.prompt.text) if isinstance(self.prompt, Prompt) else repr(self.prompt)
        return StudyError(
            f"Study {self.study.name!r}, prompt {self.index} ({text}) {problem}; {fix}."
        )

    def call(self, what: str, fn: Callable, *args: Any) -> Any:
        """``fn(*args)``; an exception it raises names the study, the function and this prompt."""
        try:
            return fn(*args)
        except StudyError:
            raise
        except Exception as err:
            source = f" in {self.study.source}" if self.study.source else ""
            raise self.error(
                f"made {what} raise {type(err).__name__}: {err}", f"fix {what}{source}"
            ) from err


def prepare(
    study: StudyFields, tokenizer: Any, n: int, seed: int, chat: bool | None, role: str
) -> Prepared:
    """Make `n` prompts of `study` and resolve its declarations, checking each.

    `role` "subspace": the prompts whose contrasts give ΔC, drawn with `seed` (the run's),
    and every feature must have positive and negative keys; "fresh": the prompts of the
    checks, drawn with ``seed + 1``. Default swap targets are drawn with ``seed + 2``.
    """
    run_seed, seed = seed, seed + (role == "fresh")
    try:
        prompts = study.prompts(n, seed)
    except Exception as err:
        raise StudyError(
            f"Study {study.name!r}: prompts(n={n}, seed={seed}) raised {type(err).__name__}: "
            f"{err}; fix the study's prompts function."
        ) from err
    if not isinstance(prompts, Sequence) or len(prompts) != n:
        got = len(prompts) if isinstance(prompts, Sequence) else type(prompts).__name__
        raise StudyError(
            f"Study {study.name!r}: prompts(n={n}, seed={seed}) returned {got} instead of a "
            f"list of {n} Prompt objects; build each with qktrace.core.prompts.PromptBuilder."
        )
    loc, keys, query = _tokenize(study, tokenizer, prompts, chat, f"{role} prompts")
    first_keys = locate(tokenizer, prompts, chat=chat, which="first").positions[study.keys]

    labels = []
    for i, p in enumerate(prompts):
        at = At(study, i, p)
        labels.append(_labels(at, at.call("labels(prompt)", study.labels, p), len(keys[i])))
    if role == "subspace" and study.counterfactual is None:
        check_contrasts(study, labels)
    rng = np.random.default_rng(run_seed + 2)
    answer, swap = [], []
    choices: list[list[int] | None] = []
    for i, (p, row) in enumerate(zip(prompts, labels, strict=True)):
        at = At(study, i, p)
        answer.append(_answer(at, row))
        if study.swap is None:
            others = [j for j in range(len(row)) if j != answer[-1]]
            pair: Any = (answer[-1], int(rng.choice(others)))
        else:
            pair = at.call("swap(prompt, rng)", study.swap, p, rng)
        if isinstance(pair, tuple | list) and len(pair) == 2 and isinstance(pair[0], list):
            choices.append(pair[0])  # the most attended of these is the orig key
            pair = (pair[0][0] if pair[0] else None, pair[1])
        else:
            choices.append(None)
        swap.append(_swap(at, pair, row))
        if choices[-1] is not None and (set(choices[-1]) - set(range(len(row))) or
                                        swap[-1][1] in choices[-1]):  # fmt: skip
            raise at.error(
                f"got swap {choices[-1]!r} -> {swap[-1][1]}: orig choices must be key indices, "
                "without the target",
                "return ([keys the orig is the most attended of], target)",
            )
    coords = _coords(study, prompts, keys, labels, swap)
    prepared = Prepared(
        list(prompts), loc.ids, keys, query, labels, answer, swap, coords, first_keys, choices
    )
    if role == "subspace" and study.counterfactual is not None:
        _add_counterfactuals(study, tokenizer, prepared, chat, run_seed)
    return prepared


def _add_counterfactuals(
    study: StudyFields, tokenizer: Any, prepared: Prepared, chat: bool | None, seed: int
) -> None:
    """Each subspace prompt's counterfactual (drawn with ``seed + 3``), located and checked."""
    rng = np.random.default_rng(seed + 3)
    flipped = []
    for i, p in enumerate(prepared.prompts):
        at = At(study, i, p)
        label = prepared.labels[i][prepared.answer[i]]
        if label is None or label[1] != "positive":
            raise at.error(
                f"has answer key {prepared.answer[i]} labelled {label!r}; a counterfactual study "
                "contrasts the answer key with its counterfactual",
                "label the answer key (feature, 'positive')",
            )
        other = at.call("counterfactual(prompt, rng)", study.counterfactual, p, rng)  # type: ignore[arg-type]  # set: this runs for a counterfactual study
        if not isinstance(other, Prompt):
            raise at.error(f"got a {type(other).__name__} from counterfactual(prompt, rng)",
                           "return a Prompt (PromptBuilder)")  # fmt: skip
        n, m = len(p.spans[study.keys]), len(other.spans.get(study.keys, []))
        if m != n:
            raise at.error(
                f"has {n} keys but its counterfactual ({_short(other.text)}) has {m}",
                "keep every key span in the counterfactual; change only the feature",
            )
        flipped.append(other)
    loc, keys, _ = _tokenize(study, tokenizer, flipped, chat, "counterfactual prompts")
    prepared.counterfactual_ids, prepared.counterfactual_keys = loc.ids, keys


def _tokenize(
    study: StudyFields, tokenizer: Any, prompts: Sequence[Any], chat: bool | None, what: str
) -> tuple[Any, list[list[int]], Literal["last"] | list[int]]:
    """(located prompts, key positions, query) after checking every prompt's spans."""
    for i, p in enumerate(prompts):
        at = At(study, i, p)
        if not isinstance(p, Prompt):
            raise at.error(f"is a {type(p).__name__}", "build prompts with PromptBuilder")
        n_keys = len(p.spans.get(study.keys, []))
        if n_keys < 2:
            raise at.error(
                f"has {n_keys} spans named {study.keys!r} (its spans: {sorted(p.spans)}), and "
                "a contrast and a swap need two keys",
                f"mark every key with PromptBuilder.add(text, {study.keys!r})",
            )
        n_query = len(p.spans.get(study.query, []))
        if study.query != "last" and n_query != 1:
            raise at.error(
                f"has {n_query} spans named {study.query!r} (the query)",
                "mark one query span per prompt, or declare query='last'",
            )
    try:
        loc = locate(tokenizer, prompts, chat=chat)
    except ValueError as err:
        raise StudyError(f"Study {study.name!r} ({what}): {err}") from err
    keys = loc.positions[study.keys]
    _check_known_tokens(study, tokenizer, prompts, loc.ids, keys)
    query: Literal["last"] | list[int] = (
        "last" if study.query == "last" else [row[0] for row in loc.positions[study.query]]
    )

    return loc, keys, query


def check_contrasts(study: StudyFields, labels: list[list[Label]]) -> None:
    """Every feature needs positive and negative pairs among the subspace prompts."""
    count: dict[str, dict[str, int]] = {}
    for row in labels:
        for label in row:
            if label is not None:
                count.setdefault(label[0], dict.fromkeys(CONTRASTS, 0))[label[1]] += 1
    n = len(labels)
    if not count:
        raise StudyError(
            f"Study {study.name!r}: labels(prompt) left every key of the {n} subspace prompts "
            "unlabelled (None); label the key the query should pick (feature, 'positive') "
            "and the others (feature, 'negative')."
        )
    for feature, counts in count.items():
        for contrast, other in (("positive", "negative"), ("negative", "positive")):
            if counts[contrast] == 0:
                raise StudyError(
                    f"Study {study.name!r}: feature {feature!r} has no {contrast} pairs in the "
                    f"{n} subspace prompts ({counts[other]} {other}), so ΔC = C+ - C- cannot be "
                    f"formed; make labels(prompt) give some keys ({feature!r}, {contrast!r}), or "
                    "give more prompts (n_prompts, CLI --n-prompts)."
                )


def _short(text: str, n: int = 70) -> str:
    return repr(text if len(text) <= n else text[: n - 3] + "...")


def _labels(at: At, given: Any, n_keys: int) -> list[Label]:
    spans = at.prompt.span_texts(at.study.keys)
    if not isinstance(given, Sequence) or isinstance(given, str):
        raise at.error(f"got {given!r} from labels(prompt)", "return a list, one label per key")
    row = list(given)
    if len(row) != n_keys:
        raise at.error(
            f"got {len(row)} labels from labels(prompt) for its {n_keys} keys {spans}",
            "return one label per key span, in order: (feature, 'positive' | 'negative') or None",
        )
    for j, label in enumerate(row):
        ok = isinstance(label, tuple | list) and len(label) == 2 and isinstance(label[0], str)
        if label is not None and (not ok or label[1] not in CONTRASTS):
            raise at.error(
                f"got label {label!r} for key {j} ({spans[j]!r})",
                "label each key (feature, 'positive'), (feature, 'negative') or None",
            )
    return [None if label is None else (str(label[0]), str(label[1])) for label in row]


def _answer(at: At, labels: list[Label]) -> int:
    if at.study.answer is not None:
        a = at.call("answer(prompt)", at.study.answer, at.prompt)
    else:
        hits = [j for j, label in enumerate(labels) if label and label[1] == "positive"]
        if not hits:
            raise at.error(
                "has no positive key, so no answer key for the head search and the swap",
                "label one key positive in every prompt, or declare answer=",
            )
        a = hits[0]
    if not isinstance(a, int | np.integer) or not 0 <= a < len(labels):
        raise at.error(f"got answer {a!r}, not a key index 0..{len(labels) - 1}", "fix answer=")
    return int(a)


def _swap(at: At, pair: Any, labels: list[Label]) -> tuple[int, int, str]:
    n = len(labels)
    ok = isinstance(pair, tuple | list) and len(pair) == 2
    if not ok or not all(isinstance(x, int | np.integer) and 0 <= x < n for x in pair):
        raise at.error(
            f"got swap {pair!r}, not two key indices in 0..{n - 1}",
            "return (orig, target): the attended key (or a list of keys, of which the most "
            "attended counts) and the key to move attention to",
        )
    orig, target = int(pair[0]), int(pair[1])
    if orig == target:
        raise at.error(f"got swap ({orig}, {target}), one key twice", "return two different keys")
    label = labels[orig]
    if label is None:
        raise at.error(
            f"swaps from key {orig}, which has no label, hence no feature subspace to swap in",
            "swap from a labelled key (the answer)",
        )
    return orig, target, label[0]


def _check_known_tokens(
    study: StudyFields, tokenizer: Any, prompts: Sequence[Prompt], ids: list[list[int]], keys: list
) -> None:
    """A key read as the unknown token has lost its identity: refuse it."""
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is None:
        return
    for i, (row, positions) in enumerate(zip(ids, keys, strict=True)):
        for j, pos in enumerate(positions):
            if row[pos] == unk:
                span = prompts[i].span_texts(study.keys)[j]
                raise At(study, i, prompts[i]).error(
                    f"has key {span!r}, which this model's tokenizer reads as its unknown token",
                    "use words in its vocabulary, or another model (-m)",
                )


def _coords(
    study: StudyFields,
    prompts: Sequence[Prompt],
    keys: list[list[int]],
    labels: list[list[Label]],
    swap: list[tuple[int, int, str]],
) -> dict[str, Any]:
    """Coordinates of the prompts: the study's own, then labels, features, swaps and text."""
    per_prompt: dict[str, list] = {}
    per_key: dict[str, list] = {}
    for i, p in enumerate(prompts):
        at, n_keys = At(study, i, p), len(keys[i])
        given = p.meta if study.coords is None else at.call("coords(prompt)", study.coords, p)
        if callable(study.answers):
            answers = list(at.call("answers(prompt)", study.answers, p))
            if len(answers) != n_keys or not all(isinstance(a, str) and a for a in answers):
                raise at.error(f"got {answers!r} from answers(prompt)", "give one string per key")
            given = {**given, "answer_text": answers}
        source = "meta" if study.coords is None else "coords(prompt)"
        for name, value in dict(given).items():
            if name in RESERVED - {"answer_text"}:
                if study.coords is None:
                    continue  # meta that shares a name with ours stays in meta
                raise at.error(f"has coordinate {name!r}, a name qktrace uses", "rename it")
            if name in STORE_NAMES:
                raise at.error(
                    f"has {source} key {name!r}, the name of a variable of the study's store, so "
                    "it cannot be stored as a coordinate beside it",
                    f"rename it (e.g. {name + '_label'!r})",
                )
            if isinstance(value, str | int | float | bool | np.generic):
                column = per_prompt.setdefault(name, [None] * len(prompts))
                first = next((v for v in column if v is not None), None)
                if first is not None and _kind(first) != _kind(value):
                    raise at.error(
                        f"has {source} {name!r} = {value!r} ({type(value).__name__}), but "
                        f"earlier prompts have {first!r} ({type(first).__name__}); a coordinate "
                        "holds one kind of value",
                        "give every prompt the same type (e.g. all str or all numbers)",
                    )
                column[i] = value
            elif isinstance(value, Sequence) and len(value) == n_keys:
                per_key.setdefault(name, [None] * len(prompts))[i] = list(value)
            elif study.coords is not None:
                raise at.error(
                    f"got coordinate {name!r} = {value!r} from coords(prompt)",
                    f"give a scalar or one value per key ({n_keys})",
                )
    width = max(len(row) for row in keys)
    out: dict[str, Any] = {}
    for name, values in per_prompt.items():
        if None not in values:
            text = any(isinstance(v, str) for v in values)
            out[name] = ("prompt", np.array(values, dtype=object if text else None))
    for name, rows in per_key.items():
        if None not in rows:
            out[name] = (("prompt", "key"), _key_array(rows, width))
    out["key_label"] = (
        ("prompt", "key"),
        _key_array([[x[1] if x else "" for x in r] for r in labels], width),
    )
    out["key_feature"] = (
        ("prompt", "key"),
        _key_array([[x[0] if x else "" for x in r] for r in labels], width),
    )
    out["swap_feature"] = ("prompt", np.array([s[2] for s in swap], dtype=object))
    out["text"] = ("prompt", np.array([p.text for p in prompts], dtype=object))
    return out


def _kind(value: Any) -> str:
    """ "text", "bool" or "number": the kinds a coordinate may not mix."""
    if isinstance(value, str | np.str_):
        return "text"
    return "bool" if isinstance(value, bool | np.bool_) else "number"


def _key_array(rows: list[list[Any]], width: int) -> np.ndarray:
    """Per prompt, one value per key, padded to `width` ("" for text, NaN for numbers)."""
    flat = [v for row in rows for v in row]
    if any(isinstance(v, str | bool | np.bool_) for v in flat):
        return np.array([[str(v) for v in r] + [""] * (width - len(r)) for r in rows], dtype=object)
    if all(len(r) == width for r in rows):
        return np.array(rows)
    return np.array([[float(v) for v in r] + [np.nan] * (width - len(r)) for r in rows])
