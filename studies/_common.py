"""What every language-model study does the same way: open the model, pick heads, store, project.

Kept small on purpose; the method lives in `qktrace` and each study module reads like the
paper's method section.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from qktrace.models import Head, Model, Remote, load, parse_heads

ModelLike = Model | str | os.PathLike

# Heads the paper reports for Llama-3.1-8B-Instruct, used when no heads are given for it.
PAPER_MODEL = "llama-3.1-8b-instruct"
PAPER_HEADS = {
    "filter_heads": "16.19,20.26,20.14",
    "binding": "16.1,17.24,20.1,16.8,16.19,20.13,20.14,22.14,24.27",
}


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
    min_prompts: int = 1,
    why: str = "",
) -> None:
    """Refuse impossible study settings before any model work, naming the argument and flag."""

    def bad(name: str, value: object, rule: str, fix: str) -> ValueError:
        flag = "--" + name.replace("_", "-")
        return ValueError(f"{name}={value!r} (CLI {flag}) {rule}; {fix}.")

    if n_prompts < min_prompts:
        raise bad("n_prompts", n_prompts, f"is too few{why}", f"pass n_prompts >= {min_prompts}")
    if n_test < 1:
        raise bad("n_test", n_test, "leaves no fresh prompts for PCA and swaps", "pass >= 1")
    if not 0.0 < threshold <= 1.0:
        raise bad(
            "threshold",
            threshold,
            "is outside (0, 1] (the fraction of sum(S^2) the kept components hold)",
            "pass e.g. 0.99",
        )
    if n_random < 0:
        raise bad("n_random", n_random, "is negative", "pass 0 (no baseline) or more")
    if batch_size < 1:
        raise bad("batch_size", batch_size, "is below 1", "pass e.g. 16")


def resolve_heads(
    model: Model,
    heads: str | Sequence[Any] | None,
    study: str,
    find: Callable[[], list[Head]] | None = None,
) -> list[Head]:
    """The heads to study: those given; the paper's for its model; else `find()` if possible.

    `find` runs `qktrace.heads.find_heads` on the study's own prompts; it is only called when
    no heads are given and the model is not the paper's.
    """
    if heads is not None:
        parsed = parse_heads(heads)
    elif PAPER_MODEL in model.name.lower():
        parsed = parse_heads(PAPER_HEADS[study])
    elif find is not None and _has_find_heads():
        parsed = find()
    else:
        raise ValueError(
            f"No heads given for {model.name}, and the paper only lists heads for "
            f"Llama-3.1-8B-Instruct. Pass heads, e.g. heads='16.19,20.26' (CLI: --heads "
            "16.19,20.26); qktrace.find_heads can rank the heads of a new model."
        )
    model.check_heads(parsed)
    return parsed


def heads_source(model: Model, heads: str | Sequence[Any] | None) -> str:
    """Where `resolve_heads` takes the heads from: "given", "paper" or "find_heads"."""
    if heads is not None:
        return "given"
    return "paper" if PAPER_MODEL in model.name.lower() else "find_heads"


def _has_find_heads() -> bool:
    try:
        import qktrace.heads  # noqa: F401
    except ImportError:
        return False
    return True


def union_basis(bases: Sequence[np.ndarray], tol: float = 1e-6) -> np.ndarray:
    """An orthonormal basis [d, r] of the span of several bases [d, r_i] (NaN columns dropped)."""
    columns = [b[:, ~np.isnan(b).any(axis=0)] for b in bases]
    stacked = np.concatenate(columns, axis=1)
    if stacked.shape[1] == 0:
        return stacked
    u, s, _ = np.linalg.svd(stacked, full_matrices=False)
    return u[:, s > tol * s[0]]


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
    from qktrace import store

    attrs = store.provenance(
        study, params, model=model.name, revision=model.revision, remote=model.remote, seed=seed
    )
    store.save(ds, path, attrs=attrs, overwrite=overwrite)
    _remove_checkpoints(path)  # what they held is in the store now
    return path


def check_out(path: Path, overwrite: bool) -> Path:
    """Refuse early (before any model work) to overwrite a result; the sums checkpoint's path.

    Until its store is written, a run keeps checkpoints next to it (``<name>.sums.zarr``, the
    running covariance sums of `qktrace.sums`, and ``<name>.<what>.zarr`` captures), so a
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


def checkpoint(path: Path, what: str) -> Path:
    """The checkpoint ``<name>.<what>.zarr`` next to the store `path`."""
    return path.with_name(f"{path.stem}.{what}.zarr")


def _remove_checkpoints(path: Path) -> None:
    for leftover in path.parent.glob(f"{path.stem}.*.zarr"):
        shutil.rmtree(leftover)


# coordinates `qktrace.interventions` repeats from the captured Dataset of the same prompts
_REPEATED = ("prompt_text", "n_tokens", "query_position", "key_position", "key_token")
_SUMMARIES = (
    "basis",
    "mean_delta_p_target",
    "flip_rate",
    "mean_attention_target_before",
    "mean_attention_target_after",
)


def per_prompt(effects: xr.Dataset) -> xr.Dataset:
    """An `intervene` result without its summaries, basis and coordinates the store has already."""
    drop = [n for n in (*_REPEATED, *_SUMMARIES) if n in effects.variables]
    return effects.drop_vars(drop).drop_attrs()


def swap_summary(effects: xr.Dataset) -> xr.Dataset:
    """Per head and subspace: flip rate, mean change of p(target) and mean target attention.

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
    )


def stack_heads(per_head: Sequence[xr.Dataset], heads: Sequence[str]) -> xr.Dataset:
    """Per-head `intervene` results (each from `per_prompt`) along a ``head`` dim, with summaries."""
    stacked = xr.concat(
        list(per_head), dim="head", data_vars="all", coords="different", compat="equals"
    ).assign_coords(head=list(heads))
    return stacked.merge(swap_summary(stacked))


# --------------------------------------------------------------------------------------------
# figures (drawn from stored data)


def swap_bars(ds: xr.Dataset, name: str, title: str = "") -> Any:
    """Flip rate and mean change of p(target) per head: subspace `name` next to its random draws."""
    from qktrace import plots

    metrics = ["mean_delta_p_target", "flip_rate"]
    randoms = [str(s) for s, r in zip(ds["subspace"].values, ds["random"].values, strict=True) if r]
    labels = [name] + ([f"random_{name}"] if randoms else [])
    n_heads = ds.sizes["head"]
    data = {}
    for metric in metrics:
        values = np.full((n_heads, len(labels), max(1, len(randoms))), np.nan)
        values[:, 0, 0] = ds[metric].sel(subspace=name).values
        if randoms:
            values[:, 1, :] = ds[metric].sel(subspace=randoms).transpose("head", "subspace").values
        data[metric] = (("head", "subspace", "draw"), values)
    summary = xr.Dataset(data, coords={"head": ds["head"].values, "subspace": labels})
    return plots.intervention_bars(
        summary,
        metrics,
        row="head",
        labels={"mean_delta_p_target": "mean Δ p(target)", "flip_rate": "flip rate"},
        title=title,
    )


def pca_figure(ds: xr.Dataset, hue: str, title: str = "", max_labels: int = 10) -> Any:
    """PCA of the stored keys (`key_pc`), one row per head, coloured by the key coordinate `hue`.

    Only the `max_labels` most frequent labels get their own colour; the rest are "other".
    """
    from qktrace import plots

    points = ds["key_pc"].dropna("pc", how="all")
    if points.sizes["pc"] < 2:  # a rank-1 subspace: show its one coordinate against 0
        points = ds["key_pc"].isel(pc=slice(0, 2))
        points = points.where(points["pc"] == points["pc"][0], 0.0).where(
            points.isel(pc=0).notnull()
        )
    labels = ds[hue].broadcast_like(points.isel(pc=0, drop=True))
    text = np.vectorize(str, otypes=[object])(labels.values)
    names, counts = np.unique(text, return_counts=True)
    if len(names) > max_labels:
        common = set(names[np.argsort(-counts, kind="stable")[: max_labels - 1]])
        text = np.where(np.isin(text, list(common)), text, "other").astype(object)
    return plots.pca_scatter(points, hue=labels.copy(data=text), row="head", title=title)


def save_figures(figures: dict[str, Any], directory: Path) -> list[Path]:
    """Save matplotlib figures as PNGs in `directory`; returns their paths."""
    paths = []
    for name, fig in figures.items():
        path = directory / name
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths
