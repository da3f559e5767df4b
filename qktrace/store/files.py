"""A store's files and folders: their names, what kind of store a folder is, and the copies
that killed writers leave beside a store (``.<name>.tmp-*``, ``.<name>.old-*``)."""

from __future__ import annotations

import os
import re
import shutil
import uuid
from pathlib import Path

__all__ = ["is_store", "is_copy_of", "remove_copy"]

# the manifest of a BatchWriter store (see `qktrace.store.manifest`)
MANIFEST = "qktrace_batches.json"
# what a finished zarr store holds: every file with its size and CRC-32 (see
# `qktrace.store.integrity`)
INTEGRITY = "qktrace_integrity.json"
# a BatchWriter store's reduced results (`BatchWriter.finalize`)
FINAL = "final.zarr"
ZARR_FORMAT = 2
# a temporary or moved-aside copy a killed writer left
TMP_RE = re.compile(r"^\..+\.(tmp|old)-[0-9a-f]{8}$")


def copy_path(path: Path, what: str) -> Path:
    """A new name beside `path` for a temporary (``"tmp"``) or moved-aside (``"old"``) copy."""
    return path.parent / f".{path.name}.{what}-{uuid.uuid4().hex[:8]}"


def exists_not_empty(path: Path) -> bool:
    """True if something other than an empty directory is at `path`."""
    if path.is_dir() and not path.is_symlink():
        return any(path.iterdir())
    return path.exists() or path.is_symlink()


def is_store(path: str | os.PathLike) -> bool:
    """Whether `path` is a store `open` reads (a zarr store or a BatchWriter directory)."""
    return store_kind(Path(path)) is not None


def store_kind(path: Path) -> str | None:
    """'batches' for a BatchWriter store, 'zarr' for a zarr store, None otherwise."""
    if not path.is_dir():
        return None
    if (path / MANIFEST).is_file():
        return "batches"
    if (path / ".zgroup").is_file() or (path / "zarr.json").is_file():
        return "zarr"
    return None


def is_copy_of(name: str, store_name: str) -> bool:
    """Whether `name` is a temporary or moved-aside copy of the store `store_name`
    (``.<store_name>.tmp-XXXXXXXX`` / ``.old-XXXXXXXX``), by exact name."""
    return re.fullmatch(rf"\.{re.escape(store_name)}\.(tmp|old)-[0-9a-f]{{8}}", name) is not None


def remove_copy(path: Path) -> None:
    """Delete a copy a killed writer left (a folder, a file or a link; a link's target stays)."""
    try:
        remove(path)
    except FileNotFoundError:
        pass


def remove(path: Path) -> None:
    """Delete a folder, a file or a link (a link's target stays)."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()
