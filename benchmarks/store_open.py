"""Opening a finished batch store: one zarr store per batch (before) vs one store appended (now).

Writes N batches (default 313, what `capture(out=)` writes for 10,000 prompts at batch 32) shaped
like capture's (32 prompts, 8 heads, the last query, 24 keys, d_head 16, attention on: the same
variables and coordinates) in each layout, then opens the finished store in a fresh Python
process (after opening a small store once, so imports are not counted) and reports:

  write           wall time to write all batches (this process)
  files           files in the store
  open            `qktrace.store.open(path)`: wall time, RSS after it minus RSS just before,
                  and the tracemalloc peak of the call
  open+checksums  `qktrace.store.open(path, checksums=True)` (what `qktrace show` does)
  sum q           wall time of `float(ds.q.sum())` on the opened store (reads every chunk)

Layouts:
  per-batch   the layout qktrace wrote before (manifest version 1): each batch saved as its own
              zarr store `batch-NNNNNN.zarr` with `qktrace.store.save`, read by the same code as
              before (`qktrace.store.legacy.open_legacy_batches`).
  one-store   `qktrace.store.BatchWriter(..., sizes=...)` as `capture(out=)` uses it now.

    python benchmarks/store_open.py [--batches 313] [--layouts per-batch,one-store]
                                    [--per-batch-code /work/main]

--per-batch-code opens the per-batch store with the qktrace of another checkout (e.g. main
before this change), to time exactly the code that wrote and read that layout.

Prints figures only; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import human, machine, table, versions

BATCH, HEADS, KEYS, D_HEAD = 32, 8, 24, 16


def make_batch(i: int):
    """Batch i, with capture's variables and coordinates (random values)."""
    import numpy as np
    import xarray as xr

    rng = np.random.default_rng(i)
    start = i * BATCH
    q = rng.standard_normal((BATCH, HEADS, 1, D_HEAD), dtype=np.float32)
    k = rng.standard_normal((BATCH, HEADS, KEYS, D_HEAD), dtype=np.float32)
    logit = rng.standard_normal((BATCH, HEADS, 1, KEYS), dtype=np.float32)
    positions = np.tile(np.arange(KEYS), (BATCH, 1))
    tokens = np.array([[f"tok{t}" for t in range(KEYS)]] * BATCH, dtype=object)
    return xr.Dataset(
        {
            "q": (("prompt", "head", "query", "d_head"), q),
            "k": (("prompt", "head", "key", "d_head"), k),
            "logit": (("prompt", "head", "query", "key"), logit),
            "attention": (("prompt", "head", "query", "key"), np.exp(logit)),
        },
        coords={
            "prompt": np.arange(start, start + BATCH),
            "prompt_text": (
                "prompt",
                np.array([f"prompt {p}" for p in range(BATCH)], dtype=object),
            ),
            "n_tokens": ("prompt", np.full(BATCH, KEYS)),
            "query_position": (("prompt", "query"), np.full((BATCH, 1), KEYS - 1)),
            "key_position": (("prompt", "key"), positions),
            "query_token": (("prompt", "query"), tokens[:, -1:]),
            "key_token": (("prompt", "key"), tokens),
            "head": [f"1.{h}" for h in range(HEADS)],
            "layer": ("head", np.ones(HEADS, dtype=int)),
        },
    )


def write(layout: str, path: Path, n: int) -> float:
    from qktrace import store
    from qktrace.store.files import MANIFEST

    params = {"n_prompts": n * BATCH, "batch_size": BATCH}
    t0 = time.perf_counter()
    if layout == "per-batch":
        path.mkdir(parents=True)
        for i in range(n):
            store.save(make_batch(i), path / f"batch-{i:06d}.zarr")
        manifest = {"format": "qktrace-batches", "version": 1, "dim": "prompt",
                    "params": params, "attrs": {"params": params}, "finalized": False}  # fmt: skip
        (path / MANIFEST).write_text(json.dumps(manifest))
    else:
        sizes = {"prompt": n * BATCH, "query": 1, "key": KEYS}
        writer = store.BatchWriter(path, params=params, sizes=sizes)
        for i in range(n):
            writer.append(make_batch(i))
    return time.perf_counter() - t0


CHILD = """
import json, sys, time, tracemalloc
path = sys.argv[1]
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
import tempfile, numpy as np, xarray as xr
from qktrace import store
warm = store.save(xr.Dataset({"x": ("prompt", np.arange(3.0))}), tempfile.mkdtemp() + "/w.zarr")
float(store.open(warm).x.sum())  # imports (dask, zarr codecs) out of the measurement
before = rss()
tracemalloc.start()
t0 = time.perf_counter()
ds = store.open(path)
t_open = time.perf_counter() - t0
traced = tracemalloc.get_traced_memory()[1]
tracemalloc.stop()
grown = rss() - before
t0 = time.perf_counter()
store.open(path, checksums=True)
t_checks = time.perf_counter() - t0
t0 = time.perf_counter()
float(ds.q.sum())
t_sum = time.perf_counter() - t0
print(json.dumps(dict(open=t_open, grown=grown, traced=traced, checks=t_checks, sum=t_sum,
                      prompts=ds.sizes["prompt"])))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=313)
    parser.add_argument("--layouts", default="per-batch,one-store")
    parser.add_argument(
        "--per-batch-code",
        type=Path,
        default=None,
        help="a qktrace checkout whose store.open reads the per-batch layout (default: this one)",
    )
    args = parser.parse_args()
    print(machine(), versions(), sep="\n")
    print(f"{args.batches} batches of {BATCH} prompts, {HEADS} heads, {KEYS} keys, d_head {D_HEAD}")
    rows = []
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:
        for layout in args.layouts.split(","):
            path = Path(tmp) / f"{layout}.zarr"
            t_write = write(layout, path, args.batches)
            files = sum(1 for p in path.rglob("*") if p.is_file())
            code = args.per_batch_code if layout == "per-batch" and args.per_batch_code else root
            env_path = [str(code), str(root / "benchmarks")]
            out = subprocess.run(
                [sys.executable, "-c", CHILD, str(path)],
                capture_output=True, text=True, check=True,
                env={**__import__("os").environ, "PYTHONPATH": ":".join(env_path)},
            )  # fmt: skip
            r = json.loads(out.stdout.strip().splitlines()[-1])
            if code != root:
                layout += f" (opened by {code})"
            assert r["prompts"] == args.batches * BATCH
            rows.append([
                layout, f"{t_write:.1f} s", files, f"{r['open']:.2f} s", human(r["grown"]),
                human(r["traced"]), f"{r['checks']:.2f} s", f"{r['sum']:.2f} s",
            ])  # fmt: skip
            shutil.rmtree(path)
    header = ["layout", "write", "files", "open", "open: RSS grown", "open: traced",
              "open+checksums", "sum q"]  # fmt: skip
    print(table(rows, header))


if __name__ == "__main__":
    main()
