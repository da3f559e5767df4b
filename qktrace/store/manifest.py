"""The manifest of a `BatchWriter` store: what counts as written, and how a run resumes.

A batch counts once the manifest says so: the manifest (the number of complete rows and
batches, and the size and CRC-32 of every file holding them) is replaced by a rename only after
the batch's rows are on disk (`Manifest.commit`). A crash at any point (SIGKILL included) leaves
the store at the last complete batch: `open` reads only the complete rows, and the rerun writes
the interrupted batch again over whatever it left (zarr writes each chunk file atomically). A
recorded file about to be rewritten (the chunk a batch shares with the previous one, the array
metadata when the arrays grow) is first dropped from the record in a manifest replaced before
the write (`Manifest.forget`), so a crash never leaves it recorded as it was. Reopening with
different parameters is refused (`Manifest.resume_or_create`): two settings mixed in one store
would be silent corruption.

The manifest is ``qktrace_batches.json``: dim, params, attrs, planned sizes, complete rows and
batches, every file with its size and CRC-32, one line per file (it grows with the batches).
Version 1 was the first layout, one zarr store per batch (`qktrace.store.legacy`), read only.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

from qktrace.store.files import (
    FINAL,
    MANIFEST,
    TMP_RE,
    copy_path,
    exists_not_empty,
    remove,
    store_kind,
)
from qktrace.store.identity import IDENTITY_ATTRS, check_same_run
from qktrace.store.integrity import (
    StoreDamagedError,
    check_fields,
    check_files,
    layout_version,
    malformed,
    read_json,
    rewrite_command,
    verify,
)

__all__: list[str] = []

# manifest version of a BatchWriter store: 1 = one zarr store per batch (read only), 2 = one store
BATCHES_VERSION = 2


def new_manifest(dim: str, params: dict, attrs: dict, sizes: dict[str, int]) -> dict:
    """The manifest of a new run: no batch yet (`params` and `attrs` JSON-compatible)."""
    if "params" in attrs and attrs["params"] != params:
        raise ValueError(
            f"attrs['params'] ({attrs['params']!r}) differs from params ({params!r}); "
            "pass the same parameters to both, e.g. attrs=provenance(study, params)."
        )
    attrs["params"] = params
    return {
        "format": "qktrace-batches",
        "version": BATCHES_VERSION,
        "dim": dim,
        "params": params,
        "attrs": attrs,
        "finalized": False,
        "sizes": sizes,
        "n_batches": 0,
        "rows": 0,
        "command": rewrite_command(attrs),
        "files": {},
    }


class Manifest:
    """A `BatchWriter` store's manifest, as last committed: in `data` and on disk.

    Parameters
    ----------
    path : pathlib.Path
        The store.
    data : dict
        The manifest (see the module docstring).
    """

    def __init__(self, path: Path, data: dict) -> None:
        self.path = path
        self.data = data

    @classmethod
    def resume_or_create(cls, path: Path, new: dict) -> Manifest:
        """The manifest of the run at `path`, resumed if it is the run `new` describes, else
        created with `new`; refused if `path` is another run, another kind of store, or not a
        store."""
        kind = store_kind(path)
        if kind == "batches":
            return cls(path, _resume(path, new))
        if kind == "zarr":
            raise FileExistsError(
                f"{path} holds a single dataset written by save(), not a BatchWriter store; "
                "write the batches to a new path (e.g. a new --out)."
            )
        if exists_not_empty(path):
            raise FileExistsError(
                f"{path} exists and is not a qktrace store; choose a new path "
                "(e.g. a new --out) or remove it."
            )
        _create_store(path, new)
        return cls(path, new)

    @property
    def n_batches(self) -> int:
        return int(self.data["n_batches"])

    @property
    def rows(self) -> int:
        return int(self.data["rows"])

    @property
    def files(self) -> dict[str, list[int]]:
        return self.data["files"]

    def commit(self, **changes: Any) -> None:
        """Replace the manifest atomically: the one step that makes a batch count."""
        manifest = {**self.data, **changes}
        write_manifest(self.path, manifest)
        self.data = manifest

    def forget(self, files: list[str]) -> None:
        """Drop `files` from the record before they are rewritten (committed, if recorded)."""
        if any(f in self.files for f in files):
            self.commit(files={f: v for f, v in self.files.items() if f not in files})

    def record(self, files: list[str], **changes: Any) -> None:
        """Record the size and CRC-32 of `files` as they are now, with `changes`; commit."""
        self.commit(files={**self.files, **record_files(self.path, files)}, **changes)


def _resume(path: Path, new: dict) -> dict:
    """The stored manifest of `path`, checked to be the run `new` describes, whole on disk."""
    stored = read_manifest(path)
    if stored.get("version", 1) < BATCHES_VERSION:
        raise legacy_not_resumable(path)
    check_same_batches(path, stored, new)
    sizes = new["sizes"]
    if stored["rows"]:  # the planned sizes the stored rows were written with
        planned = {d: n for d, n in sizes.items() if d in stored["sizes"]}
        check_same_run(
            path,
            {f"sizes[{d!r}]": stored["sizes"][d] for d in planned},
            {f"sizes[{d!r}]": n for d, n in planned.items()},
            what="batches",
        )
    if not stored["rows"]:  # no batch yet: this run's plan holds
        stored = {**stored, "sizes": sizes}
    _clean_leftovers(path)
    verify(path, checksums=True, record=stored)  # a resume builds on it: whole
    return stored


def check_same_batches(path: Path, stored: dict, new: dict) -> None:
    """Refuse to resume the BatchWriter run in `stored` (its manifest) with `new`'s settings."""

    both = [k for k in IDENTITY_ATTRS if None not in (stored["attrs"].get(k), new["attrs"].get(k))]

    def flat(m: dict) -> dict[str, Any]:
        out = {"dim": m["dim"], **m["params"]}
        out.update({k: m["attrs"][k] for k in both if k not in out})
        return out

    check_same_run(path, flat(stored), flat(new), what="batches")


def _clean_leftovers(path: Path) -> None:
    """Delete what killed writers left: temporary copies and zarr's partial chunk files."""
    for leftover in path.iterdir():
        if TMP_RE.match(leftover.name):
            remove(leftover)
    for partial in [*path.glob("*.partial"), *path.glob("*/*.partial")]:
        partial.unlink()


def record_files(root: Path, files: list[str]) -> dict[str, list[int]]:
    """Size and CRC-32 of each of `files` (relative to `root`) that exists."""
    out = {}
    for rel in files:
        p = root / rel
        if rel != MANIFEST and not rel.startswith(FINAL + "/") and p.is_file():
            data = p.read_bytes()
            out[rel] = [len(data), zlib.crc32(data)]
    return out


def legacy_not_resumable(path: Path) -> Exception:
    """The error for a run that would resume into a store of the first layout."""
    return ValueError(
        f"{path} was written by an older qktrace, one zarr store per batch (batch-NNNNNN.zarr). "
        "It still opens with qktrace.open, but a run cannot resume into it: write this run to a "
        f"new path (e.g. a new --out), or delete {path} to rerun it in the current layout. To "
        "turn a finished one into a single store: qktrace.save(qktrace.open(old), new)."
    )


def _create_store(path: Path, manifest: dict) -> None:
    """Create the store directory with its manifest in one rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = copy_path(path, "tmp")
    try:
        tmp.mkdir()
        write_manifest(tmp, manifest)
        if path.is_dir():  # an empty directory made beforehand
            path.rmdir()
        os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_manifest(path: Path, manifest: dict) -> None:
    """Write `manifest` to a temporary file and rename it over the manifest (atomic)."""
    head = {k: v for k, v in manifest.items() if k != "files"}
    text = json.dumps(head, indent=2, allow_nan=True)
    if "files" in manifest:  # one line per file: the record grows with the batches
        lines = ",\n".join(
            f"    {json.dumps(k)}: {json.dumps(v)}" for k, v in manifest["files"].items()
        )
        text = text[:-2] + ',\n  "files": {' + (f"\n{lines}\n  " if lines else "") + "}\n}"
    tmp = copy_path(path / MANIFEST, "tmp")
    tmp.write_text(text + "\n")
    os.replace(tmp, path / MANIFEST)


def read_manifest(path: Path) -> dict:
    """`path`'s manifest, checked field by field (StoreDamagedError if malformed)."""
    manifest = read_json(path, MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format") != "qktrace-batches":
        raise StoreDamagedError(
            f'{path / MANIFEST} is not a qktrace batch manifest (no "format": '
            '"qktrace-batches"); use a new path, or restore the store from a backup.'
        )
    version = layout_version(path, MANIFEST, manifest, BATCHES_VERSION)
    fields: dict[str, Any] = {"dim": str, "attrs": dict}
    if version >= 2:
        fields.update(params=dict, sizes=dict, rows=int, n_batches=int, files=dict)
    check_fields(path, MANIFEST, manifest, version, fields)
    if version >= 2:
        check_files(path, MANIFEST, manifest["files"], version)
        for key in ("rows", "n_batches"):
            if manifest[key] < 0:
                raise malformed(path, MANIFEST, version, f"{key!r} is {manifest[key]}")
    return manifest
