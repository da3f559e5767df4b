"""The integrity record: what a store held when it was written, checked whenever it is opened.

zarr reads a missing chunk as the fill value by design, so a store with a deleted variable
folder or chunk would read back as NaN or 0 without a word. Every store `save` writes (and the
final store of a `BatchWriter`) therefore records, in ``qktrace_integrity.json`` inside it, what
it held when finished: its variables with their shapes and chunk counts, and every file with
its size and CRC-32 (`record_integrity`). A `BatchWriter` store records its files (size and
CRC-32) in its manifest, with each batch. `verify` compares the sizes with the record (one
``stat`` per file) and raises `StoreDamagedError` naming the store, the variable and the command
that rewrites it; with ``checksums=True`` it also compares the CRC-32s (one read of the whole
store). The command is the CLI command that wrote the store (recorded through `rewritten_by`),
else a hint from its provenance attrs (`rewrite_hint`).

The records (this one and a batch store's manifest) are read through `read_json`,
`layout_version`, `check_fields` and `check_files`, which refuse a malformed or newer record
with a message naming it.
"""

from __future__ import annotations

import json
import os
import warnings
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from stat import S_ISREG
from typing import Any

from qktrace.core.errors import StoreError
from qktrace.core.version import __version__
from qktrace.store.files import INTEGRITY

__all__ = ["StoreDamagedError", "StoreIntegrityWarning", "rewritten_by"]

# the command that (re)writes the stores written now; set by the CLI around a run
_COMMAND: ContextVar[str | None] = ContextVar("qktrace_store_command", default=None)
# layout version of the integrity record `qktrace_integrity.json`
_INTEGRITY_VERSION = 1


class StoreDamagedError(StoreError):
    """A store lacks a piece it held when written, or holds a changed copy of one."""


class StoreIntegrityWarning(UserWarning):
    """A store qktrace wrote before it recorded stores' files opens unchecked."""


# the first day qktrace wrote an integrity record in every store it saved
_RECORDED_SINCE = "2026-11-27"


def is_metadata(rel: str) -> bool:
    """Whether a store's file is zarr metadata (small; its CRC-32 is checked on every open)."""
    return rel.rpartition("/")[2] in (".zmetadata", ".zattrs", ".zarray", ".zgroup", "zarr.json")


def check_unrecorded(root: Path) -> None:
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
        f"{root} was written by qktrace {short(attrs['qktrace_version'], 20)} on "
        f"{date[:10] or 'an unknown date'}, but has no {INTEGRITY}"
    )
    if date[:10] >= _RECORDED_SINCE:
        raise StoreDamagedError(
            f"{what}, which qktrace writes in every store since {_RECORDED_SINCE}: the record "
            "was deleted, so missing pieces could not be told from data and it is refused. "
            f"Rewrite it with: {rewrite_hint(attrs)}"
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


def record_integrity(root: Path, attrs: Mapping[str, Any]) -> None:
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
        "command": rewrite_command(attrs),
        "variables": variables,
        "files": files,
    }
    (root / INTEGRITY).write_text(json.dumps(record, indent=1) + "\n")


def rewrite_command(attrs: Mapping[str, Any]) -> str:
    """The command that rewrites a store written now: the CLI's (`rewritten_by`), else a hint."""
    return _COMMAND.get() or rewrite_hint(attrs)


def rewrite_hint(attrs: Mapping[str, Any]) -> str:
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


def verify(
    root: Path, checksums: bool, record: Mapping[str, Any] | None = None
) -> Mapping[str, Any] | None:
    """Raise StoreDamagedError if a file `root` recorded when written is missing or changed.

    The record is `root`'s ``INTEGRITY`` file, or `record` (a batch store's manifest). Stores
    written without a record (older qktrace, other tools) are not checked.
    """
    if record is None:
        record_path = root / INTEGRITY
        if not record_path.is_file():
            check_unrecorded(root)
            return None
        record = read_integrity(root)
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
        elif (checksums or is_metadata(rel)) and zlib.crc32(Path(path).read_bytes()) != crc:
            problems[where] = f"file {name} changed since it was written (CRC-32 differs)"
    if problems:
        what = "; ".join(f"{k}: {v}" for k, v in problems.items())
        raise StoreDamagedError(
            f"{root} is damaged: {what}. Read as is, the missing pieces would come back as fill "
            f"values (NaN or 0) or fail to decompress, so it is refused. Rewrite it with: "
            f"{record.get('command') or 'the command that wrote it, with --overwrite'}"
        )
    return record


def read_integrity(root: Path) -> dict:
    """`root`'s integrity record, checked field by field (StoreDamagedError if malformed)."""
    record = read_json(root, INTEGRITY)
    if not isinstance(record, dict) or record.get("format") != "qktrace-integrity":
        raise malformed(root, INTEGRITY, None, 'it has no "format": "qktrace-integrity"')
    version = layout_version(root, INTEGRITY, record, _INTEGRITY_VERSION)
    check_fields(root, INTEGRITY, record, version, {"files": dict})
    check_files(root, INTEGRITY, record["files"], version)
    if not isinstance(record.get("command"), (str, type(None))):
        raise malformed(root, INTEGRITY, version, f"'command' is {short(record['command'])}")
    return record


# --------------------------------------------------------------------------------------------
# reading a record (this one, a batch store's manifest)


# the largest file `open` reads whole to check a store's record (a manifest, an integrity file)
MAX_RECORD_BYTES = 256 * 2**20


def read_json(path: Path, name: str) -> Any:
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


def layout_version(path: Path, name: str, record: dict, newest: int) -> int:
    """The record's layout version; a newer one than this qktrace reads is refused."""
    version = record.get("version", 1)
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise malformed(path, name, version, f'its "version" is {version!r}, not a count')
    if version > newest:
        raise StoreError(
            f"{path} was written by a newer qktrace: its {name} has layout version {version}, "
            f"and this qktrace ({__version__}) reads versions up to "
            f"{newest}. Upgrade qktrace (pip install -U qktrace) to read it."
        )
    return version


def check_fields(path: Path, name: str, record: dict, version: int, fields: dict) -> None:
    """Each of `fields` (key -> type) is in `record` with that type."""
    for key, kind in fields.items():
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise malformed(
                path, name, version, f"{key!r} is {short(value)}, not a {kind.__name__}"
            )


def check_files(path: Path, name: str, files: dict, version: int) -> None:
    """Every entry of a record's files is ``"relative/path": [size, crc32]`` (two ints >= 0)."""
    for rel, entry in files.items():
        ok = (
            isinstance(entry, list)
            and len(entry) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in entry)
        )
        if not ok:
            raise malformed(
                path, name, version, f"the entry of {short(rel)} is {short(entry)}, "
                "not [size, crc32]",
            )  # fmt: skip


def short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def malformed(path: Path, name: str, version: Any, what: str) -> StoreDamagedError:
    return StoreDamagedError(
        f"{path} is damaged: its {name} (layout version {short(version)}) is malformed: "
        f"{what}. Rewrite the store (rerun the command that wrote it with --overwrite), or "
        "restore it from a backup."
    )
