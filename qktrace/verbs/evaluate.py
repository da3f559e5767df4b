"""Does the model solve the studies' tasks? Accuracy among the candidate answers, next to chance.

A head's subspaces mean little if the model does not do the task, so before reading heads a
researcher checks the task itself. Prompts come from the studies' own builders
(`qktrace.core.prompts`) and are tokenized by `qktrace.core.prompts.locate`, chat template applied when
the tokenizer has one: the very path a study takes. Seeds start at 10_000, away from the
studies' (and the organism's training) seeds.

Scoring: in ONE nnsight trace per batch (so it runs locally, with ``remote="local"`` and on
NDIF alike), the log-probabilities of the next token after the prompt are read at the
candidate answers' first tokens only. Candidates are the prompt's box letters (boxes,
order-ID) or its listed items (filter). They count by the rule `qktrace.intervene_answers`
uses (`qktrace.verbs.answers.candidate_tokens`, written once): the first tokens of a
candidate's usual surface forms (as given, with and without a leading space, first letter
upper- and lower-case; a one-character candidate keeps its case), a first token shared by two
candidates of a prompt counting for neither. A candidate's score is the log of the summed
probability of its forms (logsumexp); the prediction is the best-scoring candidate (one with
no token of its own is never predicted). ``accuracy`` counts predictions that are a correct answer (the box of
the queried object; any item of the asked category for "all", its first or last item for
"first"/"last"); ``chance`` is the mean share of candidates that are correct (1 / pairs for
boxes, 5/15 or 1/15 for the default lists); ``candidate_mass`` is the probability the model puts
on the candidates' tokens together (low: it would start its answer some other way, e.g. "The").

Groups:
- ``boxes n=K``: `qktrace.core.prompts.boxes_prompts` with K pairs, every position asked;
- ``order-id n=K``: the order-ID design (the same queried object in every prompt);
- ``filter all|first|last``: `qktrace.core.prompts.filter_prompts` with its defaults (the five paper
  categories, 3 categories x 5 items per list).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import nnsight
import numpy as np
import torch
import xarray as xr
from tqdm.auto import tqdm

from qktrace.core import checks, ops
from qktrace.core.errors import BadArgument, BadArgumentType
from qktrace.core.intervals import wilson
from qktrace.core.prompts import Prompt, boxes_prompts, filter_prompts, locate
from qktrace.model.loading import Model, check_model, iter_batches
from qktrace.run.batching import BATCH_SIZE, encode
from qktrace.verbs.answers import candidate_tokens, merge_forms

__all__ = ["evaluate", "task_sets", "candidates", "format_table"]

PAIRS = tuple(range(2, 10))
ORDER_ID_OBJECT = "stone"


def task_sets(
    n: int = 100,
    *,
    pairs: Sequence[int] = PAIRS,
    order_id_object: str = ORDER_ID_OBJECT,
    seed: int = 10_000,
) -> dict[str, list[Prompt]]:
    """Group name -> prompts: boxes and order-ID with each number of pairs, filter questions."""
    sets: dict[str, list[Prompt]] = {}
    for k in pairs:
        sets[f"boxes n={k}"] = boxes_prompts(n, k, seed=seed + k)
    for k in pairs:
        sets[f"order-id n={k}"] = boxes_prompts(
            n, k, query_object=order_id_object, seed=seed + 20 + k
        )
    for q in ("all", "first", "last"):
        sets[f"filter {q}"] = filter_prompts(n, questions=[q], seed=seed + 30 + len(q))
    return sets


def candidates(prompt: Prompt) -> tuple[list[str], list[bool]]:
    """The prompt's candidate answers and which of them are correct."""
    meta = prompt.meta
    if "letters" in meta:
        letters = list(meta["letters"])
        return letters, [i == meta["answer"] for i in range(len(letters))]
    items, cats = list(meta["items"]), list(meta["item_categories"])
    asked = [i for i, c in enumerate(cats) if c == meta["asked"]]
    if not asked:
        raise BadArgument(f"Prompt {prompt.text[:60]!r}... lists no item of its asked category.")
    keep = {"first": asked[:1], "last": asked[-1:]}.get(meta["question"], asked)
    return items, [i in keep for i in range(len(items))]


def evaluate(
    model: Model,
    *,
    n: int = 100,
    pairs: Sequence[int] = PAIRS,
    groups: Sequence[str] | None = None,
    chat: bool | None = None,
    batch_size: int = BATCH_SIZE,
    seed: int = 10_000,
    progress: bool = True,
) -> xr.Dataset:
    """Accuracy of `model` on the studies' tasks, among the candidate answers, next to chance.

    Parameters
    ----------
    model
        From `qktrace.load` (local, ``remote="local"`` or NDIF).
    n
        Prompts per group.
    pairs
        Numbers of object-box pairs for the boxes and order-ID groups.
    groups
        Only the groups whose names start with one of these prefixes (e.g. ``["boxes n=3",
        "filter"]``); default all.
    chat
        Apply the chat template (default: when the tokenizer has one), as the studies do.

    Returns
    -------
    xarray.Dataset over dim ``task`` (the group names): ``accuracy`` with its 95% Wilson
    interval ``accuracy_low``/``accuracy_high`` (`qktrace.core.intervals.wilson`), ``chance``,
    ``candidate_mass``, ``n_prompts``; coords ``kind`` (boxes, order-id, filter) and
    ``n_pairs`` (0 for filter).

    Examples
    --------
    >>> ds = qktrace.verbs.evaluate.evaluate(qktrace.load("smollm2"), n=40)  # doctest: +SKIP
    >>> print(qktrace.verbs.evaluate.format_table(ds))  # doctest: +SKIP
    """
    _check_evaluate(model, n, pairs, groups, chat, batch_size, seed, progress)
    sets = task_sets(n, pairs=pairs, seed=seed)
    if groups is not None:
        sets = {k: v for k, v in sets.items() if any(k.startswith(g) for g in groups)}
        if not sets:
            raise BadArgument(
                f"groups={list(groups)} match no group; names start with 'boxes n=K', "
                "'order-id n=K' or 'filter all|first|last'."
            )
    rows = []
    bar = tqdm(total=sum(len(p) for p in sets.values()), desc="eval", disable=not progress)
    for name, prompts in sets.items():
        rows.append(_score(model, prompts, chat=chat, batch_size=batch_size, bar=bar))
        if progress:  # each task's line as soon as it is known (a long run shows results early)
            accuracy, chance, mass = rows[-1]
            tqdm.write(f"{name:<16} {accuracy:8.1%} {chance:7.1%} {mass:8.3f}")
    bar.close()
    return _dataset(model, sets, rows, {"n": n, "pairs": [int(k) for k in pairs], "seed": seed,
                                        "chat": chat})  # fmt: skip


def _check_evaluate(
    model: Model,
    n: int,
    pairs: Sequence[int],
    groups: Sequence[str] | None,
    chat: bool | None,
    batch_size: int,
    seed: int,
    progress: bool,
) -> None:
    """`evaluate`'s checks, before any prompt is built."""
    check_model("model", model)
    checks.integer("n", n, example="100")
    checks.integer("batch_size", batch_size, low=1, example="16")
    checks.integer("seed", seed, low=0, example="10_000")
    checks.flag("progress", progress)
    if chat is not None:
        checks.flag("chat", chat)
    if isinstance(pairs, str | bytes) or not isinstance(pairs, Sequence | range) or not pairs:
        raise BadArgumentType(f"pairs={pairs!r} is not a list of pair counts; pass e.g. [2, 3].")
    for k in pairs:
        checks.integer("pairs[...]", k, low=2, high=26, example="9")
    if groups is not None:
        if isinstance(groups, str | bytes) or not all(isinstance(g, str) for g in groups):
            raise BadArgumentType(f"groups={groups!r} is not a list of str; pass e.g. ['boxes'].")
        names = [f"{t} n={k}" for t in ("boxes", "order-id") for k in pairs]
        names += [f"filter {q}" for q in ("all", "first", "last")]
        if not any(name.startswith(g) for g in groups for name in names):
            raise BadArgument(
                f"groups={list(groups)} match no group; names start with 'boxes n=K', "
                "'order-id n=K' or 'filter all|first|last'."
            )
    n_groups = 2 * len(pairs) + 3
    checks.fits_in_memory("n", n, 64 * 2**10 * n_groups, f"{n_groups} groups of prompts and scores",
                          flag="--n", example="100")  # fmt: skip
    if n < 1:
        raise BadArgument(f"n={n}: pass at least 1 prompt per group (CLI: --n).")
    bad = [k for k in pairs if not 1 <= int(k) <= 26]
    if bad or not pairs:
        raise BadArgument(f"pairs={list(pairs)}: give numbers of pairs between 2 and 26.")


def _dataset(
    model: Model,
    sets: dict[str, list[Prompt]],
    rows: list[tuple[float, float, float]],
    params: dict[str, Any],
) -> xr.Dataset:
    """Each task's (accuracy, chance, candidate mass) -> the labelled Dataset over ``task``."""
    names = list(sets)
    from qktrace.store import provenance

    counts = np.array([len(sets[k]) for k in names])
    low, high = wilson(np.round(np.array([r[0] for r in rows]) * counts), counts)
    return xr.Dataset(
        {
            "accuracy": ("task", [r[0] for r in rows]),
            "accuracy_low": ("task", low),
            "accuracy_high": ("task", high),
            "chance": ("task", [r[1] for r in rows]),
            "candidate_mass": ("task", [r[2] for r in rows]),
            "n_prompts": ("task", [len(sets[k]) for k in names]),
        },
        coords={
            "task": names,
            "kind": ("task", [k.split(" ")[0] for k in names]),
            "n_pairs": ("task", [int(k.split("=")[1]) if "=" in k else 0 for k in names]),
        },
        attrs=provenance("evaluate", params, model=model, seed=params["seed"]),
    )


def _score(
    model: Model, prompts: Sequence[Prompt], *, chat: bool | None, batch_size: int, bar: Any
) -> tuple[float, float, float]:
    """(accuracy, chance, candidate mass) of one group."""
    tokenizer = model.tokenizer
    located = locate(tokenizer, prompts, chat=chat)
    correct, chance, mass = [], [], []
    for start, batch in iter_batches(list(prompts), batch_size):
        table = [candidates(p) for p in batch]
        index, counted = _candidate_index(tokenizer, [names for names, _ in table])
        logprobs = _candidate_logprobs(model, located.ids[start : start + len(batch)], index)
        scores = merge_forms(logprobs.reshape(counted.shape)[None], counted)[0]  # [b, C]
        for i, (_, right) in enumerate(table):
            ranked = np.where(np.isnan(scores[i]), -np.inf, scores[i])[: len(right)]
            correct.append(bool(right[int(np.argmax(ranked))]))
            chance.append(sum(right) / len(right))
            mass.append(float(np.nansum(np.exp(scores[i]))))
        bar.update(len(batch))
    return float(np.mean(correct)), float(np.mean(chance)), float(np.mean(mass))


def _candidate_index(tokenizer: Any, names: list[list[str]]) -> tuple[torch.Tensor, np.ndarray]:
    """The counted first tokens of each prompt's candidates (`qktrace.verbs.answers`' rule,
    `candidate_tokens`): token ids [prompt, C * F] (padded with 0) and which count
    [prompt, C, F]."""
    per_prompt = [candidate_tokens(tokenizer, [row]) for row in names]
    n_cand = max(ids.shape[1] for ids, _ in per_prompt)
    n_forms = max(ids.shape[2] for ids, _ in per_prompt)
    index = np.zeros((len(names), n_cand, n_forms), dtype=np.int64)
    counted = np.zeros(index.shape, dtype=bool)
    for i, (ids, keep) in enumerate(per_prompt):
        index[i, : ids.shape[1], : ids.shape[2]] = ids[0]
        counted[i, : ids.shape[1], : ids.shape[2]] = keep[0]
    return torch.tensor(index.reshape(len(names), -1)), counted


def _candidate_logprobs(model: Model, ids: list[list[int]], index: torch.Tensor) -> np.ndarray:
    """One trace: next-token log-probabilities after each prompt at the `index` token ids."""
    encoded = encode(model, ids)
    last = torch.tensor([encoded.padded(i, n - 1) for i, n in enumerate(encoded.lengths)])
    lm = model.lm  # the trace body holds no qktrace object: on NDIF it runs without qktrace
    with torch.inference_mode(), model.trace(encoded.inputs):
        picked = nnsight.save(ops.answer_scores(lm.output.logits, last, index)[1])
    return picked.cpu().numpy()


def format_table(ds: xr.Dataset) -> str:
    """The accuracy table: one line per task, accuracy and its 95% Wilson interval next to
    chance and candidate mass."""
    lines = [
        f"{'task':<16} {'accuracy':>8} {'[95% CI]':>14} {'chance':>7} {'p(cand)':>8} {'prompts':>8}"
    ]
    for i, task in enumerate(ds["task"].values):
        interval = ""
        if "accuracy_low" in ds:  # stores written before the intervals have none
            interval = f"[{float(ds['accuracy_low'][i]):.1%}, {float(ds['accuracy_high'][i]):.1%}]"
        lines.append(
            f"{task:<16} {float(ds['accuracy'][i]):8.1%} {interval:>14} "
            f"{float(ds['chance'][i]):7.1%} {float(ds['candidate_mass'][i]):8.3f} "
            f"{int(ds['n_prompts'][i]):8d}"
        )
    lines.append("[95% CI]: Wilson score interval of the accuracy over the task's prompts")
    return "\n".join(lines)


def plot(ds: xr.Dataset, path: Any) -> Any:
    """Bars of accuracy per task with chance marked, saved as a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import seaborn as sns

    tasks = [str(t) for t in ds["task"].values]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.55 * len(tasks)), 3.6))
    sns.barplot(x=tasks, y=ds["accuracy"].values, color="tab:blue", ax=ax, label="accuracy")
    ax.scatter(
        tasks, ds["chance"].values, marker="_", s=300, color="black", zorder=3, label="chance"
    )
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy among candidates")
    ax.set_title(f"{ds.attrs.get('model', '')}: the studies' tasks")
    ax.tick_params(axis="x", rotation=60)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
