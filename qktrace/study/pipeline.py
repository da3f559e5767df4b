"""One pipeline for every study: a study declares what is its own, the pipeline runs the method.

Why a frozen dataclass of functions
-----------------------------------
Two studies differ in a handful of things: their prompts (text with marked spans), which token
is the query and which are the keys, how the keys are labelled into contrasts (within a prompt,
or against a counterfactual prompt), and which keys a swap exchanges. Everything else is the same method: sizes and seeds, the model and its heads,
C+ and C- summed in the trace (resumable), ΔC and its SVD, the permutation null, fresh prompts
captured for PCA, swaps against random subspaces, the store with provenance, the figures. So
a study is a `Study` value whose fields are those few things, as plain functions of one
prompt, and `run_study` owns the rest, as an lm-evaluation-harness task file declares its data,
prompt and metric and the harness owns batching and reporting. A dataclass says the whole
contract in its fields (your editor lists them; a misspelt one fails at once), a study is a
value (``dataclasses.replace(study, n_prompts=64)`` is a variant), and there is no step to
override, which keeps every study's store comparable with every other's. The functions are
ordinary Python, testable without a model.

Everything a study declares is checked before any forward pass, and an error names the study,
the prompt and the fix (`StudyError`).

Examples
--------
A study file (see ``examples/gender_agreement.py``) defines ``study = Study(...)``; run it::

    qktrace study ./my_study.py -m MODEL -o OUT
    python -c "from qktrace.study.pipeline import load_study; load_study('my_study.py').run(out='OUT')"
"""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import xarray as xr

from qktrace.core import checks
from qktrace.core.prompts import Prompt
from qktrace.model.loading import Head, Model, Remote, parse_heads
from qktrace.store import StoreDamagedError
from qktrace.store.locks import one_writer
from qktrace.study.head_search import search_and_capture
from qktrace.study.paired import paired_sums
from qktrace.study.projected import projected_pass
from qktrace.study.prompts import Label, Prepared, StudyError, prepare
from qktrace.study.tools import (
    N_FOUND_HEADS,
    N_RANDOM_ANSWERS,
    ModelLike,
    answer_bars,
    answer_effects,
    answer_per_prompt,
    answer_summary,
    captured_pairs,
    check_design,
    check_out,
    check_sizes,
    checkpoint,
    default_model,
    null_test,
    open_model,
    pca_figure,
    per_prompt,
    rank_figure,
    ranking_variables,
    save_figures,
    stack_heads,
    subspace_pca,
    swap_bars,
    swap_summary,
    trimmed,
    union_basis,
    write,
)
from qktrace.verbs.answers import CandidateMassWarning, low_mass_note, unscored_note
from qktrace.verbs.capture import capture
from qktrace.verbs.decompose import add_pairs, decompose, empty_sums, random_subspaces
from qktrace.verbs.intervene import RandomBaseline, intervene_captured
from qktrace.verbs.reduce import reduce, stored_sums, study_options

__all__ = ["Run", "Study", "StudyError", "StudyOption", "run_study", "load_study", "plot"]

# params["covariance_sums"] of a remote run's store (`qktrace.verbs.reduce.study_options`)
REMOTE_SUMS = (
    "delta_c: remote run, ΔC = C+ - C- summed in the trace and returned as float32 "
    "(reduce delta=True); the store has no qk_sum (C+ and C- apart), only q_sum and k_sum"
)


# params["fresh_capture"] of a remote run's store (`qktrace.study.projected`)
FRESH_PROJECTED = (
    "remote run: the fresh prompts' q and k were reduced in the trace to their coordinates in "
    "the key subspaces and random draws (swaps, PCA) and to the null test's sums; the store has "
    "their attention and logits at the keys, not q and k (qktrace.capture gets those)"
)


# params["subspace_pairs"] of a remote counterfactual study's store (`qktrace.study.paired`)
PAIRS_IN_TRACE = (
    "remote run: the subspace pairs (prompt and counterfactual) were summed in the trace, in "
    "one request, and their permutation null tested there"
)


@dataclass(frozen=True)
class StudyOption:
    """A setting of a study's own, declared in its `Study.options`: a flag of ``qktrace study
    NAME`` (``--n-nouns`` for ``n_nouns``, listed by its --help) and a keyword of its `make`.

    Attributes
    ----------
    default
        The value this study runs with (the flag's default).
    help
        What the setting does, for --help.
    type
        int, float, str, bool (a ``--x/--no-x`` flag) or list (comma-separated names); default:
        the type of `default`.
    choices
        The values a str setting may take (the command line refuses others).
    """

    default: Any
    help: str = ""
    type: builtins.type | None = None
    choices: Sequence[str] = ()

    def __post_init__(self) -> None:
        kind = self.kind
        if kind not in (int, float, str, bool, list):
            raise StudyError(
                f"StudyOption(default={self.default!r}): type {kind.__name__} is not one the "
                "command line reads; use int, float, str, bool or list (comma-separated names)."
            )

    @property
    def kind(self) -> builtins.type:
        """`type`, else the type of `default` (a tuple counts as a list)."""
        if self.type is not None:
            return self.type
        return list if isinstance(self.default, (list, tuple)) else type(self.default)


@dataclass(frozen=True)
class Study:
    """What a study declares; `run_study` does the rest (see the module docstring).

    Attributes
    ----------
    name : str
        The store's name: ``OUT/<name>.zarr`` (letters, digits, ``_`` and ``-``).
    prompts : callable (n, seed) -> list of Prompt
        `n` prompts with marked spans (`qktrace.core.prompts.PromptBuilder`), drawn with `seed`;
        called with ``seed`` for the subspace prompts and ``seed + 1`` for fresh ones.
    keys : str
        The span name whose tokens are the keys (each span's last token).
    labels : callable (prompt) -> list of (feature, "positive" | "negative") or None
        One label per key, in span order: a key positive for a feature is one the query should
        pick for it; None leaves the key out of every contrast.
    counterfactual : callable (prompt, rng) -> Prompt, optional
        For a contrast across prompts: the prompt with the answer's feature changed and all
        else kept (rng seeded ``seed + 3``). Then positive is the query with the answer key,
        negative the same query with the counterfactual's key in the answer's slot, and
        labels(prompt) need only mark the answer key positive (as the lexical study does).
    negative_query : "original" or "counterfactual"
        With `counterfactual`: the query of the negative pairs, the original prompt's (default:
        only the key differs) or the counterfactual's own.
    query : str
        "last" (the last token, default) or a span name marking one query token per prompt.
    answer : callable (prompt) -> int, optional
        Index of the key the query attends to (head search, the swap's orig key); default: the
        first positive key.
    swap : callable (prompt, rng) -> (orig, target), optional
        Key indices whose coordinates a swap exchanges, in the subspace of the orig key's
        feature; default: the answer and another key, drawn with `rng` (seeded ``seed + 2``).
        `orig` may be a list of key indices: the one the head attends to most is swapped (for
        the answer-level swap, the one the heads attend to most in total).
    subspace : str, optional
        The swapped subspace's name in the store's ``subspace`` coordinate; default: the
        feature's name when the study has one, else "feature".
    coords : callable (prompt) -> dict, optional
        Coordinates stored with the fresh prompts: a scalar per prompt, or a list with one
        value per key. Default: the prompt's ``meta`` entries of either shape.
    answers : callable (prompt) -> list of str, or "keys", optional
        The answer the model would give after the prompt if it picked each key (e.g. "Mary"),
        stored as the key coordinate ``answer_text``; or "keys": each key span's text (box
        letters, items). Each counts by the first tokens of its usual surface forms (with and
        without a leading space, first letter upper/lower case; `qktrace.intervene_answers`).
        With answers and ``query="last"`` (the answer is the next token), the swap is also
        written into the model to see whether its answer moves from the orig key's answer
        to the target's (``answer_*`` variables, `qktrace.intervene_answers`).
    hues : sequence of str
        Key coordinates to colour the PCA figures by (``key_label`` is always drawn).
    heads : callable (model) -> str or (str, str) or None, optional
        Default heads for a model ("L.H,...", or with where they come from, stored as
        ``heads_from``: ("2.1,2.3", "organism")); None, or no function: `qktrace.find_heads`
        picks the 3 heads that attend most to the answer.
    n_prompts, n_test : int
        Default numbers of subspace prompts and fresh prompts.
    sizes : callable (model) -> (n_prompts, n_test), optional
        Defaults that depend on the model (a hub id, path or loaded model), e.g. fewer prompts
        for a small model on a CPU; default: `n_prompts`, `n_test`.
    analysis : callable (dataset) or (dataset, run) -> dataset, optional
        Variables computed from the assembled store, merged into it before it is saved (a
        variable it returns replaces the store's of that name). The store then keeps the fresh
        prompts' q and k on a remote model too (without an analysis a remote run reduces them
        in the trace, `qktrace.study.projected`, and the store has their attention, not q and k). With a second parameter it
        also gets the `Run` (model, store path, parameters to add to, settings), for an
        analysis that needs the model.
    figures : callable (dataset) -> dict of name -> matplotlib Figure, optional
        Extra figures drawn from the saved store, saved as PNGs beside it.
    options : mapping
        The study's own settings (e.g. ``{"n_pairs": 9}``), kept in the store's parameters. A
        setting declared as a `StudyOption` (``{"n_pairs": StudyOption(9, "boxes per
        prompt")}``) is also a flag of ``qktrace study`` (``--n-pairs``): the command line
        passes it to `make`.
    make : callable (**options) -> Study, optional
        The function that makes this study from its declared options' values (keywords named
        as the options); needed when `options` declares a `StudyOption`. `with_options` calls
        it.
    source : str
        Where the study was defined (set by `load_study`); kept in the store's parameters.
    """

    name: str
    prompts: Callable[[int, int], Sequence[Prompt]]
    keys: str
    labels: Callable[[Prompt], Sequence[Label]]
    counterfactual: Callable[[Prompt, np.random.Generator], Prompt] | None = None
    negative_query: Literal["original", "counterfactual"] = "original"
    query: str = "last"
    answer: Callable[[Prompt], int] | None = None
    swap: Callable[[Prompt, np.random.Generator], tuple[int | list[int], int]] | None = None
    coords: Callable[[Prompt], Mapping[str, Any]] | None = None
    subspace: str | None = None
    answers: Callable[[Prompt], Sequence[str]] | Literal["keys"] | None = None
    hues: Sequence[str] = ()
    heads: Callable[[Model], str | tuple[str, str] | None] | None = None
    n_prompts: int = 2000
    n_test: int = 500
    sizes: Callable[[ModelLike], tuple[int, int]] | None = None
    analysis: Callable[..., xr.Dataset] | None = None  # (dataset) or (dataset, run)
    figures: Callable[[xr.Dataset], Mapping[str, Any]] | None = None
    options: Mapping[str, Any] = field(default_factory=dict)
    make: Callable[..., Study] | None = None
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_-]*", str(self.name)):
            raise StudyError(
                f"Study name {self.name!r} cannot name a store file: use letters, digits, '_' "
                "and '-', e.g. name='gender_agreement'."
            )
        for what in ("prompts", "labels"):
            if not callable(getattr(self, what)):
                raise StudyError(
                    f"Study {self.name!r}: {what} must be a function, not "
                    f"{type(getattr(self, what)).__name__}; see help(qktrace.study.Study)."
                )

        if not (self.answers is None or self.answers == "keys" or callable(self.answers)):
            raise StudyError(
                f'Study {self.name!r}: answers must be a function of the prompt, "keys" or '
                f"None, not {self.answers!r}."
            )
        taken = sorted(set(self.options) & set(inspect.signature(run_study).parameters))
        if taken:
            raise StudyError(
                f"Study {self.name!r}: options {taken} have the names of run settings, which "
                "the store records itself; rename them."
            )
        if self.declared_options() and self.make is None:
            raise StudyError(
                f"Study {self.name!r}: options {sorted(self.declared_options())} are declared "
                "(StudyOption) but the study has no make; pass make=<the function that returns "
                "this study from their values> (see docs/guide/own-study.md)."
            )

    def declared_options(self) -> dict[str, StudyOption]:
        """The options that are flags of ``qktrace study`` (`StudyOption`), by name."""
        return {k: v for k, v in self.options.items() if isinstance(v, StudyOption)}

    def option_values(self) -> dict[str, Any]:
        """Every option's value (a `StudyOption`'s default), as the store records them."""
        return {k: v.default if isinstance(v, StudyOption) else v for k, v in self.options.items()}

    def with_options(self, **values: Any) -> Study:
        """This study with other values of its declared options (made by `make`); where it
        was defined (`source`) is kept."""
        unknown = sorted(set(values) - set(self.declared_options()))
        if unknown:
            raise StudyError(
                f"Study {self.name!r} has no options {unknown}; its options: "
                f"{sorted(self.declared_options()) or 'none'}."
            )
        if not values:
            return self
        assert self.make is not None  # __post_init__: declared options come with make
        current = {k: o.default for k, o in self.declared_options().items()}
        made = self.make(**{**current, **values})
        return dataclasses.replace(made, source=self.source)

    def run(self, model: ModelLike | None = None, **settings: Any) -> Path:
        """Run this study: ``run_study(self, model, **settings)``."""
        return run_study(self, model, **settings)


@one_writer(lambda arguments: f"{arguments['study'].name}.zarr")
def run_study(
    study: Study,
    model: ModelLike | None = None,
    *,
    out: str | Path,
    heads: str | Sequence[Any] | None = None,
    n_prompts: int | None = None,
    n_test: int | None = None,
    threshold: float = 0.99,
    n_random: int = 10,
    n_random_answers: int = N_RANDOM_ANSWERS,
    batch_size: int = 16,
    seed: int = 0,
    remote: Remote = False,
    chat: bool | None = None,
    correct_only: bool = False,
    key_scope: str = "query_head",
    figures: bool = True,
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Run a declared study end to end; return the path of ``OUT/<name>.zarr``.

    Parameters
    ----------
    study
        The `Study`.
    model
        A `qktrace.load`-ed model, or a hub id / local path (loaded with `remote`); default:
        the organism shipped in data/organism.
    out
        Directory for the store and its figures; a crashed run resumes its covariance sums
        when rerun with the same arguments.
    heads
        "L.H,..."; default: ``study.heads(model)``, else the 3 found by `qktrace.find_heads`.
    n_prompts, n_test
        Subspace prompts and fresh prompts (PCA, null, swaps); default: the study's.
    n_random, n_random_answers
        Random subspaces of the same rank per swap: for the attention-level swap (no forward
        pass), and for the answer-level swap (each costs one more copy of every fresh prompt
        in the answer traces).
    threshold, batch_size, seed, remote, chat, figures, overwrite, progress
        The 99% rank rule, prompts per trace, seed of prompts and random draws, NDIF mode,
        chat template (None: when the tokenizer has one), PNGs, replace an existing store,
        progress bars.
    correct_only
        Restrict the swap and answer summaries (rates, means, intervals, p-values) to the fresh
        prompts whose answer the model ranks first among the candidates before any edit
        (``answer_correct``; common practice before a mechanistic analysis); the all-prompt
        ``flip_rate``, ``mean_delta_p_target``, ``answer_flip_rate`` and
        ``mean_delta_answer_logit_diff`` stay as ``*_all_prompts``, per-prompt variables stay
        for every prompt, and the params keep ``n_test_correct``. The subspaces are still
        found on every subspace prompt. Needs the answer step (a study with answers).
    key_scope
        The answer-level swaps' key edit under grouped-query attention: "query_head" (default,
        the key as each edited query head sees it) or "key_head" (the shared key head, read by
        its whole group); see `qktrace.intervene_answers`. Recorded in the params.
    """
    # 0. settings and output, refused before any model work
    model = default_model(model)
    n_prompts, n_test = _sizes(study, model, n_prompts, n_test)
    _check_settings(model, n_prompts, n_test, threshold, n_random, n_random_answers,
                    batch_size, seed, key_scope)  # fmt: skip
    path = Path(out) / f"{study.name}.zarr"
    sums_checkpoint = check_out(path, overwrite)
    lm = open_model(model, remote)

    # 1. prompts, token positions, labels and swaps: every declaration checked, no forward pass;
    #    the heads; the parameters the store records; local or in-trace passes, chosen once
    train = prepare(study, lm.tokenizer, n_prompts, seed, chat, "subspace")
    test = prepare(study, lm.tokenizer, n_test, seed, chat, "fresh")
    _check_correct_only(study, test, correct_only)
    head_list, heads_from, ranking, captured = resolve_heads(
        study, lm, heads, test, batch_size, progress
    )
    params = store_params(study, head_list, heads_from, ranking, n_prompts=n_prompts,
                          n_test=n_test, threshold=threshold, n_random=n_random,
                          n_random_answers=n_random_answers, batch_size=batch_size, chat=chat,
                          key_scope=key_scope)  # fmt: skip
    passes = Passes.choose(study, lm, head_list, params, seed, batch_size, progress)

    # 2. contrastive covariance: C+ and C- summed (resumable), ΔC, SVD, rank rule
    sums, null, pairs = passes.subspace_sums(train, path, sums_checkpoint)
    subspaces = decompose(sums, threshold=threshold).merge(sums[stored_sums(sums)])

    # 3. fresh prompts: q, k and attention of every key, named by the study's coordinates
    #    (already captured when the head search ran, in the same pass); 4. is each ΔC real?
    #    the permutation null on their labelled pairs (or on the counterfactual pairs)
    captured, null = fresh_and_null(passes, test, subspaces, captured, null, pairs, n_random,
                                    threshold)  # fmt: skip

    # 5. geometry: PCA of the keys inside the union of the features' key subspaces
    geometry = key_pca(captured, subspaces)

    # 6. causal check: swap key coordinates orig <-> target, against random subspaces: where
    #    the attention goes, then (the swap written into the model) what the model answers
    effects, answers, no_answers = causal_checks(
        passes, test, captured, subspaces, n_random, n_random_answers, key_scope, correct_only
    )

    # 7. the study's own analysis; the store with provenance; figures drawn from the store
    kept = without_projections(captured)
    ds = assemble([subspaces, null, kept, geometry, effects, answers, ranking], no_answers)

    run = Run(lm, path, params, seed, batch_size, chat, progress, sums_checkpoint)
    save_with_analysis(study, ds, run, overwrite)
    if figures:
        draw(study, path)
    return path


# --------------------------------------------------------------------------------------------
# run_study's steps


def _sizes(
    study: Study, model: ModelLike, n_prompts: int | None, n_test: int | None
) -> tuple[int, int]:
    """(n_prompts, n_test): those given, else the study's defaults for this model."""
    default_sizes = (study.n_prompts, study.n_test) if study.sizes is None else study.sizes(model)
    return (
        default_sizes[0] if n_prompts is None else n_prompts,
        default_sizes[1] if n_test is None else n_test,
    )


def _check_settings(
    model: ModelLike,
    n_prompts: int,
    n_test: int,
    threshold: float,
    n_random: int,
    n_random_answers: int,
    batch_size: int,
    seed: int,
    key_scope: str,
) -> None:
    """Refuse a setting out of range before any model work (`check_design`, `check_sizes`)."""
    check_design(
        n_prompts=n_prompts,
        n_test=n_test,
        threshold=threshold,
        n_random=n_random,
        batch_size=batch_size,
        seed=seed,
    )
    checks.integer("n_random_answers", n_random_answers, low=0, flag="--n-random-answers")
    checks.choice("key_scope", key_scope, ("query_head", "key_head"))
    check_sizes(model, n_prompts=n_prompts, n_test=n_test, n_random=n_random,
                n_random_answers=n_random_answers)  # fmt: skip


def _check_correct_only(study: Study, test: Prepared, correct_only: bool) -> None:
    """correct_only needs the answer step, to tell the prompts the model answers correctly."""
    if correct_only and (study.answers is None or answers_skipped(study, test)):
        raise checks.BadArgument(
            f"correct_only (--correct-only) keeps the prompts the model answers correctly, but "
            f"study {study.name!r} runs no answer step to tell them: "
            f"{answers_skipped(study, test) or 'it declares no answers'}."
        )


def store_params(
    study: Study,
    heads: list[Head],
    heads_from: str,
    ranking: xr.Dataset,
    *,
    n_prompts: int,
    n_test: int,
    **settings: Any,
) -> dict[str, Any]:
    """The parameters the store records: the study's options, where it and its heads come
    from, its sizes, keys and query, the run's `settings`, and how the heads were ranked."""
    return {
        **study.option_values(),
        "study_source": study.source,
        "heads": [h.label for h in heads],
        "heads_from": heads_from,
        "n_prompts": n_prompts,
        "n_test": n_test,
        "keys": study.keys,
        "query": study.query,
        **settings,
        **ranking.attrs,  # how the heads were ranked, when find_heads chose them
    }


PairsByHead = dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]]


@dataclass
class Passes:
    """The forward passes of a study, run locally: every capture and sum here (resumable), the
    permutation null from the pairs. `InTracePasses` is the remote strategy; `choose` picks
    one, once, for the whole run."""

    study: Study
    lm: Model
    heads: list[Head]
    params: dict[str, Any]  # the store's parameters: a strategy records how it ran
    seed: int
    batch_size: int
    progress: bool

    @staticmethod
    def choose(
        study: Study,
        lm: Model,
        heads: list[Head],
        params: dict[str, Any],
        seed: int,
        batch_size: int,
        progress: bool,
    ) -> Passes:
        """`InTracePasses` on a remote model, else the local `Passes`."""
        kind = InTracePasses if lm.remote else Passes
        return kind(study, lm, heads, params, seed, batch_size, progress)

    def subspace_sums(
        self, train: Prepared, path: Path, checkpoint: Path
    ) -> tuple[xr.Dataset, xr.Dataset | None, PairsByHead | None]:
        """(covariance sums, permutation null when tested in the pass, the counterfactual
        pairs when the null is to be tested on them)."""
        if self.study.counterfactual is None:
            return self._reduce(train, checkpoint, {}), None, None
        pairs = counterfactual_pairs(self.lm, train, self.heads, path, self.batch_size,
                                     self.progress, self.study.negative_query)  # fmt: skip
        return pair_sums(pairs, self.lm.d_head), None, pairs

    def fresh(
        self, test: Prepared, subspaces: xr.Dataset, n_random: int
    ) -> tuple[xr.Dataset, xr.Dataset | None]:
        """(capture of the fresh prompts, permutation null when tested in the pass)."""
        captured = capture(self.lm, test.ids, self.heads, query=test.query, keys=test.keys,
                           batch_size=self.batch_size, progress=self.progress)  # fmt: skip
        return captured, None

    def _reduce(self, train: Prepared, checkpoint: Path, economy: Mapping[str, Any]) -> xr.Dataset:
        return reduce(self.lm, train.ids, self.heads, train.labels, keys=train.keys,
                      query=train.query, batch_size=self.batch_size, out=checkpoint,
                      progress=self.progress, **economy)  # fmt: skip


class InTracePasses(Passes):
    """The passes on a remote model: what comes back is reduced in the trace. The sums are ΔC
    (`study_options`); counterfactual pairs are summed, and their null tested, in the trace
    (`qktrace.study.paired`); the fresh prompts' q and k are projected onto what steps 4-6
    read, null test included (`qktrace.study.projected`), unless the study's own analysis is
    to get them."""

    def subspace_sums(
        self, train: Prepared, path: Path, checkpoint: Path
    ) -> tuple[xr.Dataset, xr.Dataset | None, PairsByHead | None]:
        if self.study.counterfactual is None:
            self.params["covariance_sums"] = REMOTE_SUMS  # the store holds ΔC, not qk_sum
            return self._reduce(train, checkpoint, study_options(self.lm)), None, None
        sums, null = paired_sums(self.lm, train, self.heads,
                                 negative_query=self.study.negative_query, seed=self.seed,
                                 batch_size=self.batch_size, progress=self.progress)  # fmt: skip
        self.params["subspace_pairs"] = PAIRS_IN_TRACE
        return sums, null, None

    def fresh(
        self, test: Prepared, subspaces: xr.Dataset, n_random: int
    ) -> tuple[xr.Dataset, xr.Dataset | None]:
        if self.study.analysis is not None:
            return super().fresh(test, subspaces, n_random)
        features = [str(f) for f in subspaces["feature"].values]
        in_trace = self.study.counterfactual is None
        captured, null = projected_pass(
            self.lm,
            test.ids,
            self.heads,
            projection_bases(subspaces, n_random, self.seed),
            query=test.query,
            keys=test.keys,
            pairs=fresh_pairs(test, features) if in_trace else None,
            seed=self.seed,
            batch_size=self.batch_size,
            progress=self.progress,
        )
        self.params["fresh_capture"] = FRESH_PROJECTED
        return captured, null


def fresh_and_null(
    passes: Passes,
    test: Prepared,
    subspaces: xr.Dataset,
    captured: xr.Dataset | None,
    null: xr.Dataset | None,
    pairs: PairsByHead | None,
    n_random: int,
    threshold: float,
) -> tuple[xr.Dataset, xr.Dataset]:
    """(capture of the fresh prompts with the study's coordinates, permutation null): the
    capture given (the head search's) or `passes.fresh`; the null given (tested in a pass),
    else tested on `pairs`, else on the fresh prompts' labelled pairs."""
    if captured is None:
        captured, fresh_null = passes.fresh(test, subspaces, n_random)
        null = null if fresh_null is None else fresh_null
    captured = captured.assign_coords(test.coords)
    if null is None:
        if pairs is None:
            pairs = fresh_captured_pairs(captured, passes.heads, subspaces)
        null = null_test(pairs, seed=passes.seed, threshold=threshold, d_head=passes.lm.d_head)
    return captured, null


def fresh_captured_pairs(
    captured: xr.Dataset, heads: list[Head], subspaces: xr.Dataset
) -> PairsByHead:
    """Per (head, feature), the fresh prompts' labelled (q, k, is_positive) pairs."""
    features = [str(f) for f in subspaces["feature"].values]
    return {(h.label, f): captured_pairs(captured, h.label, f) for h in heads for f in features}


def causal_checks(
    passes: Passes,
    test: Prepared,
    captured: xr.Dataset,
    subspaces: xr.Dataset,
    n_random: int,
    n_random_answers: int,
    key_scope: str,
    correct_only: bool,
) -> tuple[xr.Dataset, xr.Dataset, str]:
    """(attention-level swaps, answer-level swaps, why the latter were skipped or ""); with
    `correct_only`, summarized over the prompts the model answers correctly (recorded in the
    store's parameters)."""
    study, seed = passes.study, passes.seed
    effects = swaps(study, captured, test, subspaces, n_random, seed)
    answers, no_answers = xr.Dataset(), answers_skipped(study, test)
    if study.answers is not None and not no_answers:  # the answer is the next token
        answers = answer_swaps(study, passes.lm, test, captured, subspaces, n_random_answers,
                               seed, passes.batch_size, passes.progress, key_scope)  # fmt: skip
    if correct_only:
        effects, answers, passes.params["n_test_correct"] = only_correct(effects, answers)
        passes.params["correct_only"] = True
    return effects, answers, no_answers


def without_projections(captured: xr.Dataset) -> xr.Dataset:
    """The capture as the store keeps it: a projected capture's q and k are not the model's."""
    if "projected" not in captured.attrs:
        return captured
    return captured.drop_vars(["q", "k", "projection", "projection_rank"])


def assemble(parts: Sequence[xr.Dataset], no_answers: str) -> xr.Dataset:
    """The store's dataset from the steps' results, with why the answer step was skipped."""
    ds = xr.merge(parts, compat="override", combine_attrs="drop")
    if no_answers:
        ds.attrs["answer_swaps_skipped"] = no_answers
    return ds


def draw(study: Study, path: Path) -> list[Path]:
    """`plot` the complete store at `path`; a failure says the store is kept and how to draw
    the figures again (``qktrace plot``), naming the study when its own `figures` failed."""
    try:
        return plot(study, path)
    except Exception as err:
        where = "its figures(dataset)" if isinstance(err, _OwnFiguresFailed) else "the figures"
        cause = err.__cause__ if isinstance(err, _OwnFiguresFailed) else err
        again = f"qktrace plot {path}" + (f" --study {study.source.split(' (')[0]}"
                                          if study.source and study.name not in _PAPER else "")  # fmt: skip
        raise StudyError(
            f"Study {study.name!r}: drawing {where} failed ({type(cause).__name__}: {cause}). "
            f"The store {path} is complete and kept; fix the cause, then draw the figures with: "
            f"{again}"
        ) from err


# the paper's studies, whose figures `qktrace plot` finds by the store's name
_PAPER = ("filter_heads", "order_id", "lexical")


class _OwnFiguresFailed(Exception):
    """A study's own ``figures(dataset)`` raised (the cause)."""


# --------------------------------------------------------------------------------------------
# the other steps


def resolve_heads(
    study: Study,
    lm: Model,
    heads: str | Sequence[Any] | None,
    test: Prepared,
    batch_size: int,
    progress: bool,
) -> tuple[list[Head], str, xr.Dataset, xr.Dataset | None]:
    """(heads, where from, ranking, capture): those given, the study's for this model, else the
    best `N_FOUND_HEADS` found on `test` (the `find_heads` ranking of every head as store
    variables, `ranking_variables`, with attrs ``find_heads_pass``; an empty Dataset when no
    search ran). The search shares its pass with the capture of `test`
    (`qktrace.study.head_search`), which it then returns; None when the caller must capture."""
    ranking, captured = xr.Dataset(), None
    if heads is not None:
        chosen, source = parse_heads(heads), "given"
    elif study.heads is not None and (spec := study.heads(lm)):
        spec, source = spec if isinstance(spec, tuple) else (spec, "study")
        chosen = parse_heads(spec)
    else:
        found, captured, how = search_and_capture(lm, test, N_FOUND_HEADS, batch_size, progress)
        ranking = ranking_variables(found)
        ranking.attrs["find_heads_pass"] = how
        chosen = parse_heads(list(found["head"].values[:N_FOUND_HEADS]))
        source = "find_heads"
    lm.check_heads(chosen)
    return chosen, source, ranking, captured


def counterfactual_pairs(
    lm: Model,
    train: Prepared,
    heads: list[Head],
    path: Path,
    batch_size: int,
    progress: bool,
    negative_query: str = "original",
) -> dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Per (head, feature): (q, k, is_positive) of the original query with the answer key of the
    original prompt (positive) and of its counterfactual (negative).

    Both captures are kept batch by batch beside the store (``<name>.original.zarr``,
    ``<name>.counterfactual.zarr``), so a crashed run resumes.
    """
    assert train.counterfactual_ids is not None and train.counterfactual_keys is not None
    runs = []
    sides: list[tuple[str, list[list[int]], list[list[int]], Literal["last"] | list[int]]] = [
        ("original", train.ids, train.keys, train.query),
        ("counterfactual", train.counterfactual_ids, train.counterfactual_keys, "last"),
    ]  # the counterfactual's query: its last token (used with negative_query="counterfactual")
    for what, ids, keys, query in sides:
        answer_keys = [[row[a]] for row, a in zip(keys, train.answer, strict=True)]
        runs.append(
            capture(lm, ids, heads, query=query, keys=answer_keys, attention=False,
                    batch_size=batch_size, out=checkpoint(path, what), progress=progress).load()
        )  # fmt: skip
    original, counter = runs
    feature = np.array(train.answer_features())
    pairs = {}
    for h in heads:
        q = original["q"].sel(head=h.label).isel(query=0).values
        k_pos = original["k"].sel(head=h.label).isel(key=0).values
        k_neg = counter["k"].sel(head=h.label).isel(key=0).values
        q_neg = (
            q
            if negative_query == "original"
            else counter["q"].sel(head=h.label).isel(query=0).values
        )
        for f in dict.fromkeys(feature):
            mine = feature == f
            positive = np.r_[np.ones(mine.sum(), bool), np.zeros(mine.sum(), bool)]
            pairs[(h.label, str(f))] = (np.r_[q[mine], q_neg[mine]], np.r_[k_pos[mine], k_neg[mine]],
                                        positive)  # fmt: skip
    return pairs


def pair_sums(pairs: Mapping[tuple[str, str], tuple], d_head: int) -> xr.Dataset:
    """The covariance sums of `decompose` from (head, feature) -> (q, k, is_positive) pairs."""
    heads = list(dict.fromkeys(h for h, _ in pairs))
    sums = empty_sums(heads, list(dict.fromkeys(f for _, f in pairs)), d_head)
    for (head, feature), (q, k, positive) in pairs.items():
        for contrast, rows in (("positive", positive), ("negative", ~positive)):
            sums = add_pairs(sums, q[rows], k[rows], head, feature, contrast)
    return sums


@dataclass
class Run:
    """What a study's analysis may need of its run: the model, the store's path, the parameters
    the store records (add to them), the settings, and a free checkpoint path beside the store."""

    model: Model
    path: Path
    params: dict[str, Any]
    seed: int
    batch_size: int
    chat: bool | None
    progress: bool
    checkpoint: Path


def save_with_analysis(study: Study, ds: xr.Dataset, run: Run, overwrite: bool) -> Path:
    """Save `ds` with the study's own analysis merged in (`with_analysis`) at ``run.path``."""

    def save(ds: xr.Dataset) -> Path:
        return write(ds, run.path, study=study.name, params=run.params, model=run.model,
                     seed=run.seed, overwrite=overwrite)  # fmt: skip

    return save(with_analysis(study, ds, save, run))


def with_analysis(
    study: Study, ds: xr.Dataset, save: Callable[[xr.Dataset], Path], run: Run
) -> xr.Dataset:
    """`ds` with the study's own analysis merged in; if it fails, the store is kept without it."""
    if study.analysis is None:
        return ds
    try:
        takes_run = len(inspect.signature(study.analysis).parameters) > 1
        extra = study.analysis(ds, run) if takes_run else study.analysis(ds)
        if not isinstance(extra, xr.Dataset):
            raise TypeError(f"it returned a {type(extra).__name__}, not an xarray.Dataset")
        replaced = [name for name in extra.data_vars if name in ds.data_vars]
        return xr.merge(
            [extra, ds.drop_vars(replaced)], compat="override", join="outer", combine_attrs="drop"
        )
    except StoreDamagedError:
        raise  # a damaged input (e.g. a reused store): nothing of this run is written
    except Exception as err:
        path = save(ds)
        raise StudyError(
            f"Study {study.name!r}: analysis(dataset) failed ({type(err).__name__}: {err}). "
            f"Everything else is saved in {path}; fix the analysis and rerun with --overwrite."
        ) from err


def key_pca(captured: xr.Dataset, subspaces: xr.Dataset, n_pc: int = 3) -> xr.Dataset:
    """Per head: PCA of the captured keys inside the union of all features' key subspaces."""
    projections, ratios, ranks = [], [], []
    for head in captured["head"].values:
        basis = union_basis(
            [
                trimmed(
                    subspaces["key_basis"]
                    .sel(head=head, feature=f)
                    .transpose("dk", "component")
                    .values
                )
                for f in subspaces["feature"].values
            ]
        )
        keys = captured["k"].sel(head=head).transpose("prompt", "key", "d_head").values
        proj, ratio = subspace_pca(keys.astype(np.float64), basis, n_pc)
        projections.append(proj)
        ratios.append(ratio)
        ranks.append(basis.shape[1])
    return xr.Dataset(
        {
            "key_pc": (("head", "prompt", "key", "pc"), np.stack(projections)),
            "pc_variance_ratio": (("head", "pc"), np.stack(ratios)),
            "union_rank": ("head", np.array(ranks)),
        },
        coords={"head": captured["head"].values, "pc": np.arange(1, n_pc + 1)},
    )


def swaps(
    study: Study,
    captured: xr.Dataset,
    test: Prepared,
    subspaces: xr.Dataset,
    n_random: int,
    seed: int,
) -> xr.Dataset:
    """Per head: swap the orig and target keys' coordinates in the orig key's feature subspace.

    Computed from the capture with no forward pass (`intervene_captured`, equal to the in-trace
    edit), per head and feature on the prompts whose swap is in it, against `n_random` random
    subspaces of the same rank. The subspace is named after the feature when the study has
    one, else "feature" (the prompt coordinate ``swap_feature`` says which).
    """
    features = [str(f) for f in subspaces["feature"].values]
    name = swapped_name(study, features)
    per_head = []
    for head in subspaces["head"].values:
        attention = captured["attention"].sel(head=head).isel(query=0).transpose("prompt", "key")
        orig = orig_keys(test, attention.values)
        parts = []
        for feature in features:
            chosen = [i for i, s in enumerate(test.swap) if s[2] == feature]
            if not chosen:
                continue
            fx = intervene_captured(
                captured.isel(prompt=chosen),
                str(head),
                subspaces["key_basis"].sel(head=head, feature=feature),
                name=name,
                orig=[test.keys[i][orig[i]] for i in chosen],
                target=[test.keys[i][test.swap[i][1]] for i in chosen],
                edit="swap",
                random=RandomBaseline(n_random, seed=seed),
            )
            parts.append(per_prompt(fx).assign_coords(prompt=chosen))
        per_head.append(xr.concat(parts, dim="prompt").sortby("prompt"))
    return stack_heads(per_head, [str(h) for h in subspaces["head"].values])


def projection_bases(subspaces: xr.Dataset, n_random: int, seed: int) -> dict[str, np.ndarray]:
    """Per head, an orthonormal basis of all it is read in after the fresh pass: every feature's
    key basis and the random subspaces `swaps` draws for it (`random_subspaces(d, rank,
    n_random, seed)`, per rank), so that projections onto it give the swaps and the PCA
    exactly."""
    d = subspaces.sizes["dk"]
    out = {}
    for head in subspaces["head"].values:
        bases = [
            trimmed(
                subspaces["key_basis"].sel(head=head, feature=f).transpose("dk", "component").values
            )
            for f in subspaces["feature"].values
        ]
        ranks = sorted({b.shape[1] for b in bases if b.shape[1]})
        draws = [list(random_subspaces(d, r, n_random, seed)) for r in ranks if n_random]
        basis = union_basis([*bases, *(b for draw in draws for b in draw)])
        out[str(head)] = basis if basis.shape[1] else np.zeros((d, 1))
    return out


def fresh_pairs(test: Prepared, features: Sequence[str]) -> dict[str, list[list[bool | None]]]:
    """Per feature, per fresh prompt, per key: True for a positive pair with the query, False
    for a negative one, None when the key is not in the feature's ΔC (as `captured_pairs`)."""
    return {
        f: [
            [None if lab is None or lab[0] != f else lab[1] == "positive" for lab in row]
            for row in test.labels
        ]
        for f in features
    }


def swapped_name(study: Study, features: Sequence[str]) -> str:
    """The swapped subspace's name: the study's, else the feature's (one), else "feature"."""
    if study.subspace:
        return study.subspace
    return features[0] if len(features) == 1 else "feature"


def orig_keys(test: Prepared, attention: np.ndarray) -> list[int]:
    """Per prompt, the swap's orig key index: the declared one, or the most attended of its
    choices (`attention` [prompt, key]; the first of equals)."""
    orig = []
    for i, (swap, choices) in enumerate(zip(test.swap, test.orig_choices, strict=True)):
        weights = attention[i]
        orig.append(swap[0] if choices is None else max(choices, key=lambda j: weights[j]))
    return orig


def answers_skipped(study: Study, test: Prepared) -> str:
    """Why the study gets no answer-level swaps ("" when it does): they need the query to be the
    last token of every prompt, so that the model's next token is the answer."""
    if study.answers is None or test.query == "last":
        return ""
    late = [i for i, (q, ids) in enumerate(zip(test.query, test.ids, strict=True))
            if q not in (-1, len(ids) - 1)]  # fmt: skip
    if not late:
        return ""
    shown = ", ".join(map(str, late[:5])) + (", ..." if len(late) > 5 else "")
    return (
        f"no answer-level swaps: the query ({study.query!r}) is not the last token of "
        f"{len(late)} of {len(test.ids)} fresh prompts ({shown}), so the next token is not the "
        "answer. End each prompt at the query (without a chat template: --no-chat), or use "
        "query='last'."
    )


def candidate_answers(study: Study, test: Prepared) -> list[list[Any]]:
    """Per fresh prompt, the candidate answer of each key: ``study.answers(prompt)``, or for
    "keys" the key spans' texts."""
    if callable(study.answers):
        return [list(study.answers(p)) for p in test.prompts]
    return [list(p.span_texts(study.keys)) for p in test.prompts]


def only_correct(effects: xr.Dataset, answers: xr.Dataset) -> tuple[xr.Dataset, xr.Dataset, int]:
    """The swap and answer summaries over the fresh prompts the model answers correctly before
    any edit (``answer_correct``), the all-prompt headline rates kept as ``*_all_prompts``;
    and how many prompts that is."""
    right = answers["prompt"].values[answers["answer_correct"].values.astype(bool)]
    every_swap, every_answer = swap_summary(effects), answer_summary(answers)
    effects = effects.assign(
        {f"{n}_all_prompts": every_swap[n] for n in ("flip_rate", "mean_delta_p_target")}
    ).assign(swap_summary(effects.sel(prompt=right)).data_vars)
    headline = ("answer_flip_rate", "mean_delta_answer_logit_diff")
    answers = answers.assign({f"{n}_all_prompts": every_answer[n] for n in headline}).assign(
        answer_summary(answers.sel(prompt=right)).data_vars
    )
    return effects, answers, int(len(right))


def answer_swaps(
    study: Study,
    lm: Model,
    test: Prepared,
    captured: xr.Dataset,
    subspaces: xr.Dataset,
    n_random: int,
    seed: int,
    batch_size: int,
    progress: bool,
    key_scope: str = "query_head",
) -> xr.Dataset:
    """The swap of `swaps` written into the model, in each head alone and in all heads
    together: does the model's answer move from the orig key's answer to the target key's?

    The candidate answers of a prompt are ``study.answers(prompt)``, one per key, else the key
    spans' texts (box letters, names), each counted by its surface forms; the answer is the
    orig key's, the target's answer the target key's. One `answer_effects` call per feature, on
    the prompts whose swap is in it. Candidates that hold little of the next-token probability
    get one `CandidateMassWarning` for the whole study (``qktrace show`` repeats it).
    """
    features = [str(f) for f in subspaces["feature"].values]
    name = swapped_name(study, features)
    candidates = candidate_answers(study, test)
    attention = captured["attention"].isel(query=0).sum("head").transpose("prompt", "key")
    orig = orig_keys(test, attention.values)
    parts = []
    for feature in features:
        chosen = [i for i, s in enumerate(test.swap) if s[2] == feature]
        if not chosen:
            continue
        bases = {
            str(h): trimmed(
                subspaces["key_basis"]
                .sel(head=h, feature=feature)
                .transpose("dk", "component")
                .values
            )
            for h in subspaces["head"].values
        }
        with warnings.catch_warnings():  # one warning for the study, below
            warnings.simplefilter("ignore", CandidateMassWarning)
            fx = answer_effects(
                lm,
                [test.ids[i] for i in chosen],
                bases,
                candidates=[candidates[i] for i in chosen],
                answer=[orig[i] for i in chosen],
                target_answer=[test.swap[i][1] for i in chosen],
                orig=[test.keys[i][orig[i]] for i in chosen],
                target=[test.keys[i][test.swap[i][1]] for i in chosen],
                name=name,
                n_random=n_random,
                seed=seed,
                batch_size=batch_size,
                progress=progress,
                key_scope=key_scope,
            )
        parts.append(answer_per_prompt(fx).assign_coords(prompt=chosen))
    effects = xr.concat(
        parts, dim="prompt", data_vars="all", coords="different", compat="equals"
    ).sortby("prompt")
    effects = effects.merge(answer_summary(effects))
    if note := low_mass_note(float(effects["mean_answer_candidate_mass"])):
        warnings.warn(f"Study {study.name!r}: {note}", CandidateMassWarning, stacklevel=2)
    if note := unscored_note(np.isnan(effects["answer_prob_before"].values)):
        warnings.warn(f"Study {study.name!r}, fresh prompts: {note}", CandidateMassWarning,
                      stacklevel=2)  # fmt: skip
    return effects


def plot(study: Study, path: str | Path) -> list[Path]:
    """The study's figures from its store, saved beside it as ``<name>_<what>.png``.

    ``_ranks`` (99%-rule rank next to the permutation null's), ``_pca_<hue>`` (keys in the
    union of the feature key subspaces, for ``key_label`` and each of the study's `hues`),
    ``_swap`` (the swap against its random subspaces), ``_answer`` (the model's answer after
    the swap, per head and in all heads together, when the store has it), then the study's
    own `figures`.
    """
    from qktrace.store import io as store

    path = Path(path)
    ds = store.open(path).load()
    swapped = str(ds["subspace"].values[0])
    figures = {
        f"{study.name}_ranks.png": rank_figure(ds, f"{study.name}: subspace ranks"),
        f"{study.name}_swap.png": swap_bars(
            ds, swapped, title=f"{study.name}: swap of key coordinates, orig <-> target"
        ),
    }
    if "answer_flip_rate" in ds:
        figures[f"{study.name}_answer.png"] = answer_bars(
            ds, swapped, title=f"{study.name}: the model's answer after the swap"
        )
    for hue in dict.fromkeys(["key_label", *study.hues]):
        figures[f"{study.name}_pca_{hue}.png"] = pca_figure(
            ds, hue, title=f"{study.name}: keys in the feature key subspaces, by {hue}"
        )
    if study.figures is not None:
        try:
            own = dict(study.figures(ds))
        except Exception as err:
            raise _OwnFiguresFailed() from err
        figures.update(
            {f"{study.name}_{k.removesuffix('.png')}.png": fig for k, fig in own.items()}
        )
    return save_figures(figures, path.parent)


# --------------------------------------------------------------------------------------------
# a user's study file


def load_study(spec: str | Path) -> Study:
    """The `Study` defined by a file or module: ``path/to/study.py[:attr]`` or ``module[:attr]``.

    Without ``:attr``, the module's ``study`` attribute, else its only `Study`. The returned
    study's `source` records where it came from (with the file's SHA-256), for provenance.
    """
    where, sep, attr = str(spec).rpartition(":")
    if not (sep and attr.isidentifier()):
        where, attr = str(spec), ""
    if where.endswith(".py") or Path(where).exists():
        module, source = _import_file(Path(where).expanduser())
    else:
        try:
            module = importlib.import_module(where)
        except ImportError as err:
            raise StudyError(
                f"Cannot import {where!r} as a study module ({err}); pass a path to a .py file "
                "(./my_study.py) or an importable module:attr."
            ) from err
        source = where
    found = {k: v for k, v in vars(module).items() if isinstance(v, Study)}
    if attr:
        study = getattr(module, attr, None)
        if not isinstance(study, Study):
            raise StudyError(
                f"{where} has no Study named {attr!r} (its studies: {sorted(found) or 'none'}); "
                f"pass {where}:NAME with one of them."
            )
    elif isinstance(getattr(module, "study", None), Study):
        study = module.study
    elif len(found) == 1:
        (study,) = found.values()
    else:
        raise StudyError(
            f"{where} defines no study to run"
            + (f" (it defines several: {sorted(found)}; pass {where}:NAME)" if found else "")
            + ": define study = qktrace.study.Study(name=..., prompts=..., keys=..., "
            "labels=...) at its top level (see examples/gender_agreement.py)."
        )
    return dataclasses.replace(study, source=f"{source}:{attr}" if attr else source)


def _import_file(file: Path) -> tuple[Any, str]:
    """Import a study file as a module of its own; (module, its path with a SHA-256)."""
    if not file.is_file():
        raise StudyError(
            f"Study file {file} does not exist; pass the path of a .py file that defines "
            "study = qktrace.study.Study(...), or module:attr."
        )
    name = f"qktrace_study_{hashlib.sha256(str(file.resolve()).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(name, file)
    if spec is None or spec.loader is None:
        raise StudyError(f"{file} cannot be imported as Python; pass a .py file.")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file runs
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[name]
        raise StudyError(
            f"Study file {file} raised {type(err).__name__} while it was imported: {err}; fix "
            "the file (run `python FILE` to see the traceback)."
        ) from err
    digest = hashlib.sha256(file.read_bytes()).hexdigest()[:16]
    return module, f"{file.resolve()} (sha256 {digest})"
