"""Labeled results on disk: xarray Datasets in zarr stores, written so a crash never corrupts them.

Every qktrace result is an `xarray.Dataset` (named dims, coordinates, provenance in `attrs`).
This module is the only place that writes or reads them. The public API is four names:

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
zarr reads a missing chunk as the fill value by design, so a store with a deleted variable
folder or chunk would read back as NaN or 0 without a word. Every store `save` writes (and the
final store of a `BatchWriter`) therefore records, in ``qktrace_integrity.json`` inside it, what
it held when finished: its variables with their shapes and chunk counts, and every file with
its size and CRC-32. A `BatchWriter` store records its files (size and CRC-32) in its manifest,
with each batch. `open` compares the sizes with the record (one ``stat`` per file) and
raises `StoreDamagedError` naming the store, the variable and the command that rewrites it;
``open(path, checksums=True)`` also compares the CRC-32s (one read of the whole store), as
`qktrace show` and the reuse of stored results (a resumed sums checkpoint, lexical's
order_id.zarr) do. The command is the CLI command that wrote the store (recorded through
`rewritten_by`), else a hint from its provenance attrs.

What is atomic
--------------
Each store `save` writes (and the final results) is first written in full to a temporary
sibling directory and then renamed to its real name. Renaming a directory within one file system
is atomic, so a reader sees either no store or a complete one, never a half-written one. When
`save(..., overwrite=True)` replaces an existing store, the old one is moved aside only after the
new one is complete, the new one is renamed in, and the old one is deleted.

How resume works
----------------
A `BatchWriter` batch counts once the manifest says so: the manifest (the number of complete
rows and batches, and the size and CRC-32 of every file holding them) is replaced by a rename
only after the batch's rows are on disk. A crash at any point (SIGKILL included) leaves the
store at the last complete batch: `open` reads only the complete rows, and the rerun writes the
interrupted batch again over whatever it left (zarr writes each chunk file atomically). A
recorded file about to be rewritten (the chunk a batch shares with the previous one, the array
metadata when the arrays grow) is first dropped from the record in a manifest replaced before
the write, so a crash never leaves it recorded as it was. Nothing is duplicated (rows have fixed
places) and nothing is lost (a batch counts only once committed). Reopening with different
parameters is refused: two settings mixed in one store would be silent corruption.

A writer with ``write_every_s > 0`` (capture's) holds batches in memory and writes them together
in one such step (one zarr write, one manifest commit), at most that often or when they exceed
``max_buffer_mib``, and on `BatchWriter.flush`. A kill that no Python code survives then loses
the batches held since the last write, and no more: the store is at that write, and the rerun
computes them again. An exception or Ctrl-C is no such kill: the caller flushes in ``finally``.

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
"""

from __future__ import annotations

import datetime as _dt
import enum
import glob
import itertools
import json
import math
import os
import re
import shutil
import sys
import time
import uuid
import warnings
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from stat import S_ISREG
from typing import Any

import numpy as np
import xarray as xr
from zarr.storage import LocalStore

from qktrace.core import checks
from qktrace.core.errors import StoreError
from qktrace.core.version import __version__

__all__ = [
    "provenance",
    "save",
    "open",
    "BatchWriter",
    "StoreDamagedError",
    "rewritten_by",
    "check_same_run",
    "DifferentRunError",
    "StoreReplacedError",
]

MANIFEST = "qktrace_batches.json"
# what a finished zarr store holds: every file with its size and CRC-32 (see "Integrity")
INTEGRITY = "qktrace_integrity.json"
FINAL = "final.zarr"
_BATCH_RE = re.compile(r"^batch-(\d+)\.zarr$")
_TMP_RE = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]{8}$")
# the command that (re)writes the stores written now; set by the CLI around a run
_COMMAND: ContextVar[str | None] = ContextVar("qktrace_store_command", default=None)
_ZARR_FORMAT = 2
# manifest version of a BatchWriter store: 1 = one zarr store per batch (read only), 2 = one store
_BATCHES_VERSION = 2
# layout version of the integrity record `qktrace_integrity.json`
_INTEGRITY_VERSION = 1
_REMOTE_MODES = {False: "local", "local": "remote-local", True: "ndif"}
# attrs that identify a run: a resumed run must agree on them (when both runs give them)
_IDENTITY_ATTRS = ("verb", "study", "model", "revision", "dtype", "seed")
# the keys of `provenance`, present (maybe None) in the attrs of every result
PROVENANCE_KEYS = (
    "qktrace_version", "nnsight_version", "torch_version", "transformers_version", "verb",
    "study", "params", "model", "revision", "dtype", "remote", "d_head", "seed", "date",
)  # fmt: skip


# --------------------------------------------------------------------------------------------
# provenance


def provenance(
    verb: str,
    params: Mapping[str, Any],
    *,
    model: Any = None,
    study: str | None = None,
    revision: str | None = None,
    remote: bool | str | None = None,
    seed: int | None = None,
    inputs: Mapping[str, Any] | None = None,
) -> dict:
    """The provenance attrs every qktrace result carries: how it was made, read back from disk.

    Every verb (`capture`, `reduce`, `decompose`, `find_heads`, `intervene`, ...), the study
    pipeline and the toy attach these same keys (`PROVENANCE_KEYS`), so any result a researcher
    loads says which model, mode, versions, parameters and seed made it.

    Parameters
    ----------
    verb : str
        What made the result: a verb (``"capture"``), ``"study"`` or ``"toy"``.
    params : dict
        Its parameters. Converted to JSON-compatible values (nested dicts, lists and tuples,
        `Path`, numpy scalars and arrays), so zarr can store them.
    model : qktrace Model or str, optional
        The `qktrace.load`-ed model (gives id, revision, dtype, remote mode and d_head), or a
        model id.
    study : str, optional
        The study's name, when a study made it (``"filter_heads"``, ``"toy"``).
    revision, remote
        Override the model's revision and remote mode: ``False`` -> ``"local"``, ``"local"``
        (nnsight's simulation of the NDIF path) -> ``"remote-local"``, ``True`` -> ``"ndif"``.
    seed : int, optional
        Random seed of the run, where it has one.
    inputs : dict, optional
        The attrs of the result this one is computed from (e.g. `decompose`'s sums): the model
        facts come from it when `model` is not given, and ``params["input"]`` records its verb
        and parameters.

    Returns
    -------
    dict
        Keys `PROVENANCE_KEYS`: ``qktrace_version``, ``nnsight_version``, ``torch_version``,
        ``transformers_version``, ``verb``, ``study``, ``params``, ``model``, ``revision``,
        ``dtype``, ``remote``, ``d_head``, ``seed``, ``date`` (UTC, ISO 8601). What is unknown
        (a package not installed, no model) is ``None``.

    Examples
    --------
    >>> from pathlib import Path
    >>> from qktrace.store import provenance
    >>> p = provenance("toy", {"layers": (0, 1), "out": Path("a.zarr")}, remote="local", seed=0)
    >>> p["verb"], p["params"], p["remote"], p["seed"]
    ('toy', {'layers': [0, 1], 'out': 'a.zarr'}, 'remote-local', 0)
    """
    facts: dict[str, Any] = dict.fromkeys(("model", "revision", "dtype", "remote", "d_head"))
    params = dict(params)
    if inputs is not None:
        facts.update({k: inputs.get(k) for k in facts})
        if seed is None:
            seed = inputs.get("seed")
        if inputs.get("verb") is not None:
            params["input"] = {"verb": inputs.get("verb"), "params": inputs.get("params")}
    if isinstance(model, str):
        facts["model"] = model
    elif model is not None:
        facts.update(
            model=model.name,
            revision=model.revision,
            dtype=_model_dtype(model),
            remote=_remote_mode(model.remote),
            d_head=int(model.d_head),
        )
    if revision is not None:
        facts["revision"] = revision
    if remote is not None or facts["remote"] is None:
        facts["remote"] = _remote_mode(bool(remote) if remote is None else remote)
    return {
        "qktrace_version": __version__,
        "nnsight_version": _version("nnsight"),
        "torch_version": _version("torch"),
        "transformers_version": _version("transformers"),
        "verb": verb,
        "study": study,
        "params": _jsonable(params),
        **facts,
        "seed": None if seed is None else int(seed),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def _remote_mode(remote: Any) -> str:
    """The stored label of an nnsight ``remote`` argument."""
    mode = _REMOTE_MODES.get(remote) if isinstance(remote, (bool, str)) else None
    if mode is None:
        raise ValueError(
            f"remote={remote!r} is not a remote mode; pass False (local), 'local' "
            "(nnsight's simulation of NDIF) or True (NDIF)."
        )
    return mode


def _model_dtype(model: Any) -> str | None:
    """The dtype of the model's weights, e.g. ``"bfloat16"`` (None when it has none to read)."""
    try:
        return str(next(model.lm.parameters()).dtype).removeprefix("torch.")
    except (AttributeError, StopIteration, TypeError):
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _jsonable(value: Any) -> Any:
    """`value` as JSON-compatible data: dicts with str keys, lists, str, int, float, bool, None.

    Numpy scalars and arrays become Python numbers and lists, paths and enums their string or
    value, dates ISO strings, sets sorted lists; anything else its ``str()``.
    """
    if isinstance(value, np.generic):
        return _jsonable(value.item())
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted((_jsonable(v) for v in value), key=repr)
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, enum.Enum):
        return _jsonable(value.value)
    if isinstance(value, (_dt.date, _dt.time)):
        return value.isoformat()
    return str(value)


# --------------------------------------------------------------------------------------------
# save / open


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
    if _exists_not_empty(path):
        if not overwrite:
            raise FileExistsError(
                f"{path} already exists; pass overwrite=True to replace it, or choose a new path."
            )
        if _kind(path) is None:
            raise FileExistsError(
                f"{path} exists and is not a zarr or qktrace store, so it is not replaced even "
                "with overwrite=True; choose another path or remove it yourself."
            )
    out = ds.copy()
    out.attrs = {**ds.attrs, **(attrs or {})}
    _write_atomic(out, path)
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
    kind = _kind(path)
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
            return _open_zarr(final_path, checksums)
        return _open_batches(path, checksums)
    if final:
        raise ValueError(
            f"{path} is a single store written by save(), not a BatchWriter store, so it has no "
            "final results; call open(path) without final=True."
        )
    return _open_zarr(path, checksums)


def _exists_not_empty(path: Path) -> bool:
    """True if something other than an empty directory is at `path`."""
    if path.is_dir() and not path.is_symlink():
        return any(path.iterdir())
    return path.exists() or path.is_symlink()


def is_store(path: str | os.PathLike) -> bool:
    """Whether `path` is a store `open` reads (a zarr store or a BatchWriter directory)."""
    return _kind(Path(path)) is not None


def _kind(path: Path) -> str | None:
    """'batches' for a BatchWriter store, 'zarr' for a zarr store, None otherwise."""
    if not path.is_dir():
        return None
    if (path / MANIFEST).is_file():
        return "batches"
    if (path / ".zgroup").is_file() or (path / "zarr.json").is_file():
        return "zarr"
    return None


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


def _open_zarr(
    path: Path, checksums: bool = False, record: Mapping[str, Any] | None = None
) -> xr.Dataset:
    record = _verify(path, checksums, record)
    _check_declared_sizes(path)
    for attempt in (1, 2):  # a writer replacing the store between the record and the metadata
        try:
            return xr.open_zarr(_zarr_store(path, record), chunks={})
        except StoreReplacedError:
            if attempt == 2:
                raise
            record = _verify(path, checksums, None if record is None else _reread(path, record))
        except (OSError, ValueError, KeyError, TypeError) as err:  # damaged metadata
            raise ValueError(
                f"cannot read the zarr store at {path} ({type(err).__name__}: {err}); its "
                "metadata is damaged or incomplete (e.g. a copy that was cut short). Rerun the "
                "command that wrote it, or restore it from a backup."
            ) from err
    raise AssertionError("unreachable")


# what a store's metadata may declare: more is refused before anything is read (a few hundred
# bytes of metadata can declare terabytes, read back as fill values)
MAX_ARRAY_BYTES = 2**40  # one variable, whole (1 TiB)
MAX_CHUNK_BYTES = 2**31  # one chunk, what one read allocates (blosc's limit too)
MAX_INDEX_LENGTH = 2**27  # a dimension coordinate, which xarray reads whole when it opens


def _check_declared_sizes(path: Path) -> None:
    """Refuse a store whose metadata declares arrays no real store holds (absurd shapes)."""
    if not (path / ".zmetadata").is_file():
        return
    metadata = _read_json(path, ".zmetadata")
    arrays = metadata.get("metadata") if isinstance(metadata, dict) else None
    if not isinstance(arrays, dict):
        raise _malformed(path, ".zmetadata", None, 'it has no "metadata" mapping')
    for key, meta in arrays.items():
        name, _, leaf = str(key).rpartition("/")
        if leaf != ".zarray":
            continue
        shape, chunks = (
            meta.get(k) if isinstance(meta, dict) else None for k in ("shape", "chunks")
        )
        try:
            itemsize = np.dtype(meta["dtype"]).itemsize or 1
        except (KeyError, TypeError, ValueError):
            itemsize = 8  # object and structured dtypes: judged by a pointer's size
        valid = (
            isinstance(shape, list)
            and isinstance(chunks, list)
            and len(shape) == len(chunks)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
            and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in chunks)
        )
        if not valid:
            raise _malformed(path, ".zmetadata", None,
                             f"variable {name!r} has shape {_short(shape)} and chunks {_short(chunks)}")  # fmt: skip
        total, chunk = math.prod(shape) * itemsize, math.prod(chunks) * itemsize
        dims = (arrays.get(f"{name}/.zattrs") or {}).get("_ARRAY_DIMENSIONS") or []
        index = len(shape) == 1 and dims == [name]
        if (
            total > MAX_ARRAY_BYTES
            or chunk > MAX_CHUNK_BYTES
            or (index and shape[0] > MAX_INDEX_LENGTH)
        ):
            raise StoreDamagedError(
                f"{path} declares what no store holds: variable {name!r} has shape {shape} "
                f"({total / 2**30:.3g} GiB, chunks of {chunk / 2**30:.3g} GiB) in metadata of "
                f"{(path / '.zmetadata').stat().st_size} bytes; reading it would allocate that "
                "much, so it is refused. Its metadata is damaged or forged: rewrite the store "
                "with the command that wrote it, or restore it from a backup."
            )


def _reread(path: Path, record: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The record of `path` read again: its manifest (a batch store's) or its integrity file."""
    if record.get("format") == "qktrace-batches":
        return _read_manifest(path)
    return None


def _zarr_store(path: Path, record: Mapping[str, Any] | None) -> Any:
    """What xarray reads `path` through: every file checked against `record` as it is read."""
    if record is None:  # written by another tool or an older qktrace: nothing to check against
        return path
    return _VerifiedStore(path, record["files"], record.get("format") != "qktrace-batches")


class _VerifiedStore(LocalStore):
    """A read-only zarr store whose every file read must match its record (size, CRC-32).

    So a reader sees the store it opened, whole, or gets `StoreReplacedError`: a writer that
    replaced the store (``--overwrite``) after it was opened, or a file deleted or changed
    since, never reads back as a mix of two stores or as fill values.
    """

    def __init__(self, root: Path, files: Mapping[str, Any], complete: bool) -> None:
        super().__init__(root, read_only=True)
        self.files = dict(files)
        self.complete = complete  # the record lists every file (a BatchWriter's: committed)

    async def get(self, key: str, prototype: Any = None, byte_range: Any = None) -> Any:
        found = await super().get(key, prototype, byte_range)
        expected = self.files.get(key)
        if expected is None:
            if found is not None and self.complete:
                raise _replaced(self.root, key, "is not in the store's record")
            return found
        if found is None:
            raise _replaced(self.root, key, "is missing")
        if byte_range is None:
            data = found.to_bytes()
            if len(data) != expected[0] or zlib.crc32(data) != expected[1]:
                raise _replaced(self.root, key, "differs from when the store was opened")
        return found


class StoreReplacedError(StoreError):
    """A store changed while it was read: another run replaced it, or a file was edited."""


def _replaced(root: Any, key: str, what: str) -> StoreReplacedError:
    return StoreReplacedError(
        f"{root} changed while it was being read: its file {key} {what} (another run replaced "
        "the store, e.g. with --overwrite, or it was edited). Nothing mixed was returned; open "
        "it again (qktrace.open, or rerun qktrace show) to read the store that is there now."
    )


def _open_batches(path: Path, checksums: bool = False) -> xr.Dataset:
    """A BatchWriter store: its one zarr group, cut to the complete rows (O(1) in batches)."""
    manifest = _read_manifest(path)
    if manifest.get("version", 1) < _BATCHES_VERSION:
        return _open_legacy_batches(path, checksums)
    dim, rows = manifest["dim"], manifest["rows"]
    if not rows:
        raise ValueError(
            f"{path} holds no complete batch yet; run the study (or let it finish its first "
            "batch) before opening it."
        )
    ds = _open_zarr(path, checksums, record=manifest)
    if ds.sizes[dim] != rows:  # planned or grown beyond the complete rows
        ds = ds.isel({dim: slice(0, rows)})
    ds.attrs.update(manifest["attrs"])
    ds.attrs["batch_dim"] = dim
    return ds


def _write_atomic(ds: xr.Dataset, path: Path) -> None:
    """Write `ds` to a temporary sibling of `path`, then rename it to `path`.

    An existing store at `path` is moved aside only after the new one is complete.
    """
    out = ds.drop_encoding()
    out.attrs = _jsonable(out.attrs)
    for var in out.variables.values():
        var.attrs = _jsonable(var.attrs)
    out = _even_chunks(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        out.to_zarr(tmp, mode="w-", zarr_format=_ZARR_FORMAT, consolidated=True)
        _record_integrity(tmp, out.attrs)
        if (path.exists() or path.is_symlink()) and _exchange(tmp, path):
            remove_copy(tmp)  # the old store, swapped out in one step: no moment without one
        elif path.exists() or path.is_symlink():
            old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
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


# --------------------------------------------------------------------------------------------
# integrity


class StoreDamagedError(StoreError):
    """A store lacks a piece it held when written, or holds a changed copy of one."""


class StoreIntegrityWarning(UserWarning):
    """A store qktrace wrote before it recorded stores' files opens unchecked."""


# the first day qktrace wrote an integrity record in every store it saved
_RECORDED_SINCE = "2026-11-27"


def _is_metadata(rel: str) -> bool:
    """Whether a store's file is zarr metadata (small; its CRC-32 is checked on every open)."""
    return rel.rpartition("/")[2] in (".zmetadata", ".zattrs", ".zarray", ".zgroup", "zarr.json")


def _check_unrecorded(root: Path) -> None:
    """A store without an integrity record: refused if its attrs say qktrace wrote it since
    every store has one (the record was deleted), else opened with a warning if qktrace wrote
    it earlier; stores of other tools open as they are."""
    try:
        attrs = json.loads((root / ".zattrs").read_text()) if (root / ".zattrs").is_file() else {}
    except (OSError, ValueError):
        return  # damaged metadata: the zarr reader names it
    if not isinstance(attrs, dict) or "qktrace_version" not in attrs:
        return
    date = str(attrs.get("date") or "")
    what = (
        f"{root} was written by qktrace {_short(attrs['qktrace_version'], 20)} on "
        f"{date[:10] or 'an unknown date'}, but has no {INTEGRITY}"
    )
    if date[:10] >= _RECORDED_SINCE:
        raise StoreDamagedError(
            f"{what}, which qktrace writes in every store since {_RECORDED_SINCE}: the record "
            "was deleted, so missing pieces could not be told from data and it is refused. "
            f"Rewrite it with: {_rewrite_hint(attrs)}"
        )
    warnings.warn(
        f"{what} (older qktrace wrote none): it opens unchecked, so a missing chunk would read "
        "as fill values (NaN or 0). Rewrite it (qktrace.save(qktrace.open(old), new)) to add one.",
        StoreIntegrityWarning,
        stacklevel=4,
    )


@contextmanager
def rewritten_by(command: str) -> Iterator[None]:
    """Record `command` as the way to rewrite the stores written inside this block.

    A damaged store's `StoreDamagedError` then quotes it; the CLI wraps each run in it.
    """
    token = _COMMAND.set(command)
    try:
        yield
    finally:
        _COMMAND.reset(token)


def _record_integrity(root: Path, attrs: Mapping[str, Any]) -> None:
    """Write `INTEGRITY` in the finished zarr store `root`: its variables and every file."""
    files: dict[str, list[int]] = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and p.name != INTEGRITY:
            data = p.read_bytes()
            files[p.relative_to(root).as_posix()] = [len(data), zlib.crc32(data)]
    variables = {}
    for rel in files:
        if rel.endswith("/.zarray"):
            name = rel.rsplit("/", 1)[0]
            chunks = [f for f in files if f.startswith(name + "/") and "/." not in f]
            shape = json.loads((root / rel).read_text())["shape"]
            variables[name] = {"shape": shape, "chunks": len(chunks)}
    record = {
        "format": "qktrace-integrity",
        "version": _INTEGRITY_VERSION,
        "command": _COMMAND.get() or _rewrite_hint(attrs),
        "variables": variables,
        "files": files,
    }
    (root / INTEGRITY).write_text(json.dumps(record, indent=1) + "\n")


def _rewrite_hint(attrs: Mapping[str, Any]) -> str:
    """How to rewrite a store written outside the CLI, from its provenance attrs."""
    study = attrs.get("study")
    if study == "toy":
        return "qktrace toy -o <its folder> --overwrite (with the options it was run with)"
    if isinstance(study, str):
        return (
            f"qktrace study {study.replace('_', '-')} -o <its folder> --overwrite (with the "
            "options in its attrs['params']), or the call that wrote it with overwrite=True"
        )
    verb = attrs.get("verb")
    if isinstance(verb, str):
        return f"the call that wrote it (qktrace.{verb}, with attrs['params']), with overwrite=True"
    return "the call that wrote it, with overwrite=True"


def _verify(
    root: Path, checksums: bool, record: Mapping[str, Any] | None = None
) -> Mapping[str, Any] | None:
    """Raise StoreDamagedError if a file `root` recorded when written is missing or changed.

    The record is `root`'s ``INTEGRITY`` file, or `record` (a batch store's manifest). Stores
    written without a record (older qktrace, other tools) are not checked.
    """
    if record is None:
        record_path = root / INTEGRITY
        if not record_path.is_file():
            _check_unrecorded(root)
            return None
        record = _read_integrity(root)
    files = record["files"]
    problems: dict[str, str] = {}
    for rel, (size, crc) in files.items():
        var, _, name = rel.rpartition("/")
        where = f"variable {var!r}" if var else "the store's metadata"
        if where in problems:
            continue
        path = os.path.join(root, rel)  # one stat per file: opening a big store stats many
        try:
            info = os.stat(path)
            actual = info.st_size if S_ISREG(info.st_mode) else -1
        except OSError:
            actual = -1
        if actual < 0 and var and not os.path.isdir(os.path.join(root, var)):
            problems[where] = "its folder is missing"
        elif actual < 0:
            problems[where] = f"file {name} is missing"
        elif actual != size:
            problems[where] = (
                f"file {name} is empty (0 of {size} bytes)"
                if actual == 0
                else f"file {name} has {actual} of the {size} bytes written"
            )
        elif (checksums or _is_metadata(rel)) and zlib.crc32(Path(path).read_bytes()) != crc:
            problems[where] = f"file {name} changed since it was written (CRC-32 differs)"
    if problems:
        what = "; ".join(f"{k}: {v}" for k, v in problems.items())
        raise StoreDamagedError(
            f"{root} is damaged: {what}. Read as is, the missing pieces would come back as fill "
            f"values (NaN or 0) or fail to decompress, so it is refused. Rewrite it with: "
            f"{record.get('command') or 'the command that wrote it, with --overwrite'}"
        )
    return record


def _read_integrity(root: Path) -> dict:
    """`root`'s integrity record, checked field by field (StoreDamagedError if malformed)."""
    record = _read_json(root, INTEGRITY)
    if not isinstance(record, dict) or record.get("format") != "qktrace-integrity":
        raise _malformed(root, INTEGRITY, None, 'it has no "format": "qktrace-integrity"')
    version = _layout_version(root, INTEGRITY, record, _INTEGRITY_VERSION)
    _check_fields(root, INTEGRITY, record, version, {"files": dict})
    _check_files(root, INTEGRITY, record["files"], version)
    if not isinstance(record.get("command"), (str, type(None))):
        raise _malformed(root, INTEGRITY, version, f"'command' is {_short(record['command'])}")
    return record


def _even_chunks(ds: xr.Dataset) -> xr.Dataset:
    """Rechunk dims whose dask chunks are uneven (zarr needs equal chunks but the last)."""
    uneven: dict[str, int] = {}
    for var in ds.variables.values():
        if var.chunks is None:
            continue
        for dim, sizes in zip(var.dims, var.chunks, strict=True):
            if len(sizes) > 1 and (len(set(sizes[:-1])) > 1 or sizes[-1] > sizes[0]):
                uneven[dim] = max(uneven.get(dim, 0), *sizes)
    return ds.chunk(uneven) if uneven else ds


# --------------------------------------------------------------------------------------------
# batches


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
        Batches smaller in another dim are padded (see the module docstring); larger ones are
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
        params = _jsonable(params)
        attrs = _jsonable(dict(attrs or {}))
        sizes = {str(d): int(n) for d, n in (sizes or {}).items()}
        if "params" in attrs and attrs["params"] != params:
            raise ValueError(
                f"attrs['params'] ({attrs['params']!r}) differs from params ({params!r}); "
                "pass the same parameters to both, e.g. attrs=provenance(study, params)."
            )
        attrs["params"] = params
        manifest = {
            "format": "qktrace-batches",
            "version": _BATCHES_VERSION,
            "dim": dim,
            "params": params,
            "attrs": attrs,
            "finalized": False,
            "sizes": sizes,
            "n_batches": 0,
            "rows": 0,
            "command": _COMMAND.get() or _rewrite_hint(attrs),
            "files": {},
        }

        kind = _kind(self.path)
        if kind == "batches":
            stored = _read_manifest(self.path)
            if stored.get("version", 1) < _BATCHES_VERSION:
                raise _legacy_not_resumable(self.path)
            _check_same_run(self.path, stored, manifest)
            if stored["rows"]:  # the planned sizes the stored rows were written with
                planned = {d: n for d, n in sizes.items() if d in stored["sizes"]}
                check_same_run(
                    self.path,
                    {f"sizes[{d!r}]": stored["sizes"][d] for d in planned},
                    {f"sizes[{d!r}]": n for d, n in planned.items()},
                    what="batches",
                )
            if not stored["rows"]:  # no batch yet: this run's plan holds
                stored = {**stored, "sizes": sizes}
            self._manifest = stored
            self._clean_leftovers()
            _verify(self.path, checksums=True, record=stored)  # a resume builds on it: whole
        elif kind == "zarr":
            raise FileExistsError(
                f"{self.path} holds a single dataset written by save(), not a BatchWriter store; "
                "write the batches to a new path (e.g. a new --out)."
            )
        elif _exists_not_empty(self.path):
            raise FileExistsError(
                f"{self.path} exists and is not a qktrace store; choose a new path "
                "(e.g. a new --out) or remove it."
            )
        else:
            _create_store(self.path, manifest)
            self._manifest = manifest
        self.n_done = int(self._manifest["n_batches"])
        self.rows = int(self._manifest["rows"])
        self._arrays: dict[str, _ArrayLayout] | None = None
        self._first: xr.Dataset | None = None  # the stored run's schema: an empty slice of it

    def __repr__(self) -> str:
        return f"BatchWriter({str(self.path)!r}, dim={self.dim!r}, n_done={self.n_done})"

    def __enter__(self) -> BatchWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.flush()

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
        if self._manifest.get("finalized"):
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
        first = self.rows == 0 and not self._held
        ds = self._conform(ds, first=first)
        if first:  # the run's schema until the store has it
            self._first = ds.isel({self.dim: slice(0, 0)})
        self._held.append(ds)
        self._held_bytes += _memory(ds)
        due = time.monotonic() - self._last_write >= self.write_every_s
        if due or self._held_bytes > self.max_buffer_bytes:
            self.flush()

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
        if self.rows and self._capacity() != self.rows:
            self._resize(self.rows)
        final_path = None
        if extra is not None:
            out = extra.copy()
            out.attrs = {**self._manifest["attrs"], **extra.attrs, "n_batches": self.n_done}
            final_path = self.path / FINAL
            _write_atomic(out, final_path)
        self._commit(finalized=True)
        return final_path

    # ---------------------------------------------------------------------------- internals

    def _conform(self, ds: xr.Dataset, first: bool) -> xr.Dataset:
        """`ds` as the store holds it: strings variable-length, padded to the planned sizes."""
        ds = ds.drop_encoding()
        for name, var in ds.variables.items():
            if var.dtype.kind == "U":  # fixed-length strings would cut longer ones later
                ds[name] = var.astype(object)
        if first:
            sizes = {d: n for d, n in ds.sizes.items() if d != self.dim}
            sizes.update({d: n for d, n in self._manifest["sizes"].items() if d in sizes})
            reference = None
        else:
            reference = self._reference()
            sizes = {d: n for d, n in reference.sizes.items() if d != self.dim}
        pad: dict[Any, int] = {}
        for d, n in ds.sizes.items():
            if d == self.dim or n == sizes[d]:
                continue
            if n > sizes[d] or d in ds.indexes:
                raise ValueError(
                    f"batch {self._next} has {n} along {d!r}, but the store holds {sizes[d]} "
                    "(the planned size, or the first batch's). Pass BatchWriter(..., "
                    f"sizes={{{d!r}: <the largest size of any batch>}}) when the run starts "
                    "(capture passes its batch plan's widths), or give every batch the same "
                    f"size there{' and labels' if d in ds.indexes else ''}."
                )
            pad[d] = sizes[d] - n
        if pad:
            ds = ds.assign_coords({d: np.arange(ds.sizes[d]) for d in pad})
            fill = {k: _fill(v.dtype) for k, v in ds.variables.items()}
            ds = ds.reindex({d: np.arange(sizes[d]) for d in pad}, fill_value=fill)
            ds = ds.drop_vars(list(pad))
        if reference is None:
            return ds
        for name, var in reference.variables.items():  # ints the store padded to float
            if name in ds.variables and var.dtype.kind == "f" and ds[name].dtype.kind in "iu":
                ds[name] = ds[name].astype(var.dtype)
        schema, stored = _schema(ds), _schema(reference)
        if schema != stored:
            raise ValueError(
                f"batch {self._next} does not match batch 0 of {self.path}:\n"
                + diff_lines(stored, schema, "variable", "batch 0", "this batch")
                + "\nEvery batch must have the same variables, with the same dims and kind of "
                "dtype (an int variable padded in a later batch needs NaN: make it float, or "
                "pass sizes= so the first batch is padded too); fix the producer, or write this "
                "run to a new path."
            )
        for d in ds.indexes:
            if d != self.dim and not ds.indexes[d].equals(reference.indexes[d]):
                raise ValueError(
                    f"batch {self._next} has {d!r} labels {list(ds.indexes[d])}, but batch 0 of "
                    f"{self.path} has {list(reference.indexes[d])}; every batch must have the "
                    f"same labels along dims other than {self.dim!r}."
                )
        return ds

    def _reference(self) -> xr.Dataset:
        """The stored run's variables, dims and labels (an empty slice along the batch dim)."""
        if self._first is None:
            stored = xr.open_zarr(self.path, chunks=None, consolidated=True)
            self._first = stored.isel({self.dim: slice(0, 0)}).load()
        return self._first

    def _create(self, ds: xr.Dataset, chunk_rows: int, n_batches: int) -> None:
        """Write the first batches as the store's arrays, then size them for the whole run.

        The arrays are chunked along the batch dim by `chunk_rows`, the first batch's size.
        """
        for entry in self.path.iterdir():  # arrays of a first batch a crash left uncommitted
            if entry.name not in (MANIFEST, FINAL):
                _remove(entry)
        n = ds.sizes[self.dim]
        out = ds.drop_indexes(self.dim) if self.dim in ds.indexes else ds
        out.attrs = _jsonable({**ds.attrs, **self._manifest["attrs"], "batch_dim": self.dim})
        for var in out.variables.values():
            var.attrs = _jsonable(var.attrs)
        encoding = {
            name: {
                "chunks": tuple(
                    chunk_rows if d == self.dim else max(s, 1) for d, s in var.sizes.items()
                )
            }
            for name, var in out.variables.items()
            if self.dim in var.dims
        }
        with _beside_manifest():
            out.to_zarr(
                self.path,
                mode="a",
                zarr_format=_ZARR_FORMAT,
                consolidated=True,
                encoding=encoding,
                write_empty_chunks=True,
            )
        planned = self._manifest["sizes"].get(self.dim, n)
        if planned > n:
            _resize_arrays(self.path, self.dim, planned)
        sizes = {**self._manifest["sizes"], **{d: s for d, s in ds.sizes.items() if d != self.dim}}
        files = _record_files(
            self.path,
            [p.relative_to(self.path).as_posix() for p in self.path.rglob("*") if p.is_file()],
        )
        self._first = None
        self._arrays = None
        self._commit(rows=n, n_batches=n_batches, files=files, sizes=sizes)

    def _write_rows(self, ds: xr.Dataset, n_batches: int = 1) -> None:
        """Write `n_batches` later batches (`ds`, concatenated) after the complete rows; commit."""
        start, n = self.rows, ds.sizes[self.dim]
        grow = start + n > self._capacity()
        touched = self._chunk_files(start, start + n)
        metadata = self._metadata_files() if grow else []
        stale = [f for f in touched + metadata if f in self._manifest["files"]]
        if stale:  # about to be rewritten: a crash must not leave them recorded as they were
            files = {f: v for f, v in self._manifest["files"].items() if f not in stale}
            self._commit(files=files)
        if grow:
            self._resize(max(2 * self._capacity(), start + n), commit=False)
        out = ds.drop_vars([k for k, v in ds.variables.items() if self.dim not in v.dims])
        out = out.drop_indexes(self.dim) if self.dim in out.indexes else out
        out.attrs = {}  # the store's attrs were written with the first batch
        with _beside_manifest():
            out.to_zarr(
                self.path,
                region={self.dim: slice(start, start + n)},
                zarr_format=_ZARR_FORMAT,
                consolidated=True,
                write_empty_chunks=True,
            )
        files = {**self._manifest["files"], **_record_files(self.path, touched + metadata)}
        self._commit(rows=start + n, n_batches=self.n_done + n_batches, files=files)

    def _resize(self, rows: int, commit: bool = True) -> None:
        """Give every array with the batch dim `rows` rows (metadata only)."""
        metadata = self._metadata_files()
        if commit:
            files = {f: v for f, v in self._manifest["files"].items() if f not in metadata}
            self._commit(files=files)
        _resize_arrays(self.path, self.dim, rows)
        self._arrays = None
        if commit:
            self._commit(files={**self._manifest["files"], **_record_files(self.path, metadata)})

    def _layout(self) -> dict[str, _ArrayLayout]:
        if self._arrays is None:
            self._arrays = _array_layouts(self.path, self.dim)
        return self._arrays

    def _capacity(self) -> int:
        return next(iter(self._layout().values())).rows

    def _chunk_files(self, start: int, stop: int) -> list[str]:
        return [f for layout in self._layout().values() for f in layout.chunk_files(start, stop)]

    def _metadata_files(self) -> list[str]:
        arrays = [f"{name}/{meta}" for name in self._layout() for meta in (".zarray", ".zattrs")]
        return [".zmetadata", *arrays]

    def _commit(self, **changes: Any) -> None:
        """Replace the manifest atomically: the one step that makes a batch count."""
        manifest = {**self._manifest, **changes}
        _write_manifest(self.path, manifest)
        self._manifest = manifest
        self.n_done, self.rows = manifest["n_batches"], manifest["rows"]

    def _clean_leftovers(self) -> None:
        """Delete what killed writers left: temporary copies and zarr's partial chunk files."""
        for leftover in self.path.iterdir():
            if _TMP_RE.match(leftover.name):
                _remove(leftover)
        for partial in [*self.path.glob("*.partial"), *self.path.glob("*/*.partial")]:
            partial.unlink()


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


@dataclass
class _ArrayLayout:
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


def _array_layouts(path: Path, dim: str) -> dict[str, _ArrayLayout]:
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
        out[name] = _ArrayLayout(
            name, axis, meta["shape"][axis], meta["chunks"][axis], others,
            meta.get("dimension_separator") or ".",
        )  # fmt: skip
    return out


@contextmanager
def _beside_manifest() -> Iterator[None]:
    """Silence zarr's warning that the manifest in a BatchWriter store is no zarr object."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Object at .* is not recognized", UserWarning)
        yield


def _resize_arrays(path: Path, dim: str, rows: int) -> None:
    """Give each array with `dim` `rows` rows along it (metadata only), then reconsolidate."""
    import zarr

    with _beside_manifest():
        group = zarr.open_group(str(path), mode="r+")
        for _, array in group.arrays():
            dims = array.attrs["_ARRAY_DIMENSIONS"]
            if dim in dims:
                shape = tuple(
                    rows if d == dim else s for d, s in zip(dims, array.shape, strict=True)
                )
                array.resize(shape)
        zarr.consolidate_metadata(str(path))


def _record_files(root: Path, files: list[str]) -> dict[str, list[int]]:
    """Size and CRC-32 of each of `files` (relative to `root`) that exists."""
    out = {}
    for rel in files:
        p = root / rel
        if rel != MANIFEST and not rel.startswith(FINAL + "/") and p.is_file():
            data = p.read_bytes()
            out[rel] = [len(data), zlib.crc32(data)]
    return out


def _legacy_not_resumable(path: Path) -> Exception:
    return ValueError(
        f"{path} was written by an older qktrace, one zarr store per batch (batch-NNNNNN.zarr). "
        "It still opens with qktrace.open, but a run cannot resume into it: write this run to a "
        f"new path (e.g. a new --out), or delete {path} to rerun it in the current layout. To "
        "turn a finished one into a single store: qktrace.save(qktrace.open(old), new)."
    )


def _batch_paths(path: Path) -> list[Path]:
    """Complete batch stores in order; raises if the numbering has a gap."""
    found = {}
    for p in path.iterdir():
        m = _BATCH_RE.match(p.name)
        if m:
            found[int(m.group(1))] = p
    missing = sorted(set(range(len(found))) - set(found))
    if missing:
        raise ValueError(
            f"{path} is damaged: batch {missing[0]} is missing but later batches exist "
            f"(found {sorted(found)}). Delete the store and rerun the command that wrote it."
        )
    return [found[i] for i in range(len(found))]


def _create_store(path: Path, manifest: dict) -> None:
    """Create the store directory with its manifest in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        _write_manifest(tmp, manifest)
        if path.is_dir():  # an empty directory made beforehand
            path.rmdir()
        os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _write_manifest(path: Path, manifest: dict) -> None:
    """Write `manifest` to a temporary file and rename it over the manifest (atomic)."""
    head = {k: v for k, v in manifest.items() if k != "files"}
    text = json.dumps(head, indent=2, allow_nan=True)
    if "files" in manifest:  # one line per file: the record grows with the batches
        lines = ",\n".join(
            f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in manifest["files"].items()
        )
        text = text[:-2] + ',\n  "files": {' + (f"\n{lines}\n  " if lines else "") + "}\n}"
    tmp = path / f".{MANIFEST}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.write_text(text + "\n")
    os.replace(tmp, path / MANIFEST)


def _read_manifest(path: Path) -> dict:
    manifest = _read_json(path, MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != "qktrace-batches":
        raise StoreDamagedError(
            f'{path / MANIFEST} is not a qktrace batch manifest (no "format": '
            '"qktrace-batches"); use a new path, or restore the store from a backup.'
        )
    version = _layout_version(path, MANIFEST, manifest, _BATCHES_VERSION)
    fields: dict[str, Any] = {"dim": str, "attrs": dict}
    if version >= 2:
        fields.update(params=dict, sizes=dict, rows=int, n_batches=int, files=dict)
    _check_fields(path, MANIFEST, manifest, version, fields)
    if version >= 2:
        _check_files(path, MANIFEST, manifest["files"], version)
        for key in ("rows", "n_batches"):
            if manifest[key] < 0:
                raise _malformed(path, MANIFEST, version, f"{key!r} is {manifest[key]}")
    return manifest


# the largest file `open` reads whole to check a store's record (a manifest, an integrity file)
MAX_RECORD_BYTES = 256 * 2**20


def _read_json(path: Path, name: str) -> Any:
    """The JSON file `name` of the store `path`, or StoreDamagedError naming both."""
    try:
        if (path / name).stat().st_size > MAX_RECORD_BYTES:
            raise ValueError(f"it is larger than {MAX_RECORD_BYTES // 2**20} MiB")
        return json.loads((path / name).read_text())
    except (OSError, ValueError) as err:
        raise StoreDamagedError(
            f"{path} is damaged: its {name} cannot be read ({type(err).__name__}: {err}). "
            "Rewrite the store (rerun the command that wrote it with --overwrite), or restore "
            "it from a backup."
        ) from err


def _layout_version(path: Path, name: str, record: dict, newest: int) -> int:
    """The record's layout version; a newer one than this qktrace reads is refused."""
    version = record.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise _malformed(path, name, version, f'its "version" is {version!r}, not a count')
    if version > newest:
        raise StoreError(
            f"{path} was written by a newer qktrace: its {name} has layout version {version}, "
            f"and this qktrace ({__version__}) reads versions up to "
            f"{newest}. Upgrade qktrace (pip install -U qktrace) to read it."
        )
    return version


def _check_fields(path: Path, name: str, record: dict, version: int, fields: dict) -> None:
    """Each of `fields` (key -> type) is in `record` with that type."""
    for key, kind in fields.items():
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise _malformed(
                path, name, version, f"{key!r} is {_short(value)}, not a {kind.__name__}"
            )


def _check_files(path: Path, name: str, files: dict, version: int) -> None:
    """Every entry of a record's files is ``"relative/path": [size, crc32]`` (two ints >= 0)."""
    for rel, entry in files.items():
        ok = (
            isinstance(entry, list)
            and len(entry) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in entry)
        )
        if not ok:
            raise _malformed(
                path, name, version, f"the entry of {_short(rel)} is {_short(entry)}, "
                "not [size, crc32]",
            )  # fmt: skip


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _malformed(path: Path, name: str, version: Any, what: str) -> StoreDamagedError:
    return StoreDamagedError(
        f"{path} is damaged: its {name} (layout version {_short(version)}) is malformed: "
        f"{what}. Rewrite the store (rerun the command that wrote it with --overwrite), or "
        "restore it from a backup."
    )


def is_copy_of(name: str, store_name: str) -> bool:
    """Whether `name` is a temporary or moved-aside copy of the store `store_name`
    (``.<store_name>.tmp-XXXXXXXX`` / ``.old-XXXXXXXX``), by exact name."""
    return re.fullmatch(rf"\.{re.escape(store_name)}\.(tmp|old)-[0-9a-f]{{8}}", name) is not None


def remove_copy(path: Path) -> None:
    """Delete a copy a killed writer left (a folder, a file or a link; a link's target stays)."""
    try:
        _remove(path)
    except FileNotFoundError:
        pass


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _check_same_run(path: Path, stored: dict, new: dict) -> None:
    """Refuse to resume the BatchWriter run in `stored` (its manifest) with `new`'s settings."""

    both = [k for k in _IDENTITY_ATTRS if None not in (stored["attrs"].get(k), new["attrs"].get(k))]

    def flat(m: dict) -> dict[str, Any]:
        out = {"dim": m["dim"], **m["params"]}
        out.update({k: m["attrs"][k] for k in both if k not in out})
        return out

    check_same_run(path, flat(stored), flat(new), what="batches")


class DifferentRunError(StoreError):
    """A stored result was made with other parameters than the run that wants to reuse it."""

    def __init__(self, message: str, differences: list[str]) -> None:
        super().__init__(message)
        self.differences = differences


def check_same_run(
    path: str | os.PathLike,
    stored: Mapping[str, Any],
    now: Mapping[str, Any],
    *,
    what: str = "results",
    fix: str | None = None,
) -> None:
    """Raise `DifferentRunError` unless `stored` and `now` (a run's parameters) are equal.

    The one "same run?" check of qktrace: a resumed `BatchWriter` store (capture's ``out=``),
    a resumed `qktrace.reduce` checkpoint, a reused order-ID subspace (lexical) and the toy's
    finished models all refuse or skip a stored result this way, with one message: the store,
    each differing parameter with its stored and current value, and the fix.

    Examples
    --------
    >>> check_same_run("run.zarr", {"seed": 0, "n": 4}, {"seed": 1, "n": 4}, what="sums")
    Traceback (most recent call last):
    ...
    qktrace.store.DifferentRunError: run.zarr holds sums of a run with different parameters (seed):
      seed: stored 0, now 1
    Resume only with the same parameters. To start over, pass a new --out (Python: a new out= path) or --overwrite (Python: delete run.zarr).
    """
    stored, now = _jsonable(dict(stored)), _jsonable(dict(now))
    if stored == now:
        return
    keys = [k for k in dict.fromkeys([*stored, *now]) if stored.get(k, ...) != now.get(k, ...)]
    if fix is None:
        fix = (
            "Resume only with the same parameters. To start over, pass a new --out (Python: a "
            f"new out= path) or --overwrite (Python: delete {path})."
        )
    raise DifferentRunError(
        f"{path} holds {what} of a run with different parameters ({', '.join(keys)}):\n"
        + diff_lines(stored, now, "", "stored", "now")
        + f"\n{fix}",
        keys,
    )


def diff_lines(old: dict, new: dict, noun: str, old_name: str, new_name: str) -> str:
    """One line per key whose value differs between `old` and `new`, for "same run?" errors."""
    missing = "<missing>"
    lines = []
    for key in list(old) + [k for k in new if k not in old]:
        a, b = old.get(key, missing), new.get(key, missing)
        if a != b:
            label = f"{noun} {key!r}" if noun else key
            lines.append(f"  {label}: {old_name} {a!r}, {new_name} {b!r}")
    return "\n".join(lines)


def _schema(ds: xr.Dataset) -> dict[str, tuple[tuple[str, ...], str]]:
    """Variable name -> (dims, dtype kind), with all string kinds as 'str'."""

    def kind(dtype: np.dtype) -> str:
        return "str" if dtype.kind in "USOT" else dtype.kind

    return {str(k): (tuple(map(str, v.dims)), kind(v.dtype)) for k, v in ds.variables.items()}


def _open_legacy_batches(path: Path, checksums: bool = False) -> xr.Dataset:
    """A store of the first layout (manifest version 1): one zarr store per batch, read only.

    Opening costs one zarr store per batch; ``save(open(old), new)`` makes one store of it.
    """
    manifest = _read_manifest(path)
    dim = manifest["dim"]
    batches = [_open_zarr(p, checksums) for p in _batch_paths(path)]
    if not batches:
        raise ValueError(
            f"{path} holds no complete batch yet; run the study (or let it finish its first "
            "batch) before opening it."
        )
    batches = _pad_to_common(batches, dim)
    # Variables without the batch dim (e.g. head labels) are taken from the first batch:
    # comparing them across batches would load each one (most of the time of opening).
    ds = xr.concat(
        batches,
        dim=dim,
        data_vars="minimal",
        coords="minimal",
        compat="override",
        join="exact",
        combine_attrs="drop_conflicts",
    )
    ds.attrs.update(manifest["attrs"])
    ds.attrs["batch_dim"] = dim
    return ds


def _pad_to_common(batches: list[xr.Dataset], dim: str) -> list[xr.Dataset]:
    """Give every batch the same size in each dim except `dim`, padding where needed.

    Dims with an index coordinate get the ordered union of the labels; others the largest size.
    """
    dims = {d for b in batches for d in b.dims if d != dim}
    targets: dict[Any, Any] = {}
    positional: set[Any] = set()
    for d in dims:
        if all(d in b.indexes for b in batches):
            labels = [b.indexes[d] for b in batches]
            if any(not lab.equals(labels[0]) for lab in labels[1:]):
                targets[d] = list(dict.fromkeys(v for lab in labels for v in lab))
        else:
            sizes = {b.sizes.get(d, 0) for b in batches}
            if len(sizes) > 1:
                targets[d] = np.arange(max(sizes))
                positional.add(d)
    if not targets:
        return batches
    out = []
    for b in batches:
        todo = {d: t for d, t in targets.items() if d in b.dims}
        pos = [d for d in todo if d in positional]
        b = b.assign_coords({d: np.arange(b.sizes[d]) for d in pos})
        b = b.reindex(todo, fill_value={k: _fill(v.dtype) for k, v in b.variables.items()})
        out.append(b.drop_vars(pos))
    return out


def _fill(dtype: np.dtype) -> Any:
    if dtype.kind in "USOT":
        return ""
    if dtype.kind == "b":
        return False
    if dtype.kind == "M":
        return np.datetime64("NaT")
    if dtype.kind == "m":
        return np.timedelta64("NaT")
    return math.nan
