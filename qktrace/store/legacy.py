"""Reading stores of the first `BatchWriter` layout: one zarr store ``batch-NNNNNN.zarr`` per
batch, manifest version 1.

They still open (`open_legacy_batches`, at one store per batch, padded to common sizes); runs
do not resume into them (`qktrace.store.manifest.legacy_not_resumable`), and
``qktrace.save(qktrace.open(old), new)`` makes one store of a finished one.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import xarray as xr

from qktrace.store.batches import fill
from qktrace.store.manifest import read_manifest
from qktrace.store.reading import open_zarr

__all__: list[str] = []

_BATCH_RE = re.compile(r"^batch-(\d+)\.zarr$")


def open_legacy_batches(path: Path, checksums: bool = False) -> xr.Dataset:
    """A store of the first layout (manifest version 1): one zarr store per batch, read only.

    Opening costs one zarr store per batch; ``save(open(old), new)`` makes one store of it.
    """
    manifest = read_manifest(path)
    dim = manifest["dim"]
    batches = [open_zarr(p, checksums) for p in _batch_paths(path)]
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
        b = b.reindex(todo, fill_value={k: fill(v.dtype) for k, v in b.variables.items()})
        out.append(b.drop_vars(pos))
    return out


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
