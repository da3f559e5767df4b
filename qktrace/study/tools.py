"""The shared steps of a study: output and checkpoints, significance, PCA, swap summaries, figures.

`qktrace.study.pipeline` runs these for every declared study, and the studies in ``studies/`` import
them from here (the library never imports `studies`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from qktrace.core.intervals import (
    ANSWER_INTERVALS,
    SWAP_INTERVALS,
    answer_intervals,
    swap_intervals,
)
from qktrace.core.linalg import union_basis  # noqa: F401  (studies import it from here)
from qktrace.model.loading import Model, Remote, load
from qktrace.verbs.decompose import N_PERMUTATIONS, NULL_QUANTILE

ModelLike = Model | str | os.PathLike


def default_model(model: ModelLike | None) -> ModelLike:
    """`model`, or the shipped organism's checkpoint path when none is given."""
    if model is not None:
        return model
    from qktrace.model import organism

    return str(organism.path())


def is_organism(model: ModelLike) -> bool:
    """Whether `model` (loaded, or a path) is the organism shipped in data/organism."""
    name = model.name if isinstance(model, Model) else os.fspath(model)
    try:
        from qktrace.model import organism

        return Path(name).expanduser().resolve() == organism.path().resolve()
    except (OSError, ValueError):
        return False


def open_model(model: ModelLike, remote: Remote) -> Model:
    """`model` itself if already loaded, else ``qktrace.load(model, remote=remote)``."""
    if isinstance(model, Model):
        return model
    lm = load(model, remote=remote)
    return lm


def check_design(
    *,
    n_prompts: int,
    n_test: int,
    threshold: float,
    n_random: int,
    batch_size: int,
    seed: int = 0,
    min_prompts: int = 1,
    why: str = "",
) -> None:
    """Refuse impossible study settings before any model work, naming the argument and flag."""
    from qktrace.core import checks

    def bad(name: str, value: object, rule: str, fix: str) -> ValueError:
        flag = "--" + name.replace("_", "-")
        return checks.BadArgument(f"{name}={value!r} (CLI {flag}) {rule}; {fix}.")

    for name, value in (("n_prompts", n_prompts), ("n_test", n_test), ("n_random", n_random),
                        ("batch_size", batch_size), ("seed", seed)):  # fmt: skip
        checks.integer(name, value, flag="--" + name.replace("_", "-"))
    checks.number(
        "threshold", threshold, low=0, high=1, low_open=True, flag="--threshold",
        meaning="the fraction of sum(S^2) the kept components hold", example="0.99",
    )  # fmt: skip
    if seed < 0:
        raise bad("seed", seed, "is negative (numpy seeds are >= 0)", "pass e.g. 0")

    if n_prompts < min_prompts:
        raise bad("n_prompts", n_prompts, f"is too few{why}", f"pass n_prompts >= {min_prompts}")
    if n_test < 1:
        raise bad("n_test", n_test, "leaves no fresh prompts for PCA and swaps", "pass >= 1")
    if n_random < 0:
        raise bad("n_random", n_random, "is negative", "pass 0 (no baseline) or more")
    if batch_size < 1:
        raise bad("batch_size", batch_size, "is below 1", "pass e.g. 16")


# what a run allocates per unit of its size arguments, with the d_head of the model when it is
# loaded, else ASSUMED_D_HEAD (more than most models'): a subspace prompt's text, ids and
# labels (16 KiB), a fresh prompt's q, k and attention at up to 64 keys in 3 heads, a random
# subspace of rank up to d_head, a copy of the fresh prompts in the answer traces
ASSUMED_D_HEAD = 128
KEYS_PER_PROMPT = 64


def check_sizes(
    model: ModelLike, *, n_prompts: int, n_test: int, n_random: int, n_random_answers: int = 0
) -> None:
    """Refuse sizes whose run would not fit in this machine's memory, before the model loads."""
    from qktrace.core import checks

    d = int(model.d_head) if isinstance(model, Model) else ASSUMED_D_HEAD
    per_prompt = 3 * KEYS_PER_PROMPT * (2 * d + 1) * 4
    checks.fits_in_memory("n_prompts", n_prompts, 16 * 2**10, "the prompts (text, token ids, "
                          "positions and labels)", flag="--n-prompts", example="2000")  # fmt: skip
    checks.fits_in_memory("n_test", n_test, per_prompt, "the fresh prompts' q, k and attention",
                          flag="--n-test", example="500")  # fmt: skip
    checks.fits_in_memory("n_random", n_random, 8 * d * d + 8 * n_test * KEYS_PER_PROMPT,
                          f"its random subspaces (d_head {d}) and their effects", flag="--n-random")  # fmt: skip
    checks.fits_in_memory("n_random_answers", n_random_answers, n_test * 512 * 8 * 2,
                          "the copies of the fresh prompts in the answer traces",
                          flag="--n-random-answers", example="3")  # fmt: skip


def subspace_pca(
    vectors: np.ndarray, basis: np.ndarray, n_pc: int = 3
) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates of `vectors` [..., d] in `basis` [d, r], then their top principal components.

    Returns (projections [..., n_pc], explained variance ratio [n_pc]); NaN vectors (padding)
    stay NaN, and components beyond the subspace's rank are NaN.
    """
    shape = vectors.shape[:-1]
    flat = vectors.reshape(-1, vectors.shape[-1])
    ok = ~np.isnan(flat).any(axis=1)
    out = np.full((flat.shape[0], n_pc), np.nan)
    ratio = np.full(n_pc, np.nan)
    if basis.shape[1] == 0 or not ok.any():
        return out.reshape(*shape, n_pc), ratio
    coords = flat[ok] @ basis
    centered = coords - coords.mean(axis=0)
    _, s, vt = np.linalg.svd(centered, full_matrices=False)
    k = min(n_pc, vt.shape[0])
    out[ok, :k] = centered @ vt[:k].T
    total = float((s**2).sum())
    if total > 0:
        ratio[:k] = s[:k] ** 2 / total
    return out.reshape(*shape, n_pc), ratio


def trimmed(basis: np.ndarray) -> np.ndarray:
    """A basis from a `decompose` result [d, component] without its NaN (beyond-rank) columns."""
    return basis[:, ~np.isnan(basis).any(axis=0)]


def write(
    ds: xr.Dataset,
    path: Path,
    *,
    study: str,
    params: dict[str, Any],
    model: Model,
    seed: int,
    overwrite: bool,
) -> Path:
    """Save `ds` at `path` with provenance attrs (study, parameters, model, mode, seed)."""
    from qktrace.store import io as store
    from qktrace.store import provenance

    attrs = provenance("study", params, study=study, model=model, seed=seed)
    store.save(ds, path, attrs=attrs, overwrite=overwrite)
    _remove_checkpoints(path)  # what they held is in the store now
    return path


def check_out(path: Path, overwrite: bool) -> Path:
    """Refuse early (before any model work) to overwrite a result; the sums checkpoint's path.

    Until its store is written, a run keeps checkpoints next to it (``<name>.sums.zarr``, the
    running covariance sums of `qktrace.verbs.reduce`, and ``<name>.<what>.zarr`` captures), so a
    crashed run resumes when rerun with the same arguments. With `overwrite`, checkpoints left
    by an earlier run are discarded.
    """
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{path} already exists; pass overwrite=True (CLI: --overwrite) to replace it, or "
            "choose another out directory."
        )
    if overwrite:
        _remove_checkpoints(path)
    return checkpoint(path, "sums")


# the checkpoints a study run keeps beside its store until the store is written
CHECKPOINTS = ("sums", "original", "counterfactual")


def checkpoint(path: Path, what: str) -> Path:
    """The checkpoint ``<name>.<what>.zarr`` next to the store `path` (`what` in CHECKPOINTS)."""
    if what not in CHECKPOINTS:
        raise ValueError(f"unknown checkpoint {what!r}; add it to CHECKPOINTS")
    return path.with_name(f"{path.stem}.{what}.zarr")


def _remove_checkpoints(path: Path) -> None:
    """Delete the run's checkpoints, by exact name, and the hidden copies killed writes left of
    them or of the store (``.<name>.old-XXXXXXXX`` / ``.tmp-``, see `qktrace.store`).

    Only what a run writes is removed: a folder beside it with a similar name (a user's
    ``order_id.mine.zarr``), or a checkpoint path that holds no qktrace store, is left alone.
    """
    from qktrace.store.files import is_copy_of, is_store, remove_copy

    names = [path.name, *(checkpoint(path, what).name for what in CHECKPOINTS)]
    for name in names[1:]:
        found = path.parent / name
        if is_store(found) and not found.is_symlink():
            shutil.rmtree(found, ignore_errors=True)
    if path.parent.is_dir():
        for leftover in path.parent.iterdir():
            if any(is_copy_of(leftover.name, name) for name in names):
                remove_copy(leftover)


# --------------------------------------------------------------------------------------------
# significance: the permutation null of ΔC


# the null's defaults, N_PERMUTATIONS and NULL_QUANTILE, are qktrace.verbs.decompose's


def null_test(
    pairs: dict[tuple[str, str], tuple[np.ndarray, np.ndarray, np.ndarray]],
    *,
    seed: int,
    threshold: float,
    d_head: int,
    n_permutations: int = N_PERMUTATIONS,
    quantile: float = NULL_QUANTILE,
) -> xr.Dataset:
    """`qktrace.verbs.decompose.permutation_null` for every (head, feature): how many components are real.

    `pairs` maps (head, feature) to (q [pairs, d], k [pairs, d], is_positive [pairs]); rows with
    NaN are dropped. Returns ``null_rank (head, feature)``: the number of leading components of
    the ΔC of these pairs whose singular value beats the `quantile` of the label-permutation
    null (-1 where the pairs lack a positive or a negative); ``null_quantile (head, feature,
    component)``: the cut-off each component was tested against (NaN past the first that
    fails); ``null_singular_values (head, feature, component)``: the singular values tested.
    """
    from qktrace.verbs.decompose import permutation_null

    tested = {}
    for (head, feature), (q, k, positive) in pairs.items():
        q = np.asarray(q, dtype=np.float64).reshape(-1, d_head)
        k = np.asarray(k, dtype=np.float64).reshape(-1, d_head)
        positive = np.asarray(positive, dtype=bool).reshape(-1)
        ok = ~(np.isnan(q).any(axis=1) | np.isnan(k).any(axis=1))
        if positive[ok].all() or not positive[ok].any():
            continue
        null = permutation_null(
            q[ok],
            k[ok],
            positive[ok],
            n_permutations=n_permutations,
            seed=seed,
            threshold=threshold,
            quantile=quantile,
        )
        tested[(head, feature)] = (null["singular_values"].values, null["null_quantile"].values)
    return null_dataset(
        list(dict.fromkeys(h for h, _ in pairs)),
        list(dict.fromkeys(f for _, f in pairs)),
        tested,
        d_head,
        quantile=quantile,
        n_permutations=n_permutations,
    )


def null_dataset(
    heads: Sequence[str],
    features: Sequence[str],
    tested: Mapping[tuple[str, str], tuple[np.ndarray, np.ndarray]],
    d_head: int,
    *,
    quantile: float,
    n_permutations: int,
) -> xr.Dataset:
    """The null test's store variables (as `null_test` returns them) from each tested (head,
    feature)'s singular values and cut-offs (`qktrace.core.ops.null_cutoffs`); a (head, feature) not
    in `tested` gets null_rank -1 and NaN."""
    from qktrace.verbs.decompose import null_rank_of

    heads, features = list(heads), list(features)
    rank = np.full((len(heads), len(features)), -1, dtype=np.int64)
    cutoff = np.full((len(heads), len(features), d_head), np.nan)
    values = np.full((len(heads), len(features), d_head), np.nan)
    for (head, feature), (s, c) in tested.items():
        i, j = heads.index(head), features.index(feature)
        values[i, j], cutoff[i, j] = s, c
        rank[i, j] = null_rank_of(s, c)
    dims = ("head", "feature")
    return xr.Dataset(
        {
            "null_rank": (dims, rank),
            "null_quantile": ((*dims, "component"), cutoff),
            "null_singular_values": ((*dims, "component"), values),
        },
        coords={"head": heads, "feature": features, "component": np.arange(d_head)},
        attrs={"null_quantile": quantile, "n_permutations": n_permutations},
    )


def captured_pairs(
    captured: xr.Dataset,
    head: str,
    feature: str | None = None,
    prompts: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(q, k, is_positive) of every labelled (query, key) pair of `captured` for one head.

    Positive where the key's ``key_label`` coordinate is "positive", negative where it is
    "negative"; other keys (unlabelled, padding) are left out. With `feature`, only the keys
    whose ``key_feature`` coordinate is `feature`; with `prompts`, only those prompts.
    """
    if prompts is not None:
        captured = captured.isel(prompt=list(prompts))
    q = captured["q"].sel(head=head).isel(query=0).transpose("prompt", "d_head").values
    k = captured["k"].sel(head=head).transpose("prompt", "key", "d_head").values
    label = captured["key_label"].transpose("prompt", "key").values
    keep = np.isin(label, ["positive", "negative"])
    if feature is not None:
        keep &= captured["key_feature"].transpose("prompt", "key").values == feature
    rows, cols = np.nonzero(keep)
    return q[rows], k[rows, cols], label[rows, cols] == "positive"


# coordinates `qktrace.verbs.intervene` repeats from the captured Dataset of the same prompts
_REPEATED = ("prompt_text", "n_tokens", "query_position", "key_position", "key_token")
_SUMMARIES = (
    "basis",
    "mean_delta_p_target",
    "flip_rate",
    "mean_attention_target_before",
    "mean_attention_target_after",
    *SWAP_INTERVALS,
)


def per_prompt(effects: xr.Dataset) -> xr.Dataset:
    """An `intervene` result without its summaries, basis and coordinates the store has already."""
    drop = [n for n in (*_REPEATED, *_SUMMARIES) if n in effects.variables]
    return effects.drop_vars(drop).drop_attrs()


def swap_summary(effects: xr.Dataset) -> xr.Dataset:
    """Per head and subspace: flip rate, mean change of p(target) and mean target attention,
    with the 95% intervals and recovered-vs-random p-values of `qktrace.core.intervals.swap_intervals`.

    `effects` holds per-prompt `intervene` results stacked over heads (see `per_prompt`).
    """
    attends = effects["attends_orig"]
    return xr.Dataset(
        {
            "flip_rate": effects["flip"].sum("prompt") / attends.sum("prompt"),
            "mean_delta_p_target": effects["delta_p_target"].mean("prompt"),
            "mean_attention_target_after": effects["attention_target_after"].mean("prompt"),
            "mean_attention_target_before": effects["attention_target_before"].mean("prompt"),
        }
    ).assign(swap_intervals(effects).data_vars)


def stack_heads(per_head: Sequence[xr.Dataset], heads: Sequence[str]) -> xr.Dataset:
    """Per-head `intervene` results (each from `per_prompt`) along a ``head`` dim, with summaries."""
    stacked = xr.concat(
        list(per_head), dim="head", data_vars="all", coords="different", compat="equals"
    ).assign_coords(head=list(heads))
    return stacked.merge(swap_summary(stacked))


# --------------------------------------------------------------------------------------------
# heads found by search: the ranking kept in the store

# how many heads a study takes from the find_heads ranking when none are given
N_FOUND_HEADS = 3


def ranking_variables(found: xr.Dataset) -> xr.Dataset:
    """A `find_heads` result as store variables over ``ranked_head`` (best first)."""
    from qktrace.verbs.find_heads import SCORES

    labels = [str(h) for h in found["head"].values]
    return xr.Dataset(
        {f"find_{name}": ("ranked_head", found[name].values) for name in SCORES},
        coords={"ranked_head": labels},
        attrs={
            "find_heads_by": found.attrs.get("by", ""),
            "find_heads_n_prompts": found.attrs.get("n_prompts", 0),
        },
    )


# --------------------------------------------------------------------------------------------
# answer-level effects: does the model say something else when the subspace is edited?

N_RANDOM_ANSWERS = 3
ALL_HEADS = "all"


def answer_effects(
    lm: Model,
    ids: Sequence[Sequence[int]],
    bases: dict[str, np.ndarray],
    *,
    candidates: Sequence[Sequence[Any]],
    answer: Sequence[int],
    target_answer: Sequence[int],
    orig: Sequence[int],
    target: Sequence[int],
    name: str,
    n_random: int,
    seed: int,
    batch_size: int,
    progress: bool,
    key_scope: str = "query_head",
) -> xr.Dataset:
    """Swap the subspace coordinates of orig and target keys in each head alone and in all heads
    together (`qktrace.intervene_answers`, with `key_scope`), and read the model's answer.

    Returns answer-level variables over ``answer_heads`` (each head's label, then "all"),
    ``answer_subspace`` (`name`, then random draws; bool ``answer_random``), ``prompt`` and
    ``answer_candidate``: everything `intervene_answers` returns, its dims renamed so they do
    not collide with the attention-level ``subspace`` (which has more random draws).
    """
    from qktrace.verbs.answers import intervene_answers
    from qktrace.verbs.intervene import Edit, RandomBaseline

    sets = {label: {label: basis} for label, basis in bases.items()}
    if len(bases) > 1:
        sets[ALL_HEADS] = dict(bases)
    parts = []
    for chosen in sets.values():
        fx = intervene_answers(
            lm,
            ids,
            chosen,
            candidates=candidates,
            answer=answer,
            target_answer=target_answer,
            orig=orig,
            target=target,
            name=name,
            edit=Edit("swap", key_scope=key_scope),  # type: ignore[arg-type]
            random=RandomBaseline(n_random, seed=seed),
            batch_size=batch_size,
            progress=progress,
        )
        parts.append(fx.drop_attrs())
    # the unedited copy is the same model on the same prompts for every head set: keep one
    before = [n for n in parts[0].data_vars if "subspace" not in parts[0][n].dims]
    edited = [p.drop_vars(before) for p in parts]
    out = xr.concat(
        edited, dim="answer_heads", data_vars="all", coords="different", compat="equals"
    )
    out = out.merge(parts[0][before])
    return out.assign_coords(answer_heads=list(sets)).rename(
        {
            "subspace": "answer_subspace",
            "random": "answer_random",
            "candidate": "answer_candidate",
            "candidate_token": "answer_candidate_token",
        }
    )


def answer_summary(effects: xr.Dataset) -> xr.Dataset:
    """Per head set and subspace: answer flip rate and mean changes, over the prompts given, with
    the 95% intervals and p-values of `qktrace.core.intervals.answer_intervals`."""
    correct = effects["answer_correct"]
    intervals = answer_intervals(effects, "answer_subspace", "answer_random")
    return xr.Dataset(
        {
            "answer_flip_rate": effects["answer_flip"].sum("prompt") / correct.sum("prompt"),
            "answer_moved_rate": effects["answer_moved"].sum("prompt") / correct.sum("prompt"),
            "mean_answer_candidate_mass": effects["answer_candidate_mass"].mean("prompt"),
            "mean_delta_p_answer": effects["delta_p_answer"].mean("prompt"),
            "mean_delta_p_target_answer": effects["delta_p_target_answer"].mean("prompt"),
            "mean_delta_answer_logit_diff": effects["delta_answer_logit_diff"].mean("prompt"),
        }
    ).assign(intervals.data_vars)


_ANSWER_SUMMARIES = (
    "mean_answer_candidate_mass",
    "answer_flip_rate",
    "answer_moved_rate",
    "mean_delta_p_answer",
    "mean_delta_p_target_answer",
    "mean_delta_answer_logit_diff",
    *ANSWER_INTERVALS,
)


def answer_per_prompt(effects: xr.Dataset) -> xr.Dataset:
    """An `answer_effects` result without its summaries (recomputed over all prompts later)."""
    return effects.drop_vars([n for n in _ANSWER_SUMMARIES if n in effects])


# --------------------------------------------------------------------------------------------
# figures (drawn from stored data)


def model_label(ds: xr.Dataset) -> str:
    """A short name of the store's model for titles: "the organism", a hub id or a folder name."""
    model = str(ds.attrs.get("model", ""))
    if model and is_organism(model):
        return "the organism"
    path = Path(model).expanduser()
    return path.name if model and path.is_absolute() else model


def rank_figure(ds: xr.Dataset, what: str) -> Any:
    """Per head and feature: the 99%-rule rank next to the permutation null's rank.

    The right panel (``null_rank``) counts the leading components that beat the null's 95th
    percentile; "-" where it was not tested (e.g. the order subspace in lexical.zarr).
    """
    from qktrace.study import plots

    threshold = (ds.attrs.get("params") or {}).get("threshold", 0.99)
    panels = {"rank": f"rank ({threshold:.0%} of sum S²)"}
    if "null_rank" in ds:
        untested = bool((ds["null_rank"] < 0).any())
        panels["null_rank"] = "components above the null (95%)" + (
            "\nblank: tested in order_id.zarr" if untested else ""
        )
    values = xr.concat(
        [ds[name].astype(float).where(ds[name] >= 0) for name in panels],
        dim=xr.DataArray(list(panels.values()), dims="measure", name="measure"),
    ).transpose("measure", "head", "feature")
    text = xr.apply_ufunc(
        np.vectorize(lambda v: "-" if not np.isfinite(v) else f"{v:.0f}", otypes=[object]),
        values,
    )
    return plots.heatmap_grid(
        values,
        x="feature",
        y="head",
        col="measure",
        annot=text,
        vmin=0,
        cbar_label="components",
        panel_title=lambda where: str(where["measure"]),
        title=f"{what}, {model_label(ds)}",
        panel_size=max(2.6, 0.7 * ds.sizes["feature"] + 1.2),
    )


def swap_bars(
    ds: xr.Dataset,
    name: str,
    title: str = "",
    *,
    metrics: Sequence[str] = ("mean_delta_p_target", "flip_rate"),
    labels: dict[str, str] | None = None,
    row: str = "head",
    subspace: str = "subspace",
    random: str = "random",
) -> Any:
    """Metrics per `row` (head): subspace `name` next to its random draws (mean, spread, dots)."""
    from qktrace.study import plots

    is_random = ds[random].values
    randoms = [str(s) for s, r in zip(ds[subspace].values, is_random, strict=True) if r]
    names = [name] + ([f"random_{name}"] if randoms else [])
    n_rows = ds.sizes[row]
    data = {}
    for metric in metrics:
        values = np.full((n_rows, len(names), max(1, len(randoms))), np.nan)
        values[:, 0, 0] = ds[metric].sel({subspace: name}).transpose(row).values
        if randoms:
            values[:, 1, :] = ds[metric].sel({subspace: randoms}).transpose(row, subspace).values
        data[metric] = ((row, "subspace", "draw"), values)
    summary = xr.Dataset(data, coords={row: ds[row].values, "subspace": names})
    return plots.intervention_bars(
        summary,
        list(metrics),
        row=row,
        labels=labels or {"mean_delta_p_target": "mean Δ p(target)", "flip_rate": "flip rate"},
        title=title,
    )


def answer_bars(ds: xr.Dataset, name: str, title: str = "") -> Any:
    """Answer-level effects per edited head and for all heads together, vs random subspaces."""
    return swap_bars(
        ds,
        name,
        title,
        metrics=(
            "answer_flip_rate",
            "answer_moved_rate",
            "mean_delta_p_target_answer",
            "mean_delta_answer_logit_diff",
        ),
        labels={
            "answer_flip_rate": "answer flip rate (to the target's)",
            "answer_moved_rate": "answer moved (to any other)",
            "mean_delta_p_target_answer": "mean Δ p(target's answer)",
            "mean_delta_answer_logit_diff": "mean Δ logit(answer) - logit(target's)",
        },
        row="answer_heads",
        subspace="answer_subspace",
        random="answer_random",
    )


def pca_figure(ds: xr.Dataset, hue: str, title: str = "", max_labels: int = 10) -> Any:
    """PCA of the stored keys (`key_pc`), one row per head, coloured by the key coordinate `hue`.

    Only the `max_labels` most frequent labels get their own colour; the rest are "other".
    A rank-1 subspace has one coordinate: it is drawn as a strip per label instead. A head whose
    subspace has fewer components than another's has coordinate 0 on the ones it lacks.
    """
    from qktrace.study import plots

    points = ds["key_pc"].dropna("pc", how="all")
    if "pc_variance_ratio" in ds:  # beyond a head's rank: 0 (padding keys stay NaN)
        beyond = ds["pc_variance_ratio"].sel(pc=points["pc"]).isnull()
        points = points.where(~beyond | points.isel(pc=0).isnull(), 0.0)
    labels = ds[hue].broadcast_like(ds["key_pc"].isel(pc=0, drop=True))
    text = np.vectorize(str, otypes=[object])(labels.values)
    names, counts = np.unique(text, return_counts=True)
    if len(names) > max_labels:
        common = set(names[np.argsort(-counts, kind="stable")[: max_labels - 1]])
        text = np.where(np.isin(text, list(common)), text, "other").astype(object)
    if points.sizes["pc"] < 2:
        return _strip_figure(ds["key_pc"].isel(pc=0), labels.copy(data=text), hue, title)
    named = sorted({t for t in text.ravel() if t != "other"}, key=_label_key)
    if len(named) > 12:  # many labels (pca_scatter colours them on a continuous scale)
        palette: Any = "tab10"
    else:  # one colour per label, "other" in light grey
        import seaborn as sns

        colours = sns.color_palette("tab10", max(len(named), 1))
        palette = {**dict(zip(named, colours, strict=False)), "other": "#d0d0d0"}
    return plots.pca_scatter(
        points, hue=labels.copy(data=text), row="head", title=title, palette=palette
    )


def _strip_figure(coordinate: xr.DataArray, labels: xr.DataArray, hue: str, title: str) -> Any:
    """Per head: the keys' one subspace coordinate (x) for each label (y), as a strip plot."""
    import pandas as pd
    import seaborn as sns
    from matplotlib.figure import Figure

    heads = [str(h) for h in coordinate["head"].values]
    order = sorted(set(labels.values.ravel()), key=_label_key)
    fig = Figure(figsize=(4.2 * len(heads) + 0.5, 0.32 * len(order) + 1.6), layout="constrained")
    axes = fig.subplots(1, len(heads), squeeze=False, sharey=True)[0]
    for ax, head in zip(axes, heads, strict=True):
        frame = pd.DataFrame(
            {
                "x": coordinate.sel(head=head).values.ravel(),
                hue: labels.sel(head=head).values.ravel().astype(str),
            }
        ).dropna()
        sns.stripplot(
            data=frame,
            x="x",
            y=hue,
            order=[str(o) for o in order],
            ax=ax,
            size=2.5,
            alpha=0.5,
            jitter=0.3,
            hue=hue,
            palette="tab10",
            legend=False,
        )
        ax.set_xlabel("coordinate on the subspace's one direction")
        ax.set_title(f"head={head}", fontsize=9)
    if title:
        fig.suptitle(f"{title} (rank 1: one coordinate)")
    return fig


def _label_key(label: Any) -> tuple:
    """Sort numeric labels by value, then text labels, with "other" last."""
    text = str(label)
    if text == "other":
        return (2, 0.0, text)
    try:
        return (0, float(text), text)
    except ValueError:
        return (1, 0.0, text)


def save_figures(figures: dict[str, Any], directory: Path) -> list[Path]:
    """Save matplotlib figures as PNGs in `directory`; returns their paths."""
    paths = []
    for name, fig in figures.items():
        path = directory / name
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths
