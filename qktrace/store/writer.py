"""`BatchWriter`: a long run's results written into ONE store batch by batch, and resumed.

This module holds the writer's policy: which batches are held in memory and when they are
written. With ``write_every_s > 0`` (capture's) the writer holds batches and writes them together
in one step (one zarr write, one manifest commit), at most that often or when they exceed
``max_buffer_mib``, and on `BatchWriter.flush`. A kill that no Python code survives then loses
the batches held since the last write, and no more: the store is at that write, and the rerun
computes them again. An exception or Ctrl-C is no such kill: the caller flushes in ``finally``.

A write goes through three parts, one module each: the batch is made to fit the store
(`qktrace.store.batches`), its rows are written into the store's arrays
(`qktrace.store.arrays`), and the manifest commits them (`qktrace.store.manifest`, which also
says how a run resumes).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import xarray as xr

from qktrace.store.arrays import BatchArrays
from qktrace.store.batches import conform
from qktrace.store.files import FINAL
from qktrace.store.identity import jsonable
from qktrace.store.io import write_atomic
from qktrace.store.manifest import Manifest, new_manifest, record_files

__all__ = ["BatchWriter"]


class BatchWriter:
    """Append one Dataset per batch to ONE zarr store; resume an interrupted run where it stopped.

    The first batch creates the store's arrays, sized along `dim` to the run's planned total
    (``sizes[dim]``; without it they grow by doubling) and padded in the other dims to
    ``sizes`` (or the first batch's sizes); each later batch is written into its rows. The
    manifest records how many rows and batches are complete, with the size and CRC-32 of every
    file they are in, and is replaced atomically only after the batch's data is on disk: a crash
    at any point leaves the store at the last complete batch. Reopening the same `path` with the
    same parameters resumes: `n_done` says how many batches are stored, and the loop skips them.

    With ``write_every_s > 0`` the batches are held in memory and written together (one zarr
    write, one manifest commit): at most every `write_every_s` seconds (counted from the
    writer's creation, then from each write), as soon as the held ones take more than
    `max_buffer_mib`, and on `flush` (call it in a ``finally``, or use the writer as a context
    manager). A kill that no Python code survives (SIGKILL, the out-of-memory killer, power
    loss) then loses the held batches: at most `write_every_s` seconds or `max_buffer_mib` of
    them. The store reopens at the last complete write, and a resume recomputes the rest.

    Parameters
    ----------
    path : str or os.PathLike
        The store directory, conventionally ending in ``.zarr``. Created if missing.
    params : dict
        The run's parameters. Recorded when the store is created; reopening with different
        parameters raises ValueError, naming each differing key.
    dim : str, default "prompt"
        The dim batches are concatenated along. Every batch must have it.
    attrs : dict, optional
        The run's attrs, usually from `provenance`. Recorded when the store is created (with
        ``attrs["params"] = params``); on reopen they are kept from the first run, and
        ``study``, ``model``, ``revision`` and ``seed`` must agree where both runs give them.
    sizes : mapping of str to int, optional
        Planned sizes: ``sizes[dim]`` the run's total along `dim` (e.g. the number of prompts),
        any other dim the largest size a batch can have (e.g. the key width of the batch plan).
        Batches smaller in another dim are padded (see `qktrace.store.batches`); larger ones are
        refused. A dim not given takes the first batch's size.
    write_every_s : float, default 0
        Hold batches in memory and write them at most this often; 0 writes each batch in
        `append`. The arrays are chunked by the first batch's size either way.
    max_buffer_mib : float, default 16
        Write the held batches as soon as they take more than this much memory, so a big
        model's run holds at most about this much (twice it while writing) plus one batch.

    Attributes
    ----------
    path : pathlib.Path
    dim : str
    n_done : int
        Number of complete batches in the store (held batches not counted).
    n_held : int
        Number of batches held in memory, not yet written.
    rows : int
        Number of complete rows along `dim` (the batches' sizes summed).

    Examples
    --------
    >>> import tempfile, numpy as np, xarray as xr
    >>> from pathlib import Path
    >>> from qktrace import store
    >>> path = Path(tempfile.mkdtemp()) / "run.zarr"
    >>> batches = [np.arange(2.0), np.arange(3.0)]
    >>> w = store.BatchWriter(path, params={"n": 5}, sizes={"prompt": 5})
    >>> for i, b in enumerate(batches):
    ...     if i < w.n_done:  # skip batches stored by an earlier, interrupted run
    ...         continue
    ...     w.append(xr.Dataset({"x": ("prompt", b)}))
    >>> w.n_done, store.open(path).sizes["prompt"]
    (2, 5)
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        params: dict,
        dim: str = "prompt",
        attrs: dict | None = None,
        sizes: Mapping[str, int] | None = None,
        write_every_s: float = 0.0,
        max_buffer_mib: float = 16.0,
    ) -> None:
        self.path = Path(path)
        self.dim = dim
        self.write_every_s = float(write_every_s)
        self.max_buffer_bytes = int(max_buffer_mib * 2**20)
        self._held: list[xr.Dataset] = []
        self._held_bytes = 0
        self._last_write = time.monotonic()
        new = new_manifest(
            dim,
            jsonable(params),
            jsonable(dict(attrs or {})),
            {str(d): int(n) for d, n in (sizes or {}).items()},
        )
        self._manifest = Manifest.resume_or_create(self.path, new)
        self._arrays = BatchArrays(self.path, dim)
        self._first: xr.Dataset | None = None  # the stored run's schema: an empty slice of it

    def __repr__(self) -> str:
        return f"BatchWriter({str(self.path)!r}, dim={self.dim!r}, n_done={self.n_done})"

    def __enter__(self) -> BatchWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()

    @property
    def n_done(self) -> int:
        return self._manifest.n_batches

    @property
    def rows(self) -> int:
        return self._manifest.rows

    @property
    def n_held(self) -> int:
        return len(self._held)

    @property
    def _next(self) -> int:
        """The index of the next batch appended (for messages)."""
        return self.n_done + self.n_held

    def append(self, ds: xr.Dataset) -> None:
        """Add `ds` as the next batch; it counts in `n_done` only once complete on disk.

        Written here, or with ``write_every_s > 0`` held until a write is due (see the class
        docstring); it is checked against the store here either way.

        Parameters
        ----------
        ds : xarray.Dataset
            One batch. Must have the batch dim and the same variables, with the same dims, as
            the first batch, and the same labels along other dims that have an index
            coordinate. Variables without the batch dim are stored from the first batch only.

        Raises
        ------
        ValueError
            If `ds` lacks the batch dim, does not match the first batch, is larger than the
            planned `sizes` in another dim, or the run was already finalized.
        """
        self._check_appendable(ds)
        first = self.rows == 0 and not self._held
        ds = conform(
            ds,
            dim=self.dim,
            planned=self._manifest.data["sizes"],
            reference=None if first else self._reference(),
            index=self._next,
            path=self.path,
        )
        if first:  # the run's schema until the store has it
            self._first = ds.isel({self.dim: slice(0, 0)})
        self._held.append(ds)
        self._held_bytes += _memory(ds)
        due = time.monotonic() - self._last_write >= self.write_every_s
        if due or self._held_bytes > self.max_buffer_bytes:
            self.flush()

    def _check_appendable(self, ds: xr.Dataset) -> None:
        """Refuse a batch to a finalized run, or one without rows along the batch dim."""
        if self._manifest.data.get("finalized"):
            raise ValueError(
                f"{self.path} was finalized after {self.n_done} batches; appending more would "
                "make its final results stale. Write to a new path (e.g. a new --out), or delete "
                "the store to start over."
            )
        if self.dim not in ds.dims:
            raise ValueError(
                f"batch {self._next} has no {self.dim!r} dim (dims: {dict(ds.sizes)}); give it "
                f"one, e.g. ds.expand_dims({self.dim!r}), or create the BatchWriter with "
                "dim=<the batch dim>."
            )
        if not ds.sizes[self.dim]:
            raise ValueError(
                f"batch {self._next} has no rows along {self.dim!r}; append only batches "
                "with at least one (skip empty ones)."
            )

    def flush(self) -> None:
        """Write the held batches now, in one zarr write and one manifest commit."""
        held, self._held, self._held_bytes = self._held, [], 0
        if not held:
            return
        chunk_rows = held[0].sizes[self.dim]
        ds = held[0] if len(held) == 1 else _concat_batches(held, self.dim)
        if self.rows == 0:
            self._create(ds, chunk_rows=chunk_rows, n_batches=len(held))
        else:
            self._write_rows(ds, n_batches=len(held))
        self._last_write = time.monotonic()

    def finalize(self, extra: xr.Dataset | None = None) -> Path | None:
        """Mark the run complete and optionally store reduced results next to the batches.

        Arrays planned or grown beyond the complete rows are cut to them first, so the store
        then reads back whole with ``xarray.open_zarr`` too.

        Parameters
        ----------
        extra : xarray.Dataset, optional
            Reduced results of the whole run (e.g. summed covariances), written atomically to
            ``path / "final.zarr"`` with the run's attrs; read them with
            ``open(path, final=True)``. Replaces final results of an earlier call.

        Returns
        -------
        pathlib.Path or None
            The path of the final results, or None without `extra`.
        """
        self.flush()
        if self.rows and self._arrays.capacity() != self.rows:
            self._resize(self.rows)
        final_path = None
        if extra is not None:
            out = extra.copy()
            out.attrs = {**self._manifest.data["attrs"], **extra.attrs, "n_batches": self.n_done}
            final_path = self.path / FINAL
            write_atomic(out, final_path)
        self._manifest.commit(finalized=True)
        return final_path

    # ---------------------------------------------------------------------------- internals

    def _reference(self) -> xr.Dataset:
        """The stored run's variables, dims and labels (an empty slice along the batch dim)."""
        if self._first is None:
            stored = xr.open_zarr(self.path, chunks=None, consolidated=True)
            self._first = stored.isel({self.dim: slice(0, 0)}).load()
        return self._first

    def _create(self, ds: xr.Dataset, chunk_rows: int, n_batches: int) -> None:
        """Write the first batches as the store's arrays, sized for the whole run; commit.

        The arrays are chunked along the batch dim by `chunk_rows`, the first batch's size.
        """
        n = ds.sizes[self.dim]
        planned = self._manifest.data["sizes"]
        files = self._arrays.create(
            ds, self._manifest.data["attrs"], chunk_rows, planned.get(self.dim, n)
        )
        sizes = {**planned, **{d: s for d, s in ds.sizes.items() if d != self.dim}}
        self._first = None
        self._manifest.commit(
            rows=n, n_batches=n_batches, files=record_files(self.path, files), sizes=sizes
        )

    def _write_rows(self, ds: xr.Dataset, n_batches: int = 1) -> None:
        """Write `n_batches` later batches (`ds`, concatenated) after the complete rows; commit."""
        start, n = self.rows, ds.sizes[self.dim]
        capacity = self._arrays.capacity()
        grow = start + n > capacity
        rewritten = self._arrays.chunk_files(start, start + n)
        if grow:
            rewritten += self._arrays.metadata_files()
        self._manifest.forget(rewritten)  # a crash must not leave them recorded as they were
        if grow:
            self._arrays.resize(max(2 * capacity, start + n))
        self._arrays.write_rows(ds, start)
        self._manifest.record(rewritten, rows=start + n, n_batches=self.n_done + n_batches)

    def _resize(self, rows: int) -> None:
        """Give every array with the batch dim `rows` rows (metadata only); commit."""
        metadata = self._arrays.metadata_files()
        self._manifest.forget(metadata)
        self._arrays.resize(rows)
        self._manifest.record(metadata)


def _memory(ds: xr.Dataset) -> int:
    """Bytes `ds` holds, with the strings of object arrays (`nbytes` counts their pointers)."""
    strings = (
        sum(sys.getsizeof(x) for x in var.values.ravel())
        for var in ds.variables.values()
        if var.dtype == object
    )
    return int(ds.nbytes) + sum(strings)


def _concat_batches(batches: list[xr.Dataset], dim: str) -> xr.Dataset:
    """Conformed batches as one Dataset along `dim`; variables without it from the first."""
    return xr.concat(
        batches, dim=dim, data_vars="minimal", coords="minimal", compat="override", join="exact"
    )
