"""Labeled results on disk: xarray Datasets in zarr stores, written so a crash never corrupts them.

Every qktrace result is an `xarray.Dataset` (named dims, coordinates, provenance in `attrs`).
The `qktrace.store` package is the only place that writes or reads them. The public API is four names:

- `provenance(...)` builds the `attrs` every store carries: qktrace/nnsight/torch/transformers
  versions, study name and parameters, model id and revision, local/remote mode, seed, UTC date.
- `save(ds, path)` writes one whole Dataset.
- `BatchWriter(path, params=...)` appends one Dataset per batch for long runs, and resumes them.
- `open(path)` reads either kind back lazily (dask-backed), so slicing loads only what is used.

Layout on disk
--------------
`save` writes a plain zarr store (zarr format 2, consolidated metadata), readable without
qktrace by ``xarray.open_zarr(path)``. Format 2 because it stores fixed-length and
variable-length strings (token strings, category names) natively and its consolidated metadata is
part of the spec; zarr format 3 still marks both as unstable extensions.

A `BatchWriter` store is ONE zarr store (one group, format 2, consolidated metadata) that the
batches are written into along the batch dim, plus a manifest::

    run.zarr/
      qktrace_batches.json     manifest: dim, params, attrs, planned sizes, complete rows and
                               batches, every file with its size and CRC-32 (replaced atomically)
      .zgroup .zattrs .zmetadata   the zarr group
      q/ k/ prompt/ ...        one array per variable, chunked along the batch dim by batch
      final.zarr/              optional reduced results from `BatchWriter.finalize`

The first batch creates the arrays, sized along the batch dim to the planned total (without one
they grow by doubling) and in the other dims to the planned maximum (``sizes=``; capture passes
its batch plan's widths) or the first batch's size; later batches are region writes into their
rows. A batch smaller in another dim is padded: floats with NaN, strings with ``""``, booleans
with ``False``, datetimes with NaT (an int variable padded in the first batch becomes float, as
in `xarray.concat`). So `open` reads one group and a fixed set of metadata files however many batches there
are. Stores of the first layout (one zarr store ``batch-NNNNNN.zarr`` per batch, manifest
version 1) still open, at one store per batch; runs do not resume into them.

Integrity
---------
zarr reads a missing chunk as the fill value by design, so every store qktrace writes records
what it held when finished (its files, with their sizes and CRC-32s), and `open` compares the
store with that record: a missing or changed piece raises `StoreDamagedError`, naming the
store, the variable and the command that rewrites it (`qktrace.store.integrity`).

What is atomic
--------------
Each store `save` writes (and the final results) is first written in full to a temporary
sibling directory and then renamed to its real name. Renaming a directory within one file system
is atomic, so a reader sees either no store or a complete one, never a half-written one. When
`save(..., overwrite=True)` replaces an existing store, the old one is moved aside only after the
new one is complete, the new one is renamed in, and the old one is deleted.

How resume works
----------------
A `BatchWriter` batch counts once the manifest, replaced by a rename after the batch's rows are
on disk, says so; a crash at any point (SIGKILL included) leaves the store at the last complete
batch, and the rerun writes the interrupted one again (`qktrace.store.manifest`). A writer with
``write_every_s > 0`` holds batches in memory and writes them together; a kill that no Python
code survives loses those held since the last write, and no more (`qktrace.store.writer`).

Limits
------
- One writer per store at a time; two processes appending to the same path can collide (the
  CLI's runs hold a lock on their output, see `qktrace.store.locks`). A successful write deletes the
  ``.<name>.tmp-*`` / ``.<name>.old-*`` copies that killed writers left beside it.
- Atomic against process crashes (exceptions, kill, out of memory). Data is not fsync'ed, so an
  operating-system crash or power loss on some file systems can still lose the latest writes.
- A crash in the instant between the two renames of an overwrite leaves the old store at
  ``.<name>.old-*`` next to `path` (the error from `open` names it).
- A `BatchWriter` manifest lists every file, so it grows with the batches (about 40 bytes per
  variable and batch) and is rewritten after each batch; `open` stats each listed file.
- Variables without the batch dim (e.g. head labels) are stored from the first batch; batches
  must have the same labels along the other dims with an index coordinate.

Where each part is
------------------
- `qktrace.store.io` (this module): `save`, `open`, and `write_atomic`, which both writers use.
- `qktrace.store.files`: a store's file names, what kind of store a folder is, and the copies
  killed writers leave beside it.
- `qktrace.store.identity`: `provenance`, and `check_same_run` (is a stored result this run's?).
- `qktrace.store.integrity`: the integrity record, `verify`, `StoreDamagedError`, `rewritten_by`.
- `qktrace.store.reading`: one zarr store read as it was recorded (`StoreReplacedError`).
- `qktrace.store.writer`: `BatchWriter`, which holds batches and decides when to write them;
  it makes each batch fit the store (`qktrace.store.batches`), writes it into the store's arrays
  (`qktrace.store.arrays`) and commits it in the manifest (`qktrace.store.manifest`).
- `qktrace.store.legacy`: stores of the first BatchWriter layout, read only.
- `qktrace.store.locks`: one writer per store.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
from collections.abc import Hashable, Mapping
from pathlib import Path

import xarray as xr

from qktrace.core import checks
from qktrace.store.files import (
    FINAL,
    MANIFEST,
    ZARR_FORMAT,
    copy_path,
    exists_not_empty,
    is_copy_of,
    remove_copy,
    store_kind,
)
from qktrace.store.identity import jsonable
from qktrace.store.integrity import record_integrity
from qktrace.store.legacy import open_legacy_batches
from qktrace.store.manifest import BATCHES_VERSION, read_manifest
from qktrace.store.reading import open_zarr

__all__ = ["save", "open"]


def save(
    ds: xr.Dataset,
    path: str | os.PathLike,
    *,
    attrs: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a whole Dataset to a zarr store at `path`, atomically.

    The store is written to a temporary sibling directory and renamed into place once complete,
    so a crash never leaves a half-written store at `path` and never destroys an existing one.

    Parameters
    ----------
    ds : xarray.Dataset
        The result. String coordinates (token strings, category names) are kept. Dask-backed
        data is computed while writing; uneven dask chunks are evened out first.
    path : str or os.PathLike
        Where to write, conventionally ending in ``.zarr``. Parent directories are created.
    attrs : dict, optional
        Extra attrs, merged over ``ds.attrs`` (e.g. from `provenance`). All attrs are
        converted to JSON-compatible values.
    overwrite : bool, default False
        Replace an existing store at `path`. Only a zarr or qktrace store (or an empty
        directory) is ever replaced.

    Returns
    -------
    pathlib.Path
        `path`.

    Raises
    ------
    FileExistsError
        If `path` exists and `overwrite` is False, or `path` exists and is not a store.

    Examples
    --------
    >>> import tempfile, numpy as np, xarray as xr
    >>> from pathlib import Path
    >>> from qktrace import store
    >>> path = Path(tempfile.mkdtemp()) / "scores.zarr"
    >>> ds = xr.Dataset({"score": ("head", np.array([0.5, 0.9]))}, coords={"head": [3, 7]})
    >>> store.save(ds, path, attrs=store.provenance("demo", {"layer": 2})).name
    'scores.zarr'
    >>> float(store.open(path).score.sel(head=7))
    0.9
    """
    checks.dataset("ds", ds, "an xarray.Dataset to store")
    path = Path(checks.path("path", path))
    checks.flag("overwrite", overwrite)
    if attrs is not None and not isinstance(attrs, Mapping):
        raise checks.BadArgumentType(f"attrs={attrs!r} is not a dict; pass a dict or None.")
    if path.is_symlink() and not path.exists():
        raise FileExistsError(
            f"{path} is a symbolic link to {os.readlink(path)}, which does not exist; remove the "
            "link, or make it point to a folder, and write again."
        )
    if path.is_symlink() and overwrite:  # replace the store the link points to; keep the link
        path = Path(os.path.realpath(path))
    if exists_not_empty(path):
        if not overwrite:
            raise FileExistsError(
                f"{path} already exists; pass overwrite=True to replace it, or choose a new path."
            )
        if store_kind(path) is None:
            raise FileExistsError(
                f"{path} exists and is not a zarr or qktrace store, so it is not replaced even "
                "with overwrite=True; choose another path or remove it yourself."
            )
    out = ds.copy()
    out.attrs = {**ds.attrs, **(attrs or {})}
    write_atomic(out, path)
    return path


def open(path: str | os.PathLike, *, final: bool = False, checksums: bool = False) -> xr.Dataset:
    """Open a store lazily: variables are dask arrays, loaded only when sliced and computed.

    A store written by qktrace is first checked against the record of what it held when
    written (see "Integrity" in the module docstring): a missing variable folder or chunk, or a
    chunk of another size (empty, truncated), raises `StoreDamagedError` instead of reading
    back as fill values.

    Parameters
    ----------
    path : str or os.PathLike
        A store written by `save` (any zarr store opens) or by `BatchWriter`.
    final : bool, default False
        For a `BatchWriter` store, open the reduced results written by
        `BatchWriter.finalize` instead of the batches.
    checksums : bool, default False
        Also compare every file's CRC-32 with the record (reads the whole store once; what
        `qktrace show` and the reuse of a stored result do).

    Returns
    -------
    xarray.Dataset
        For a `BatchWriter` store, all complete batches concatenated along its batch dim
        (padded where other dims differ in size, see the module docstring), with the run's
        attrs (from `provenance`) and ``attrs["batch_dim"]``.

    Raises
    ------
    FileNotFoundError
        If nothing is at `path`, or `final` is True but the run has no final results.
    ValueError
        If `path` is not a store, or a `BatchWriter` store holds no complete batch yet.
    StoreDamagedError
        (a ValueError) If a piece the store recorded is missing or changed; the message names
        the store, the variable and the command that rewrites it.

    Examples
    --------
    >>> import tempfile, numpy as np, xarray as xr
    >>> from pathlib import Path
    >>> from qktrace import store
    >>> path = Path(tempfile.mkdtemp()) / "x.zarr"
    >>> _ = store.save(xr.Dataset({"x": ("prompt", np.arange(3.0))}), path)
    >>> ds = store.open(path)
    >>> type(ds.x.data).__name__, float(ds.x.sum())
    ('Array', 3.0)
    """
    path = Path(checks.path("path", path))
    checks.flag("final", final)
    checks.flag("checksums", checksums)
    kind = store_kind(path)
    if kind is None:
        raise _not_a_store(path)
    if kind == "batches":
        if final:
            final_path = path / FINAL
            if not final_path.exists():
                raise FileNotFoundError(
                    f"{path} has no final results ({final_path} is missing): "
                    "call BatchWriter.finalize(extra) with the reduced Dataset, or open the "
                    "batches with open(path)."
                )
            return open_zarr(final_path, checksums)
        return _open_batches(path, checksums)
    if final:
        raise ValueError(
            f"{path} is a single store written by save(), not a BatchWriter store, so it has no "
            "final results; call open(path) without final=True."
        )
    return open_zarr(path, checksums)


def _not_a_store(path: Path) -> Exception:
    if not path.exists():
        backups = sorted(path.parent.glob(f".{path.name}.old-*")) if path.parent.is_dir() else []
        hint = (
            f" A previous version survives at {backups[-1]} (an overwrite was interrupted); "
            f"rename it to {path.name} to restore it."
            if backups
            else ""
        )
        return FileNotFoundError(
            f"no qktrace store at {path}: check the path (results are written there by "
            f"qktrace.store.save or BatchWriter, e.g. by a study's --out).{hint}"
        )
    what = "a file" if path.is_file() else "a directory without zarr metadata"
    return ValueError(
        f"{path} is {what}, not a qktrace store (expected a zarr store written by save(), or a "
        f"BatchWriter directory with {MANIFEST}); pass the path of the .zarr store itself."
    )


def _open_batches(path: Path, checksums: bool = False) -> xr.Dataset:
    """A BatchWriter store: its one zarr group, cut to the complete rows (O(1) in batches)."""
    manifest = read_manifest(path)
    if manifest.get("version", 1) < BATCHES_VERSION:
        return open_legacy_batches(path, checksums)
    dim, rows = manifest["dim"], manifest["rows"]
    if not rows:
        raise ValueError(
            f"{path} holds no complete batch yet; run the study (or let it finish its first "
            "batch) before opening it."
        )
    ds = open_zarr(path, checksums, record=manifest)
    if ds.sizes[dim] != rows:  # planned or grown beyond the complete rows
        ds = ds.isel({dim: slice(0, rows)})
    ds.attrs.update(manifest["attrs"])
    ds.attrs["batch_dim"] = dim
    return ds


def write_atomic(ds: xr.Dataset, path: Path) -> None:
    """Write `ds` to a temporary sibling of `path`, then rename it to `path`.

    An existing store at `path` is moved aside only after the new one is complete.
    """
    out = ds.drop_encoding()
    out.attrs = jsonable(out.attrs)
    for var in out.variables.values():
        var.attrs = jsonable(var.attrs)
    out = _even_chunks(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = copy_path(path, "tmp")
    try:
        out.to_zarr(tmp, mode="w-", zarr_format=ZARR_FORMAT, consolidated=True)
        record_integrity(tmp, out.attrs)
        if (path.exists() or path.is_symlink()) and _exchange(tmp, path):
            remove_copy(tmp)  # the old store, swapped out in one step: no moment without one
        elif path.exists() or path.is_symlink():
            old = copy_path(path, "old")
            os.rename(path, old)
            try:
                os.rename(tmp, path)
            except BaseException:
                os.rename(old, path)
                raise
            remove_copy(old)
        else:
            os.rename(tmp, path)
        # `path` is complete: copies left beside it by killed writers are obsolete
        for leftover in path.parent.glob(f".{glob.escape(path.name)}.*-*"):
            if is_copy_of(leftover.name, path.name):
                remove_copy(leftover)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap the names `a` and `b` atomically (Linux renameat2 RENAME_EXCHANGE); False where
    the system or file system cannot, so the caller falls back to two renames."""
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _even_chunks(ds: xr.Dataset) -> xr.Dataset:
    """Rechunk dims whose dask chunks are uneven (zarr needs equal chunks but the last)."""
    uneven: dict[Hashable, int] = {}
    for var in ds.variables.values():
        if var.chunks is None:
            continue
        for dim, sizes in zip(var.dims, var.chunks, strict=True):
            if len(sizes) > 1 and (len(set(sizes[:-1])) > 1 or sizes[-1] > sizes[0]):
                uneven[dim] = max(uneven.get(dim, 0), *sizes)
    return ds.chunk(uneven) if uneven else ds
