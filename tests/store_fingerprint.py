"""A study store's fingerprint: per variable its dims, shape and a few numbers that any change of
its values moves (float: sums weighted by a fixed pattern; others: a hash). Small enough to keep
in the repo, so a rewritten study can be checked against the store the code before it wrote.

    python tests/store_fingerprint.py OUT/order_id.zarr > tests/data/order_id.fingerprint.json
"""

from __future__ import annotations

import hashlib
import json
import sys
from typing import Any

import numpy as np
import xarray as xr


def fingerprint(ds: xr.Dataset) -> dict[str, Any]:
    """{variable: {dims, shape, and sums (float) or sha256 (other)}}, dims in sorted order."""
    out = {}
    for name in sorted(map(str, ds.variables)):
        da = ds[name]
        da = da.transpose(*sorted(da.dims))
        entry: dict[str, Any] = {"dims": list(da.dims), "shape": list(da.shape)}
        values = da.values
        if values.dtype.kind == "f":
            x = values.astype(np.float64).ravel()
            weights = np.cos(np.arange(x.size) * 0.7)  # a fixed pattern: positions matter
            finite = np.isfinite(x)
            entry["n_nan"] = int((~finite).sum())
            entry["sum"] = float(x[finite].sum())
            entry["abs_sum"] = float(np.abs(x[finite]).sum())
            entry["weighted"] = float((x[finite] * weights[finite]).sum())
        else:
            entry["sha256"] = hashlib.sha256(
                json.dumps([str(v) for v in values.ravel()]).encode()
            ).hexdigest()
        out[name] = entry
    return out


def differences(expected: dict[str, Any], ds: xr.Dataset, rtol: float = 1e-7) -> list[str]:
    """What differs between a stored fingerprint and `ds` (its variables beyond it are fine)."""
    got = fingerprint(ds)
    problems = []
    for name, want in expected.items():
        have = got.get(name)
        if have is None:
            problems.append(f"{name}: missing")
            continue
        for key, value in want.items():
            if isinstance(value, float):
                scale = max(1e-12, abs(expected[name]["abs_sum"]))
                if abs(have[key] - value) > rtol * scale:
                    problems.append(f"{name}.{key}: {have[key]!r} != {value!r}")
            elif have[key] != value:
                problems.append(f"{name}.{key}: {have[key]!r} != {value!r}")
    return problems


if __name__ == "__main__":
    from qktrace.store import io as store

    print(json.dumps(fingerprint(store.open(sys.argv[1]).load()), indent=0, sort_keys=True))
