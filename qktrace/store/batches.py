"""Making each batch fit a `BatchWriter` store: `conform`.

A batch is stored as the store holds it: strings variable-length, and padded in the dims other
than the batch dim to the planned sizes (``sizes=``) or the first batch's: floats with NaN,
strings with ``""``, booleans with ``False``, datetimes with NaT (`fill`; an int variable padded
in the first batch becomes float, as in `xarray.concat`). A later batch must then match the
first: the same variables with the same dims and kind of dtype (`schema`), and the same labels
along the other dims that have an index coordinate.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from qktrace.store.identity import diff_lines

__all__: list[str] = []


def conform(
    ds: xr.Dataset,
    *,
    dim: str,
    planned: Mapping[str, int],
    reference: xr.Dataset | None,
    index: int,
    path: Path,
) -> xr.Dataset:
    """`ds`, the batch numbered `index`, as the store at `path` holds it.

    Parameters
    ----------
    ds : xarray.Dataset
        The batch; `dim` is the batch dim.
    planned : mapping of str to int
        The run's planned sizes (used for the first batch).
    reference : xarray.Dataset or None
        The stored run (an empty slice along `dim`), or None for the first batch.
    index, path
        For the messages.

    Raises
    ------
    ValueError
        If `ds` is larger than the store in another dim, or (a later batch) does not match it.
    """
    ds = ds.drop_encoding()
    for name, var in ds.variables.items():
        if var.dtype.kind == "U":  # fixed-length strings would cut longer ones later
            ds[name] = var.astype(object)
    if reference is None:
        sizes = {d: n for d, n in ds.sizes.items() if d != dim}
        sizes.update({d: n for d, n in planned.items() if d in sizes})
    else:
        sizes = {d: n for d, n in reference.sizes.items() if d != dim}
    ds = _pad(ds, dim, sizes, index)
    if reference is None:
        return ds
    for name, var in reference.variables.items():  # ints the store padded to float
        if name in ds.variables and var.dtype.kind == "f" and ds[name].dtype.kind in "iu":
            ds[name] = ds[name].astype(var.dtype)
    _check_matches(ds, reference, dim, index, path)
    return ds


def _pad(ds: xr.Dataset, dim: str, sizes: Mapping[Any, int], index: int) -> xr.Dataset:
    """`ds` padded to `sizes` in the dims other than `dim` (refused where it is larger, or
    where the dim has labels)."""
    pad: dict[Any, int] = {}
    for d, n in ds.sizes.items():
        if d == dim or n == sizes[d]:
            continue
        if n > sizes[d] or d in ds.indexes:
            raise ValueError(
                f"batch {index} has {n} along {d!r}, but the store holds {sizes[d]} "
                "(the planned size, or the first batch's). Pass BatchWriter(..., "
                f"sizes={{{d!r}: <the largest size of any batch>}}) when the run starts "
                "(capture passes its batch plan's widths), or give every batch the same "
                f"size there{' and labels' if d in ds.indexes else ''}."
            )
        pad[d] = sizes[d] - n
    if pad:
        ds = ds.assign_coords({d: np.arange(ds.sizes[d]) for d in pad})
        fill_values = {k: fill(v.dtype) for k, v in ds.variables.items()}
        ds = ds.reindex({d: np.arange(sizes[d]) for d in pad}, fill_value=fill_values)
        ds = ds.drop_vars(list(pad))
    return ds


def _check_matches(ds: xr.Dataset, reference: xr.Dataset, dim: str, index: int, path: Path) -> None:
    """Refuse a batch whose variables or labels differ from the stored run's."""
    new, stored = schema(ds), schema(reference)
    if new != stored:
        raise ValueError(
            f"batch {index} does not match batch 0 of {path}:\n"
            + diff_lines(stored, new, "variable", "batch 0", "this batch")
            + "\nEvery batch must have the same variables, with the same dims and kind of "
            "dtype (an int variable padded in a later batch needs NaN: make it float, or "
            "pass sizes= so the first batch is padded too); fix the producer, or write this "
            "run to a new path."
        )
    for d in ds.indexes:
        if d != dim and not ds.indexes[d].equals(reference.indexes[d]):
            raise ValueError(
                f"batch {index} has {d!r} labels {list(ds.indexes[d])}, but batch 0 of "
                f"{path} has {list(reference.indexes[d])}; every batch must have the "
                f"same labels along dims other than {dim!r}."
            )


def schema(ds: xr.Dataset) -> dict[str, tuple[tuple[str, ...], str]]:
    """Variable name -> (dims, dtype kind), with all string kinds as 'str'."""

    def kind(dtype: np.dtype) -> str:
        return "str" if dtype.kind in "USOT" else dtype.kind

    return {str(k): (tuple(map(str, v.dims)), kind(v.dtype)) for k, v in ds.variables.items()}


def fill(dtype: np.dtype) -> Any:
    """The value a batch is padded with in a variable of `dtype`."""
    if dtype.kind in "USOT":
        return ""
    if dtype.kind == "b":
        return False
    if dtype.kind == "M":
        return np.datetime64("NaT")
    if dtype.kind == "m":
        return np.timedelta64("NaT")
    return math.nan
