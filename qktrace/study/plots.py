"""Seaborn figures from stored results (xarray objects), for every study.

Each function takes labelled data (an `xarray.DataArray` or `Dataset`, usually read back with
`qktrace.store.open`) and names of its dims, and returns a matplotlib `Figure`; save it with
``fig.savefig(path)``. Figures are drawn on `matplotlib.figure.Figure` objects, not through
pyplot, so they need no display and leave no global state behind.

- `heatmap_grid`: one heatmap per facet (rank grids, ΔC, interaction matrices, …).
- `rank_heatmap`: recovered ranks annotated on a grid, coloured by their gap to a reference.
- `pca_scatter`: points in PC pairs (PC1-PC2, PC1-PC3, PC2-PC3), coloured and marked by labels.
- `intervention_bars`: intervention metrics per subspace, recovered next to random baselines.

Facet dims may be stacked dims (``da.stack(panel=("variant", "d_head"))``); their labels are
written out as ``variant=discrete, d_head=16``.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
import pandas as pd
import seaborn as sns
import xarray as xr
from matplotlib.figure import Figure

__all__ = ["heatmap_grid", "intervention_bars", "pca_scatter", "rank_heatmap"]


def _labels(da: xr.DataArray | xr.Dataset, dim: str | None) -> list[Any]:
    return (
        [None]
        if dim is None
        else list(da.indexes[dim])
        if dim in da.indexes
        else list(range(da.sizes[dim]))
    )


def _describe(da: xr.DataArray | xr.Dataset, dim: str | None, label: Any) -> str:
    """'dim=label', or 'a=x, b=y' for a label of a stacked dim."""
    if dim is None:
        return ""
    index = da.indexes.get(dim)
    if isinstance(index, pd.MultiIndex):
        return ", ".join(f"{name}={value}" for name, value in zip(index.names, label, strict=True))
    return f"{dim}={label}"


def _check_dims(da: xr.DataArray | xr.Dataset, dims: Sequence[str | None], what: str) -> None:
    missing = [d for d in dims if d is not None and d not in da.dims]
    if missing:
        raise ValueError(
            f"{what}: dims {missing} are not in the data (dims: {list(da.dims)}); name existing "
            "dims, or stack several into one first, e.g. da.stack(panel=('variant', 'd_head'))."
        )


def heatmap_grid(
    values: xr.DataArray,
    x: str,
    y: str,
    *,
    row: str | None = None,
    col: str | None = None,
    annot: xr.DataArray | bool = False,
    fmt: str = ".2g",
    cmap: str = "viridis",
    center: float | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    cbar_label: str = "",
    dropna: bool = False,
    panel_title: Callable[[dict[str, Any]], str] | None = None,
    title: str = "",
    panel_size: float = 3.2,
) -> Figure:
    """One heatmap of `values` over (`y`, `x`) per `row` x `col` facet.

    Parameters
    ----------
    values : xr.DataArray
        Dims `x`, `y` and the facet dims; anything else must be reduced away first.
    x, y : str
        Dims along the columns and rows of each heatmap.
    row, col : str, optional
        Facet dims (one panel per label).
    annot : bool or xr.DataArray
        True to write the values in the cells; a DataArray (same dims, numbers or strings) to
        write that instead.
    fmt, cmap, center, vmin, vmax
        As in `seaborn.heatmap`; colour limits are shared by all panels.
    cbar_label : str
        Label of the (shared) colour bar.
    dropna : bool
        Drop rows and columns that are all NaN in a panel (e.g. padding).
    panel_title : callable, optional
        Maps the panel's facet labels (``{dim: label}``) to its title.
    title : str
        Figure title.

    Returns
    -------
    matplotlib.figure.Figure

    Examples
    --------
    >>> da = xr.DataArray(np.eye(3), dims=("query_latent", "key_latent"))
    >>> fig = heatmap_grid(da, x="key_latent", y="query_latent", annot=True)
    >>> len(fig.axes)  # the heatmap and its colour bar
    2
    """
    _check_grid_dims(values, x, y, row, col)
    rows, cols = _labels(values, row), _labels(values, col)
    numbers = values.values[np.isfinite(values.values)] if values.size else np.array([])
    vmin = float(numbers.min()) if vmin is None and numbers.size else vmin
    vmax = float(numbers.max()) if vmax is None and numbers.size else vmax
    fig = Figure(
        figsize=(panel_size * len(cols) + 1.0, panel_size * len(rows) + 0.6), layout="constrained"
    )
    axes = fig.subplots(len(rows), len(cols), squeeze=False)
    for (i, r), (j, c) in itertools.product(enumerate(rows), enumerate(cols)):
        where = {d: v for d, v in ((row, r), (col, c)) if d is not None}
        frame, annot_arg, fmt_arg = _panel(values, annot, where, x, y, dropna, fmt)
        ax = axes[i, j]
        with warnings.catch_warnings():  # seaborn's own use of Colormap.set_bad
            warnings.simplefilter("ignore", PendingDeprecationWarning)
            sns.heatmap(
                frame,
                ax=ax,
                annot=annot_arg,
                fmt=fmt_arg,
                cmap=cmap,
                center=center,
                vmin=vmin,
                vmax=vmax,
                cbar=(i == 0 and j == len(cols) - 1),
                cbar_kws={"label": cbar_label},
                square=True,
                xticklabels=True,
                yticklabels=True,
            )
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        if panel_title is not None:
            ax.set_title(panel_title(where), fontsize=9)
        else:
            ax.set_title(
                ", ".join(_describe(values, d, v) for d, v in ((row, r), (col, c)) if d), fontsize=9
            )
    if title:
        fig.suptitle(title)
    return fig


def _check_grid_dims(
    values: xr.DataArray, x: str, y: str, row: str | None, col: str | None
) -> None:
    """Refuse dims that are missing, or left over beyond the grid's."""
    _check_dims(values, [x, y, row, col], "heatmap_grid")
    extra = {str(d) for d in values.dims} - {x, y, row, col}
    if extra:
        raise ValueError(
            f"heatmap_grid: values has dims {sorted(extra)} beyond x={x!r}, y={y!r}, row={row!r}, "
            f"col={col!r}; select or reduce them first, e.g. values.mean({sorted(extra)})."
        )


def _panel(
    values: xr.DataArray,
    annot: xr.DataArray | bool,
    where: dict[Any, Any],
    x: str,
    y: str,
    dropna: bool,
    fmt: str,
) -> tuple[pd.DataFrame, Any, str]:
    """One panel of `heatmap_grid`: (its values as a frame [y, x], seaborn's annot and fmt)."""
    panel = values.sel(where).transpose(y, x) if where else values.transpose(y, x)
    labels = (
        annot.sel(where).transpose(y, x) if isinstance(annot, xr.DataArray) and where else annot
    )
    if dropna:
        keep_y = ~panel.isnull().all(x)
        keep_x = ~panel.isnull().all(y)
        panel = panel.isel({y: keep_y.values, x: keep_x.values})
        if isinstance(labels, xr.DataArray):
            labels = labels.isel({y: keep_y.values, x: keep_x.values})
    frame = panel.to_pandas()
    if isinstance(labels, xr.DataArray):
        return frame, labels.values, "" if labels.dtype.kind in "USO" else fmt
    return frame, bool(labels), fmt


def rank_heatmap(
    ranks: xr.DataArray,
    x: str,
    y: str,
    *,
    reference: xr.DataArray | None = None,
    row: str | None = None,
    col: str | None = None,
    average: Sequence[str] = (),
    title: str = "",
) -> Figure:
    """Recovered ranks on a (`y`, `x`) grid, annotated, coloured by their gap to `reference`.

    Parameters
    ----------
    ranks : xr.DataArray
        Recovered ranks.
    x, y, row, col
        As in `heatmap_grid`.
    reference : xr.DataArray, optional
        The expected ranks (broadcast against `ranks`); the colour shows ``ranks - reference``
        (0 = recovered exactly). Without it the colour shows the ranks themselves.
    average : sequence of str
        Dims to average over (e.g. ``["seed"]``); an average that is not a whole number
        means the runs disagree, and is written with one decimal.

    Examples
    --------
    >>> ranks = xr.DataArray([[3, 3], [5, 4]], dims=("N", "M"), coords={"N": [3, 5], "M": [3, 5]})
    >>> fig = rank_heatmap(ranks, x="M", y="N", reference=ranks["N"])
    """
    mean = ranks.mean(list(average)) if average else ranks.astype(float)
    text = xr.apply_ufunc(np.vectorize(_rank_text, otypes=[object]), mean)
    if reference is None:
        return heatmap_grid(
            mean, x, y, row=row, col=col, annot=text, cmap="viridis", cbar_label="rank", title=title
        )
    gap = mean - reference.mean([d for d in average if d in reference.dims])
    limit = max(1.0, float(np.nanmax(np.abs(gap.values))))
    return heatmap_grid(
        gap.transpose(*mean.dims),
        x,
        y,
        row=row,
        col=col,
        annot=text,
        cmap="RdBu",
        center=0.0,
        vmin=-limit,
        vmax=limit,
        cbar_label="recovered - expected rank",
        title=title,
    )


def _rank_text(value: float) -> str:
    if not np.isfinite(value):
        return ""
    return f"{value:.0f}" if abs(value - round(value)) < 1e-9 else f"{value:.1f}"


def pca_scatter(
    points: xr.DataArray,
    *,
    hue: xr.DataArray | None = None,
    style: str | None = None,
    pc_dim: str = "pc",
    row: str | None = None,
    pairs: Sequence[tuple[Hashable, Hashable]] | None = None,
    title: str = "",
    palette: str = "tab10",
    panel_size: float = 3.4,
) -> Figure:
    """Scatter of points in pairs of principal components, one row per `row` label.

    Parameters
    ----------
    points : xr.DataArray
        PCA coordinates with dim `pc_dim`; every other dim (except `row`) indexes points.
    hue : xr.DataArray, optional
        A label per point (e.g. the cube corner or the category), for colour.
    style : str, optional
        A dim of `points` whose labels get different markers (e.g. ``"role"``: query, key).
    pc_dim : str
        The dim holding the components.
    row : str, optional
        Facet dim.
    pairs : sequence of (pc, pc), optional
        Component pairs to show; by default all pairs of the first three components.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> pts = xr.DataArray(rng.normal(size=(2, 10, 3)), dims=("role", "point", "pc"),
    ...                    coords={"role": ["query", "key"], "pc": [1, 2, 3]})
    >>> fig = pca_scatter(pts, style="role")
    >>> len(fig.axes)
    3
    """
    _check_dims(points, [pc_dim, row, style], "pca_scatter")
    pcs = _labels(points, pc_dim)
    pairs = list(pairs) if pairs is not None else list(itertools.combinations(pcs[:3], 2))
    rows = _labels(points, row)
    fig = Figure(
        figsize=(panel_size * len(pairs) + 1.5, panel_size * len(rows)), layout="constrained"
    )
    axes = fig.subplots(len(rows), len(pairs), squeeze=False)
    for i, r in enumerate(rows):
        panel = points.sel({row: r}) if row is not None else points
        panel_hue = hue.sel({row: r}) if hue is not None and row is not None else hue
        frame = _points_frame(panel, panel_hue, pc_dim, style)
        hue_name = _hue_name(hue)
        if hue is not None and frame[hue_name].nunique() > 12:
            hue_kw: dict[str, Any] = {"hue": hue_name, "palette": "viridis", "legend": False}
        elif hue is not None:
            hue_kw = {"hue": hue_name, "palette": palette}
        else:
            hue_kw = {}
        for j, (a, b) in enumerate(pairs):
            ax = axes[i, j]
            sns.scatterplot(
                data=frame,
                x=a,
                y=b,
                style=style,
                ax=ax,
                s=18,
                alpha=0.7,
                linewidth=0,
                **hue_kw,
                **({} if i == 0 and j == len(pairs) - 1 else {"legend": False}),
            )
            ax.set_xlabel(f"PC{a}")
            ax.set_ylabel(f"PC{b}")
            ax.set_title(_describe(points, row, r), fontsize=9)
        legend = axes[i, -1].get_legend()
        if legend is not None:
            sns.move_legend(
                axes[i, -1], "upper left", bbox_to_anchor=(1.02, 1), fontsize=7, title_fontsize=8
            )
    if title:
        fig.suptitle(title)
    return fig


def _points_frame(
    points: xr.DataArray, hue: xr.DataArray | None, pc_dim: str, style: str | None
) -> pd.DataFrame:
    """One row per point, one column per component, plus columns for hue and style.

    The hue column is named after `hue` (its name, or "label"), the style column after the
    `style` dim, so that the legend titles say what they show.
    """
    point_dims = [d for d in points.dims if d != pc_dim]
    stacked = points.stack(_point=point_dims).transpose("_point", pc_dim)
    frame = pd.DataFrame(
        stacked.values, columns=list(points.indexes[pc_dim]) if pc_dim in points.indexes else None
    )
    components = list(frame.columns)
    if hue is not None:
        frame[_hue_name(hue)] = (
            hue.broadcast_like(points.isel({pc_dim: 0}, drop=True)).stack(_point=point_dims).values
        )
    if style is not None:
        frame[style] = stacked[style].values
    return frame.dropna(subset=components)


def _hue_name(hue: xr.DataArray | None) -> str:
    return str(hue.name) if hue is not None and hue.name is not None else "label"


def intervention_bars(
    results: xr.Dataset,
    metrics: Sequence[str],
    *,
    x: str = "subspace",
    order: Sequence[Any] | None = None,
    hue: str | None = None,
    row: str | None = None,
    labels: dict[str, str] | None = None,
    panel_title: Callable[[dict[str, Any]], str] | None = None,
    title: str = "",
    panel_size: float = 3.6,
) -> Figure:
    """Bars of intervention metrics per subspace (recovered next to random), with spread.

    Every dim other than `x`, `hue` and `row` counts as repetitions (seeds, cells, prompts):
    the bar is their mean and the error bar their standard deviation; the repetitions are
    also drawn as dots. NaN values are left out (use ``results.where(mask)`` to exclude runs
    from a row).

    Parameters
    ----------
    results : xr.Dataset
        Variables named in `metrics`, each with dim `x`.
    metrics : sequence of str
        One column of panels per metric.
    x : str
        The subspace dim (e.g. z1, z2, both, random_z1, …).
    order : sequence, optional
        Order of the bars; by default recovered ones each followed by its random baseline
        when labels are named ``name`` and ``random_name``.
    hue, row : str, optional
        A dim for bar colours, and a facet dim.
    labels : dict, optional
        Axis labels for the metrics.
    panel_title : callable, optional
        Maps the panel's row label (``{row: label}``) to its title.

    Examples
    --------
    >>> ds = xr.Dataset({"flip_rate": (("seed", "subspace"), [[0.9, 0.1], [0.8, 0.2]])},
    ...                 coords={"subspace": ["both", "random_both"]})
    >>> fig = intervention_bars(ds, ["flip_rate"])
    """
    _check_dims(results, [x, hue, row], "intervention_bars")
    missing = [m for m in metrics if m not in results]
    if missing:
        raise ValueError(
            f"intervention_bars: no variables {missing}; the dataset has {list(results.data_vars)}."
        )
    if order is None:
        names = [str(v) for v in results.indexes[x]]
        base = [n for n in names if not n.startswith("random_")]
        order = list(
            itertools.chain.from_iterable(
                [n, f"random_{n}"] if f"random_{n}" in names else [n] for n in base
            )
        )
        order += [n for n in names if n not in order]
    rows = _labels(results, row)
    fig = Figure(figsize=(panel_size * len(metrics) + 1.2, 3.2 * len(rows)), layout="constrained")
    axes = fig.subplots(len(rows), len(metrics), squeeze=False)
    for i, r in enumerate(rows):
        part = results.sel({row: r}) if row is not None else results
        for j, metric in enumerate(metrics):
            frame = part[metric].to_dataframe(name="value").reset_index().dropna(subset=["value"])
            frame[x] = frame[x].astype(str)
            ax = axes[i, j]
            where = {row: r} if row is not None else {}
            ax.set_title(
                panel_title(where) if panel_title else _describe(results, row, r), fontsize=9
            )
            ax.set_ylabel((labels or {}).get(metric, metric))
            if frame.empty:
                _empty_panel(ax, [str(name) for name in order])
                continue
            kw: dict[str, Any] = {"hue": hue} if hue is not None else {"color": "0.55"}
            sns.barplot(
                data=frame, x=x, y="value", order=order, errorbar="sd", ax=ax, alpha=0.85, **kw
            )
            sns.stripplot(
                data=frame,
                x=x,
                y="value",
                order=order,
                dodge=hue is not None,
                ax=ax,
                size=2.5,
                alpha=0.5,
                legend=False,
                **({"hue": hue, "palette": "dark:k"} if hue else {"color": "k"}),
            )
            for tick, name in zip(ax.get_xticklabels(), order, strict=True):
                tick.set_rotation(40)
                tick.set_horizontalalignment("right")
                if not str(name).startswith("random_"):
                    tick.set_fontweight("bold")
            ax.axhline(0.0, color="k", linewidth=0.6)
            ax.set_xlabel("")
            if ax.get_legend() is not None:
                if i == 0 and j == len(metrics) - 1:
                    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1), fontsize=8)
                else:
                    ax.get_legend().remove()
    if title:
        fig.suptitle(title)
    return fig


def _empty_panel(ax: Any, ticks: list[str]) -> None:
    """A bar panel without data: the tick labels, and a note saying that nothing is there."""
    ax.set_xticks(range(len(ticks)), ticks, rotation=40, ha="right")
    ax.set_xlim(-0.5, len(ticks) - 0.5)
    ax.text(
        0.5,
        0.5,
        "no data\n(all values NaN)",
        transform=ax.transAxes,
        ha="center",
        va="center",
        color="0.4",
    )


def stacked_bars(
    parts: xr.DataArray,
    x: str,
    stack: str,
    *,
    row: str | None = None,
    panel_title: Callable[[Any], str] | None = None,
    ylabel: str = "",
    title: str = "",
    palette: str = "deep",
    panel_size: float = 3.6,
) -> Figure:
    """Bars of parts stacked along `stack`, one bar per `x` label, one panel per `row` label.

    Positive parts stack upwards from 0 and negative parts downwards, so a bar's extent shows
    every part; a black tick marks each bar's total. Made for attention-logit attributions
    (`qktrace.attribute`: parts "order", "lexical", "residual" of each key's logit, Fig 10).

    Parameters
    ----------
    parts : xr.DataArray
        Dims `x`, `stack` and optionally `row`; anything else must be reduced away first.
    x, stack, row : str
        The bar dim, the dim of the stacked parts, and an optional facet dim.
    panel_title : callable, optional
        Maps the `row` label to the panel's title.

    Examples
    --------
    >>> da = xr.DataArray([[1.0, -0.5, 0.2], [0.1, 0.3, -0.2]], dims=("key", "part"),
    ...                   coords={"key": ["A", "B"], "part": ["order", "lexical", "residual"]})
    >>> fig = stacked_bars(da, x="key", stack="part")
    >>> len(fig.axes)
    1
    """
    _check_dims(parts, [x, stack, row], "stacked_bars")
    extra = {str(d) for d in parts.dims} - {x, stack, row}
    if extra:
        raise ValueError(
            f"stacked_bars: parts has dims {sorted(extra)} beyond x={x!r}, stack={stack!r}, "
            f"row={row!r}; reduce them first, e.g. parts.mean({sorted(extra)})."
        )
    rows = _labels(parts, row)
    names = _labels(parts, stack)
    xs = _labels(parts, x)
    colors = sns.color_palette(palette, len(names))
    fig = Figure(
        figsize=(max(panel_size, 0.5 * len(xs) + 1.5) + 1.2, 2.8 * len(rows)), layout="constrained"
    )
    axes = fig.subplots(len(rows), 1, squeeze=False)
    for i, r in enumerate(rows):
        panel = (parts.sel({row: r}) if row is not None else parts).transpose(x, stack).values
        ax = axes[i, 0]
        up = np.zeros(len(xs))
        down = np.zeros(len(xs))
        for j, name in enumerate(names):
            values = np.nan_to_num(panel[:, j])
            bottom = np.where(values >= 0, up, down)
            ax.bar(
                range(len(xs)), values, bottom=bottom, color=colors[j], label=str(name), width=0.7
            )
            up += np.clip(values, 0, None)
            down += np.clip(values, None, 0)
        ax.scatter(
            range(len(xs)),
            np.nansum(panel, axis=1),
            marker="_",
            color="k",
            s=200,
            zorder=3,
            label="total",
        )
        ax.axhline(0.0, color="k", linewidth=0.6)
        ax.set_xticks(range(len(xs)), [str(v) for v in xs], rotation=30, ha="right")
        ax.set_ylabel(ylabel)
        ax.set_title(
            panel_title(r) if panel_title is not None else _describe(parts, row, r), fontsize=9
        )
        if i == 0:
            ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1), fontsize=7)
    if title:
        fig.suptitle(title)
    return fig
