"""The arrays of a `BatchWriter` store on disk: where each batch's rows go, and growing them.

The store is ONE zarr group (format 2, consolidated metadata). The first batches create its
arrays (`BatchArrays.create`), chunked along the batch dim by the first batch's size and sized
along it to the run's planned total (without one they grow by doubling, `BatchArrays.resize`);
later batches are region writes into their rows (`BatchArrays.write_rows`). Which files a write
touches (`chunk_files`, `metadata_files`) is read from the consolidated metadata, so the
manifest can drop them from its record before they are rewritten.
"""

from __future__ import annotations

import itertools
import json
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import xarray as xr

from qktrace.store.files import FINAL, MANIFEST, ZARR_FORMAT, remove
from qktrace.store.identity import jsonable

__all__: list[str] = []


class BatchArrays:
    """The arrays with the batch dim `dim` of the store at `path`, and their layout on disk."""

    def __init__(self, path: Path, dim: str) -> None:
        self.path = path
        self.dim = dim
        self._layouts: dict[str, ArrayLayout] | None = None

    def create(
        self, ds: xr.Dataset, attrs: Mapping[str, Any], chunk_rows: int, planned: int
    ) -> list[str]:
        """Write `ds` (the first batches) as the store's arrays, with the run's `attrs`, chunked
        along the batch dim by `chunk_rows`; give them `planned` rows if more. Returns every
        file of the store (relative paths)."""
        for entry in self.path.iterdir():  # arrays of a first batch a crash left uncommitted
            if entry.name not in (MANIFEST, FINAL):
                remove(entry)
        n = ds.sizes[self.dim]
        out = ds.drop_indexes(self.dim) if self.dim in ds.indexes else ds
        out.attrs = jsonable({**ds.attrs, **attrs, "batch_dim": self.dim})
        for var in out.variables.values():
            var.attrs = jsonable(var.attrs)
        encoding = {
            name: {
                "chunks": tuple(
                    chunk_rows if d == self.dim else max(s, 1) for d, s in var.sizes.items()
                )
            }
            for name, var in out.variables.items()
            if self.dim in var.dims
        }
        with beside_manifest():
            out.to_zarr(
                self.path,
                mode="a",
                zarr_format=ZARR_FORMAT,
                consolidated=True,
                encoding=encoding,
                write_empty_chunks=True,
            )
        if planned > n:
            resize_arrays(self.path, self.dim, planned)
        self._layouts = None
        return [p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file()]

    def write_rows(self, ds: xr.Dataset, start: int) -> None:
        """Write `ds`'s rows into rows `start`.. of the arrays (variables without the batch dim
        were stored with the first batch, the store's attrs too)."""
        n = ds.sizes[self.dim]
        out = ds.drop_vars([k for k, v in ds.variables.items() if self.dim not in v.dims])
        out = out.drop_indexes(self.dim) if self.dim in out.indexes else out
        out.attrs = {}
        with beside_manifest():
            out.to_zarr(
                self.path,
                region={self.dim: slice(start, start + n)},
                zarr_format=ZARR_FORMAT,
                consolidated=True,
                write_empty_chunks=True,
            )

    def resize(self, rows: int) -> None:
        """Give every array with the batch dim `rows` rows (metadata only)."""
        resize_arrays(self.path, self.dim, rows)
        self._layouts = None

    def capacity(self) -> int:
        """The rows the arrays have now (planned or grown; the complete ones are fewer)."""
        return next(iter(self._layout().values())).rows

    def chunk_files(self, start: int, stop: int) -> list[str]:
        """The chunk files (store-relative) that hold rows `start..stop-1`."""
        return [f for layout in self._layout().values() for f in layout.chunk_files(start, stop)]

    def metadata_files(self) -> list[str]:
        """The metadata files a resize rewrites."""
        arrays = [f"{name}/{meta}" for name in self._layout() for meta in (".zarray", ".zattrs")]
        return [".zmetadata", *arrays]

    def _layout(self) -> dict[str, ArrayLayout]:
        if self._layouts is None:
            self._layouts = array_layouts(self.path, self.dim)
        return self._layouts


@dataclass
class ArrayLayout:
    """Where one zarr array with the batch dim keeps its chunks."""

    name: str
    axis: int  # of the batch dim
    rows: int
    chunk_rows: int
    other_chunks: list[int]  # number of chunks along each other axis
    separator: str

    def chunk_files(self, start: int, stop: int) -> list[str]:
        """The chunk files (store-relative) holding rows `start..stop-1`."""
        first, last = start // self.chunk_rows, -(-stop // self.chunk_rows)
        grid = [range(n) for n in self.other_chunks]
        grid.insert(self.axis, range(first, last))
        return [
            f"{self.name}/{self.separator.join(map(str, index))}"
            for index in itertools.product(*grid)
        ]


def array_layouts(path: Path, dim: str) -> dict[str, ArrayLayout]:
    """The layout of each array with `dim`, from the store's consolidated metadata."""
    metadata = json.loads((path / ".zmetadata").read_text())["metadata"]
    out = {}
    for key, meta in metadata.items():
        name, _, leaf = key.rpartition("/")
        if leaf != ".zarray" or not name or "/" in name:
            continue
        dims = metadata[f"{name}/.zattrs"]["_ARRAY_DIMENSIONS"]
        if dim not in dims:
            continue
        axis = dims.index(dim)
        others = [
            -(-s // c)
            for i, (s, c) in enumerate(zip(meta["shape"], meta["chunks"], strict=True))
            if i != axis
        ]
        out[name] = ArrayLayout(
            name, axis, meta["shape"][axis], meta["chunks"][axis], others,
            meta.get("dimension_separator") or ".",
        )  # fmt: skip
    return out


@contextmanager
def beside_manifest() -> Iterator[None]:
    """Silence zarr's warning that the manifest in a BatchWriter store is no zarr object."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Object at .* is not recognized", UserWarning)
        yield


def resize_arrays(path: Path, dim: str, rows: int) -> None:
    """Give each array with `dim` `rows` rows along it (metadata only), then reconsolidate."""
    import zarr

    with beside_manifest():
        group = zarr.open_group(str(path), mode="r+")
        for _, array in group.arrays():
            dims = cast(list[str], array.attrs["_ARRAY_DIMENSIONS"])  # xarray's, a JSON list
            if dim in dims:
                shape = tuple(
                    rows if d == dim else s for d, s in zip(dims, array.shape, strict=True)
                )
                array.resize(shape)
        zarr.consolidate_metadata(str(path))
