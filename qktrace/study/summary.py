"""A readable text summary of any qktrace store: provenance, ranks, interventions, attribution.

`summarize(ds)` is what ``qktrace show PATH`` prints. It reads only small variables (ranks,
per-subspace means, explained fractions), so it is quick on large stores opened lazily. Sections
appear when the store has what they need:

- provenance: study, model, mode (local / remote-local / ndif), seed, date, versions, parameters;
- ranks: every variable named ``rank`` or ``*_rank`` as a table (e.g. head x feature), with
  ``null_rank`` (components that beat the permutation null) explained when present;
- interventions: ``flip_rate``, ``mean_delta_p_target`` and the mean attention on the target
  before and after the edit (``mean_attention_target_before/after``) per subspace, the recovered subspace
  next to the mean and spread of its random baselines (``random`` coordinate, or labels
  ``random_*``);
- answers: ``answer_flip_rate``, the mean changes of p(answer), p(target's answer) and of the
  logit difference per edited head set (``answer_heads``) and subspace (``answer_subspace``),
  recovered next to random (`qktrace.intervene_answers`, the studies' answer-level swaps), and
  the candidates' mean next-token probability (``mean_answer_candidate_mass``), with a warning
  when it is too low for the answers to mean much;
- attribution: the mean explained fraction per head (``explained``);
- the list of variables with their dims.
"""

from __future__ import annotations

import unicodedata
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

__all__ = ["summarize", "printable"]

# a value of the store's attrs or labels is shown up to this many characters
MAX_SHOWN = 500
# variables with more cells than this are listed but not read (a summary shows small ones)
MAX_SUMMARIZED = 10**6

_PROVENANCE = ("verb", "study", "model", "revision", "dtype", "remote", "seed", "date")
_VERSIONS = ("qktrace_version", "nnsight_version", "torch_version", "transformers_version")
_ANSWER_METRICS = {
    "answer_flip_rate": "answer flip rate",
    "answer_moved_rate": "answer moved rate",
    "mean_delta_p_answer": "mean Δp(answer)",
    "mean_delta_p_target_answer": "mean Δp(target's answer)",
    "mean_delta_answer_logit_diff": "mean Δ logit diff",
}
_METRICS = {
    "flip_rate": "flip rate",
    "mean_delta_p_target": "mean Δp(target)",
    "mean_attention_target_before": "attn(target) before",
    "mean_attention_target_after": "attn(target) after",
}


def summarize(
    ds: xr.Dataset, path: Any = None, *, variables: bool = True, max_width: int = 100
) -> str:
    """A multi-line summary of a qktrace Dataset (see the module docstring).

    Examples
    --------
    >>> ds = xr.Dataset({"rank": (("head", "feature"), [[3, 4]])},
    ...                 coords={"head": ["16.19"], "feature": ["fruit", "animal"]},
    ...                 attrs={"study": "filter_heads", "model": "m"})
    >>> print(summarize(ds).splitlines()[0])
    study filter_heads | model m
    """
    listed = ds
    ds = _shown(ds)
    with pd.option_context("display.width", max_width, "display.max_columns", 20):
        sections = [
            _provenance(ds, path),
            _ranks(ds),
            _interventions(ds),
            _answers(ds),
            _explained(ds),
        ]
        if variables:
            sections.append(_variables(listed))
    return printable("\n\n".join(s for s in sections if s), limit=None, keep="\n")


def printable(text: Any, limit: int | None = MAX_SHOWN, keep: str = "") -> str:
    """`text` safe to print: control, escape and direction characters shown escaped
    (``\\x1b``), so text from a store cannot move the cursor, recolour the terminal or forge
    lines; cut to `limit` characters with "...". Characters in `keep` (e.g. a newline) stay."""
    out = "".join(c if c in keep or _safe(c) else _escaped(c) for c in str(text))
    return out if limit is None or len(out) <= limit else out[: limit - 3] + "..."


def _safe(c: str) -> bool:
    """Not a control, format (e.g. right-to-left override), separator or unassigned character."""
    return unicodedata.category(c) not in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp")


def _escaped(c: str) -> str:
    code = ord(c)
    if code < 0x100:
        return f"\\x{code:02x}"
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def _cleaned(value: Any) -> Any:
    """Attrs with every string (key or value) `printable`."""
    if isinstance(value, dict):
        return {printable(k): _cleaned(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_cleaned(v) for v in value]
    if isinstance(value, str):
        return printable(value)
    return value


def _shown(ds: xr.Dataset) -> xr.Dataset:
    """What the summary reads of `ds`: its small variables, names, labels and attrs printable."""
    small = [name for name, var in ds.data_vars.items() if var.size <= MAX_SUMMARIZED]
    ds = ds[small]
    names = {n: printable(n, 60) for n in [*ds.variables, *ds.dims] if printable(n, 60) != str(n)}
    ds = ds.rename(names) if names else ds
    labels = {}
    for name, coord in ds.coords.items():
        if coord.dtype.kind in "USO" and coord.size <= MAX_SUMMARIZED:
            values = [printable(v, 60) if isinstance(v, str) else v for v in coord.values.ravel()]
            labels[name] = (coord.dims, np.array(values, dtype=object).reshape(coord.shape))
    ds = ds.assign_coords(labels) if labels else ds
    ds.attrs = _cleaned(dict(ds.attrs))
    return ds


def _provenance(ds: xr.Dataset, path: Any) -> str:
    attrs = ds.attrs
    shown = {"remote": "mode"}
    head = " | ".join(
        f"{shown.get(k, k)} {attrs[k]}"
        for k in _PROVENANCE
        if attrs.get(k) is not None and not (k == "verb" and attrs.get("study"))
    )
    lines = [f"{path}" if path is not None else "", head]
    if attrs.get(
        "partial"
    ):  # a checkpoint of qktrace.verbs.reduce that holds the first prompts only
        lines.append(str(attrs["partial"]))
    versions = ", ".join(
        f"{k.removesuffix('_version')} {attrs[k]}" for k in _VERSIONS if attrs.get(k)
    )
    if versions:
        lines.append(f"versions: {versions}")
    params = attrs.get("params")
    if isinstance(params, dict) and params:
        lines.append("params: " + ", ".join(f"{k}={printable(v)}" for k, v in params.items()))
    lines.append("dims: " + ", ".join(f"{k}={v}" for k, v in ds.sizes.items()))
    return "\n".join(line for line in lines if line)


def _ranks(ds: xr.Dataset) -> str:
    blocks = []
    for name in ds.data_vars:
        if not (name == "rank" or str(name).endswith("_rank")):
            continue
        da = ds[name].load()
        if da.ndim == 0:
            blocks.append(f"{name}: {da.item()}")
        elif da.ndim <= 2:
            blocks.append(f"{name} ({' x '.join(map(str, da.dims))}):\n{_table(da)}")
        else:
            rows = [d for d in da.dims[:-1]]
            frame = da.to_dataframe(name=str(name))[str(name)].unstack(da.dims[-1])
            blocks.append(f"{name} ({' x '.join(map(str, rows))} x {da.dims[-1]}):\n{frame}")
    if not blocks:
        return ""
    threshold = ds.attrs.get("threshold") or (ds.attrs.get("params") or {}).get("threshold")
    title = "Ranks" + (f" ({threshold:g} of sum S^2 kept)" if threshold else "")
    if "null_rank" in ds:
        title += (
            "; null_rank: leading ΔC components above the 95th percentile of a "
            "label-permutation null (-1: not tested)"
        )
    return title + "\n" + "\n".join(blocks)


def _table(da: xr.DataArray) -> str:
    if da.ndim == 1:
        return da.to_pandas().to_frame(str(da.name)).T.to_string()
    return da.to_pandas().to_string()


def _answers(ds: xr.Dataset) -> str:
    """The answer-level table: what the edit written into the model does to its answer."""
    table = _interventions(ds, _ANSWER_METRICS, "answer_subspace", "answer_random")
    if not table:
        return (
            f"Answers: {ds.attrs['answer_swaps_skipped']}"
            if ds.attrs.get("answer_swaps_skipped")
            else ""
        )
    extra = ""
    if "answer_correct" in ds:
        extra = f"\nanswered correctly before the edit: {float(ds['answer_correct'].mean()):.3f}"
    if "mean_answer_candidate_mass" in ds:
        from qktrace.verbs.answers import low_mass_note

        mass = float(ds["mean_answer_candidate_mass"])
        extra += f"\nnext-token probability on the candidates before the edit (mean): {mass:.3g}"
        if note := low_mass_note(mass):
            extra += f"\nWARNING: {note}"
    head = "Answers: the edit written into the model (per edited head; 'all' = all heads at once)"
    return f"{head}, recovered subspace vs random subspaces of equal rank\n{table}{extra}"


def _interventions(
    ds: xr.Dataset,
    table: dict[str, str] | None = None,
    subspace: str = "subspace",
    random: str = "random",
) -> str:
    """The table of intervention metrics (`table`: variable -> label; default: the swap's),
    recovered subspace vs random ones, per kept dim (others averaged), with intervals and
    p-values where the store has them; answer tables (`table` given) without the title."""
    answers = table is not None
    table = _METRICS if table is None else table
    metrics = [m for m in table if m in ds and subspace in ds[m].dims]
    if not metrics:
        return ""
    recovered, randoms = _recovered_and_random(ds, subspace, random)
    outer = [d for d in ds[metrics[0]].dims if d != subspace]
    keep = _kept_dims(ds, outer)
    averaged = [d for d in outer if d not in keep]
    rows: list[dict[str, Any]] = []
    alike: list[str] = []
    opposite: list[str] = []
    for metric in metrics:
        _metric_rows(ds, metric, table[metric], subspace, recovered, randoms, keep, averaged,
                     rows, alike, opposite)  # fmt: skip
    frame = pd.DataFrame(rows)
    if frame["p vs random"].isna().all():
        frame = frame.drop(columns="p vs random")
    else:
        frame["p vs random"] = frame["p vs random"].map(format_p)
    legend = _legend(frame, alike, opposite)
    index = [*map(str, keep), "subspace", "metric"]
    frame = frame.sort_values(index[:-1], kind="stable").set_index(index).round(3)
    if answers:
        return frame.to_string() + legend
    note = f" (mean over {', '.join(map(str, averaged))})" if averaged else ""
    return (
        f"Interventions: recovered subspace vs {len(randoms)} random subspaces of equal rank"
        f"{note}\n{frame.to_string()}{legend}{_before_edit(ds, keep)}"
    )


def _recovered_and_random(ds: xr.Dataset, subspace: str, random: str) -> tuple[list, list]:
    """(recovered subspace names, random ones): by the `random` coordinate, else by name."""
    names = [str(s) for s in ds[subspace].values]
    if random in ds.coords:
        is_random = np.asarray(ds[random].values, dtype=bool)
    else:
        is_random = np.array([n.startswith("random_") for n in names])
    recovered = [n for n, r in zip(names, is_random, strict=True) if not r]
    randoms = [n for n, r in zip(names, is_random, strict=True) if r]
    return recovered, randoms


def _metric_rows(
    ds: xr.Dataset,
    metric: str,
    label: str,
    subspace: str,
    recovered: list,
    randoms: list,
    keep: list,
    averaged: list,
    rows: list[dict[str, Any]],
    alike: list[str],
    opposite: list[str],
) -> None:
    """Append to `rows` one row per kept place and recovered subspace of `metric`, to `alike`
    each that random subspaces match (p >= 0.05), and to `opposite` each that beats them only
    because they moved the other way (p < 0.05, but its own interval includes 0)."""

    def stack(name: str) -> xr.DataArray | None:
        """`name` stacked over the kept dims; None where the store lacks it or it would need
        averaging (an interval or p-value does not average)."""
        if name not in ds or averaged:
            return None
        da = ds[name].load()
        return da.stack(_where=keep) if keep else da.expand_dims(_where=[0])

    da = ds[metric].load()
    if averaged:
        da = da.mean([d for d in averaged if d in da.dims])
    stacked = da.stack(_where=keep) if keep else da.expand_dims(_where=[0])
    low, high = stack(f"{metric}_low"), stack(f"{metric}_high")
    tested = stack(f"{metric}_p_vs_random")
    for where in stacked["_where"].values:
        cell = stacked.sel(_where=where)
        place = where if isinstance(where, tuple) else (where,)
        where_label = {str(d): v for d, v in zip(keep, place, strict=False)}
        for name in recovered:
            # a baseline named after its subspace (toy: random_z1), else all random draws
            own = [r for r in randoms if r == f"random_{name}"] or randoms
            baseline = cell.sel({subspace: own}).values if own else np.array([np.nan])
            at = {"_where": where, subspace: name}
            value = f"{float(cell.sel({subspace: name})):.3f}"
            if low is not None and high is not None:
                value += f" [{float(low.sel(at)):.3f}, {float(high.sel(at)):.3f}]"
            p = float(tested.sel(at)) if tested is not None else float("nan")
            shown = " ".join(f"{d} {v}" for d, v in where_label.items())
            if p >= 0.05:
                alike.append(f"{shown} {name} {label} ({_p_phrase(p)})".strip())
            elif p < 0.05 and low is not None and high is not None:
                if float(low.sel(at)) <= 0 <= float(high.sel(at)):
                    opposite.append(f"{shown} {name} {label} ({_p_phrase(p)})".strip())
            rows.append(
                {
                    **where_label,
                    "subspace": name,
                    "metric": label,
                    "value [95% CI]": value,
                    "random mean": _nan_safe(np.nanmean, baseline),
                    "random sd": _nan_safe(np.nanstd, baseline),
                    "p vs random": p,
                }
            )


def format_p(p: float) -> str:
    """A p-value to 3 significant digits (0.0496, not a rounded 0.050 that reads as p >= 0.05)."""
    if not np.isfinite(p):
        return ""
    return "<0.001" if p < 0.001 else f"{p:.3g}"


def _p_phrase(p: float) -> str:
    """ "p = 0.0496", or "p < 0.001"."""
    shown = format_p(p)
    return f"p {shown[0]} {shown[1:]}" if shown.startswith("<") else f"p = {shown}"


def _legend(frame: pd.DataFrame, alike: list[str], opposite: list[str]) -> str:
    """What the intervals and p-values are, and which effects random subspaces match."""
    legend = ""
    if not frame.empty and "[" in frame["value [95% CI]"].iloc[0]:
        legend += (
            "\n[95% CI]: Wilson interval of a rate, percentile bootstrap over prompts of a mean;"
            " p vs random: one-sided sign-flip test over prompts of recovered minus the random "
            "subspaces' mean (qktrace.core.intervals)"
        )
    if alike:
        legend += "\nNot distinguishable from random subspaces (p >= 0.05): " + "; ".join(alike)
    if opposite:
        legend += (
            "\nBeyond random only because the random subspaces moved it the other way (p < 0.05,"
            " but its own 95% interval includes 0: no effect of its own): " + "; ".join(opposite)
        )
    return legend


def _before_edit(ds: xr.Dataset, keep: list) -> str:
    """The attention on the target before the edit, per kept dim ("" if not stored)."""
    if (
        "mean_attention_target_before" not in ds
        or "subspace" in ds["mean_attention_target_before"].dims
    ):
        return ""
    da = ds["mean_attention_target_before"].load()
    da = da.mean([d for d in da.dims if d not in keep]).round(4)
    return "\nattention on the target before the edit:\n" + (
        _table(da) if da.ndim else f"{float(da):.3f}"
    )


def _nan_safe(reduce: Any, values: np.ndarray) -> float:
    """`reduce` (nanmean, nanstd) of `values`, NaN without a warning when all are NaN."""
    finite = values[np.isfinite(values)]
    return float(reduce(finite)) if finite.size else float("nan")


def _kept_dims(ds: xr.Dataset, dims: list) -> list:
    """`head` if present, else the leading dims while they index at most 12 cells."""
    if "head" in dims:
        return ["head"]
    kept, cells = [], 1
    for d in dims:
        if cells * ds.sizes[d] > 12:
            break
        kept.append(d)
        cells *= ds.sizes[d]
    return kept


def _explained(ds: xr.Dataset) -> str:
    if "explained" not in ds:
        return ""
    da = ds["explained"].load()
    keep = [d for d in da.dims if d == "head"]
    mean = da.mean([d for d in da.dims if d not in keep])
    parts = ""
    if "logit_part" in ds:
        part_dim = next(d for d in ds["logit_part"].dims if d in ("part", "component"))
        share = abs(ds["logit_part"].load()).mean(
            [str(d) for d in ds["logit_part"].dims if d not in ("head", part_dim)]
        )
        parts = f"\nmean |logit part| per head:\n{_table(share)}"
    return f"Attribution: explained fraction 1 - ||resid||^2/||total||^2\n{_table(mean)}{parts}"


def _variables(ds: xr.Dataset) -> str:
    lines = [f"  {name} ({', '.join(map(str, var.dims))})" for name, var in ds.data_vars.items()]
    return "Variables:\n" + "\n".join(lines)
