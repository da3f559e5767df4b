"""Reading one zarr store as it was recorded: `open_zarr`.

Before xarray sees a store, its files are compared with its record (`integrity.verify`) and its
metadata with what any real store declares (`check_declared_sizes`); while xarray reads it,
every file must match the record (`VerifiedStore`), so a store replaced or edited meanwhile
raises `StoreReplacedError` instead of reading back as a mix of two stores or as fill values.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr
from zarr.storage import LocalStore

from qktrace.core.errors import StoreError
from qktrace.store.integrity import StoreDamagedError, malformed, read_json, short, verify
from qktrace.store.manifest import read_manifest

__all__ = ["StoreReplacedError"]


def open_zarr(
    path: Path, checksums: bool = False, record: Mapping[str, Any] | None = None
) -> xr.Dataset:
    """The zarr store at `path`, lazily, checked against its record: its integrity file, or
    `record` (a batch store's manifest); with `checksums` every file's CRC-32 too."""
    record = verify(path, checksums, record)
    check_declared_sizes(path)
    for attempt in (1, 2):  # a writer replacing the store between the record and the metadata
        try:
            return xr.open_zarr(_zarr_store(path, record), chunks={})
        except StoreReplacedError:
            if attempt == 2:
                raise
            record = verify(path, checksums, None if record is None else _reread(path, record))
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


def check_declared_sizes(path: Path) -> None:
    """Refuse a store whose metadata declares arrays no real store holds (absurd shapes)."""
    if not (path / ".zmetadata").is_file():
        return
    metadata = read_json(path, ".zmetadata")
    arrays = metadata.get("metadata") if isinstance(metadata, dict) else None
    if not isinstance(arrays, dict):
        raise malformed(path, ".zmetadata", None, 'it has no "metadata" mapping')
    for key, meta in arrays.items():
        name, _, leaf = str(key).rpartition("/")
        if leaf != ".zarray":
            continue
        shape, chunks, itemsize = _declared(path, name, meta)
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


def _declared(path: Path, name: str, meta: Any) -> tuple[list[int], list[int], int]:
    """The shape, chunks and item size that the metadata `meta` of variable `name` declares;
    StoreDamagedError if they are not lists of counts."""
    shape, chunks = (meta.get(k) if isinstance(meta, dict) else None for k in ("shape", "chunks"))
    try:
        itemsize = np.dtype(meta["dtype"]).itemsize or 1
    except (KeyError, TypeError, ValueError):
        itemsize = 8  # object and structured dtypes: judged by a pointer's size
    if not (
        isinstance(shape, list)
        and isinstance(chunks, list)
        and len(shape) == len(chunks)
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)
        and all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in chunks)
    ):
        raise malformed(path, ".zmetadata", None,
                        f"variable {name!r} has shape {short(shape)} and chunks {short(chunks)}")  # fmt: skip
    return shape, chunks, itemsize


def _reread(path: Path, record: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The record of `path` read again: its manifest (a batch store's) or its integrity file."""
    if record.get("format") == "qktrace-batches":
        return read_manifest(path)
    return None


def _zarr_store(path: Path, record: Mapping[str, Any] | None) -> Any:
    """What xarray reads `path` through: every file checked against `record` as it is read."""
    if record is None:  # written by another tool or an older qktrace: nothing to check against
        return path
    return VerifiedStore(path, record["files"], record.get("format") != "qktrace-batches")


class VerifiedStore(LocalStore):
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
