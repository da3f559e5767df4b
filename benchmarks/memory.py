"""Peak memory of qktrace.reduce and of batch-by-batch capture to zarr: does it grow with prompts?

Each measurement runs in its own fresh Python process (so peaks are clean) on a tiny random-weight
Llama (2 layers, d_model 64, 4 heads / 2 kv heads of 16; see qktrace.model.testing) with short random
token-id prompts (default 24 tokens) and all 8 heads. A child process first builds the model and
ALL prompts/labels (inputs are O(prompts) by nature and not what is measured), records its
resident set size (RSS), then runs the arm and reports:

  peak RSS - RSS before   resource.getrusage(RUSAGE_SELF).ru_maxrss minus /proc/self/status
                          VmRSS just before the arm: everything the arm added at its worst
                          (torch buffers, numpy, Python objects, zarr/numcodecs buffers)
  tracemalloc peak        Python and numpy allocations traced during the arm (torch's own CPU
                          allocator is invisible to tracemalloc)
  retained                tracemalloc current at the end, minus the result the arm returns

Arms:
  reduce     qktrace.reduce of N prompts, 8 labelled keys per prompt over 4 features.
             Goal: flat in N (peak ratio N=10k / N=1k <= 1.1).
  reduce-out the same with out=<zarr path> checkpointing after every batch (--with-out).
  capture    qktrace.capture(..., out=<zarr path>) (query last, keys all, attention=True):
             capture appends its batches to the store (qktrace.store.BatchWriter, holding them
             between writes: qktrace.verbs.capture.WRITE_EVERY_S) and returns the store opened lazily. Goal: bounded by about one batch plus
             what it holds between writes (qktrace.verbs.capture.WRITE_BUFFER_MIB, and a copy while writing).
  capture-loop  a loop calling qktrace.capture on one batch at a time and appending each batch
             with qktrace.store.BatchWriter (xarray to_zarr append if that is missing): the
             bound a caller can reach without capture(out=) (--capture-loop).
  capture-all  qktrace.capture of all N prompts in memory, then store.save: the O(N)
             reference (--capture-all).
  intervene  qktrace.intervene of head 1.1 (swap of the keys at positions 2 and -2 in a random
             rank-4 subspace, 10 random baselines): it streams batches, so beyond its per-prompt
             results (a few numbers a prompt) it should hold about one batch.

Reduce runs at --sizes (default 1k and 10k prompts); the capture and intervene arms at --capture-sizes
(default 500 and 2000, to keep the default run near 3 minutes on 2 cores).

Prints figures only; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

from _common import human, machine, table, versions


def rss_now() -> int:
    """Current resident set size in bytes (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


# arms whose result is held in memory (not in a store): "retained" does not count it
RESULT_HELD = ("reduce", "reduce-out", "intervene")


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ------------------------------------------------------------------------------------------
# child


def child(
    arm: str, n: int, tokens: int, batch: int, use_tracemalloc: bool, workdir: str, threads: int
) -> dict:
    import numpy as np
    import torch

    if threads:
        torch.set_num_threads(threads)

    import qktrace.model.testing as testing
    from qktrace.model.loading import load
    from qktrace.verbs.capture import capture
    from qktrace.verbs.reduce import reduce

    net, tok = testing.model("llama")
    model = load(net, tokenizer=tok)
    heads = [(layer, h) for layer in range(model.n_layers) for h in range(model.n_heads)]
    rng = np.random.default_rng(0)
    prompts = rng.integers(8, len(tok), size=(n, tokens)).tolist()
    key_pos = [sorted(rng.choice(tokens - 1, size=8, replace=False).tolist()) for _ in range(n)]
    feats = ["fruit", "animal", "vehicle", "country"]
    labels = [
        [(feats[(i + j) % 4], "positive" if (i + j) % 3 else "negative") for j in range(8)]
        for i in range(n)
    ]
    # warm up (first .source access rewrites the attention forward, imports, allocator)
    with torch.inference_mode():
        reduce(
            model,
            prompts[:batch],
            heads,
            labels[:batch],
            keys=key_pos[:batch],
            batch_size=batch,
            progress=False,
        )
        warm = capture(model, prompts[:batch], heads, keys="all", batch_size=batch, progress=False)
    one_batch = warm.nbytes
    # also warm the zarr write path (imports of zarr/numcodecs, codec buffers), so the arm's
    # peak shows what it holds, not one-off import costs
    from qktrace import store

    store.save(warm, Path(workdir) / f"warm-{arm}-{n}.zarr")
    if hasattr(store, "BatchWriter"):
        writer = store.BatchWriter(Path(workdir) / f"warmb-{arm}-{n}.zarr", params={"warm": 1})
        writer.append(warm)
        store.open(writer.path)
    del warm
    out = Path(workdir) / f"{arm}-{n}.zarr"
    info: dict = {}

    before = rss_now()
    if use_tracemalloc:
        tracemalloc.start()
    t0 = time.perf_counter()
    with torch.inference_mode():
        if arm in ("reduce", "reduce-out"):
            result = reduce(
                model,
                prompts,
                heads,
                labels,
                keys=key_pos,
                batch_size=batch,
                progress=False,
                out=out if arm == "reduce-out" else None,
            )
            result_bytes = result.nbytes
        elif arm == "capture":
            import inspect

            if "out" in inspect.signature(capture).parameters:
                real_open = store.open

                def open_recorded(*a, **k):  # capture(out=) ends by opening the store lazily
                    info["peak_before_open"] = peak_rss() - before
                    if use_tracemalloc:
                        info["tracemalloc_before_open"] = tracemalloc.get_traced_memory()[1]
                    t_open = time.perf_counter()
                    opened = real_open(*a, **k)
                    info["open_s"] = time.perf_counter() - t_open
                    return opened

                store.open = open_recorded
                ds = capture(
                    model, prompts, heads, keys="all", batch_size=batch, progress=False, out=out
                )
                store.open = real_open
                result_bytes = 0
                info["writer"] = "capture(out=...) (BatchWriter inside); result opened lazily"
                del ds
            else:
                result_bytes, info = capture_to_zarr(model, prompts, heads, batch, out)
        elif arm == "capture-loop":
            result_bytes, info = capture_to_zarr(model, prompts, heads, batch, out)
        elif arm == "intervene":
            from qktrace.verbs.intervene import intervene

            basis = np.linalg.qr(rng.normal(size=(model.d_head, 4)))[0]
            ds = intervene(
                model, prompts, "1.1", basis, orig=[2] * n, target=[-2] * n, random=10,
                batch_size=batch, progress=False,
            )  # fmt: skip
            result_bytes = ds.nbytes
            info["writer"] = "intervene() in memory (its per-prompt results are the result)"
        elif arm == "capture-all":
            from qktrace.store import io as store

            ds = capture(model, prompts, heads, keys="all", batch_size=batch, progress=False)
            result_bytes = ds.nbytes
            store.save(ds, out)
            info["writer"] = "capture() of all prompts, then store.save"
        else:
            raise ValueError(arm)
    seconds = time.perf_counter() - t0
    traced_peak = traced_now = 0
    if use_tracemalloc:
        traced_now, traced_peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    peak = peak_rss()
    disk = sum(f.stat().st_size for f in out.rglob("*") if f.is_file()) if out.exists() else 0
    return {
        "arm": arm,
        "n": n,
        "seconds": seconds,
        "rss_before": before,
        "peak_rss": peak,
        "peak_minus_before": peak - before,
        "tracemalloc_peak": traced_peak,
        "retained": traced_now - (result_bytes if arm in RESULT_HELD else 0),
        "result_bytes": result_bytes,
        "disk_bytes": disk,
        "one_batch_bytes": one_batch,
        **info,
    }


def capture_to_zarr(model, prompts, heads, batch, out):
    """capture() one batch at a time, appending each batch Dataset to a zarr store."""
    from qktrace.model.loading import iter_batches
    from qktrace.verbs.capture import capture

    try:
        from qktrace.store import BatchWriter
    except ImportError:
        BatchWriter = None
    if BatchWriter is not None:
        writer = BatchWriter(out, params={"n": len(prompts), "batch": batch})
        how = "qktrace.store.BatchWriter.append per batch"
    else:
        writer = None
        how = "xarray to_zarr(append_dim='prompt') per batch"
    write_s, n_batches = 0.0, 0
    for start, chunk in iter_batches(prompts, batch):
        ds = capture(model, chunk, heads, keys="all", batch_size=batch, progress=False)
        ds = ds.assign_coords(prompt=ds.prompt + start)
        t0 = time.perf_counter()
        if writer is not None:
            writer.append(ds)
        else:
            ds = ds.drop_vars([v for v in ds.variables if ds[v].dtype == object])
            ds.to_zarr(out, mode="a" if start else "w", append_dim="prompt" if start else None)
        write_s += time.perf_counter() - t0
        n_batches += 1
        del ds
    if writer is not None:
        writer.finalize()
    return 0, {"writer": how, "write_s": write_s, "n_batches": n_batches}


# ------------------------------------------------------------------------------------------
# parent


def run_child(arm: str, n: int, args: argparse.Namespace, workdir: str) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        arm,
        "--n",
        str(n),
        "--tokens",
        str(args.tokens),
        "--batch",
        str(args.batch),
        "--workdir",
        workdir,
        "--threads",
        str(args.threads),
    ]
    if args.no_tracemalloc:
        cmd.append("--no-tracemalloc")
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child {arm} n={n} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="1000,10000", help="prompt counts (default 1000,10000)")
    parser.add_argument(
        "--arms",
        default="reduce,capture",
        help="arms, comma-separated: reduce, reduce-out, capture, capture-all, intervene "
        "(default reduce,capture)",
    )
    parser.add_argument(
        "--capture-sizes",
        default="500,2000",
        help="prompt counts for the capture and intervene arms (default 500,2000)",
    )
    parser.add_argument("--with-out", action="store_true", help="add the reduce-out arm")
    parser.add_argument(
        "--capture-loop",
        action="store_true",
        help="add the capture-loop arm (per-batch capture() calls + BatchWriter)",
    )
    parser.add_argument(
        "--capture-all",
        action="store_true",
        help="add the capture-all arm (all prompts in one capture() call: grows with N)",
    )
    parser.add_argument("--tokens", type=int, default=24, help="tokens per prompt (default 24)")
    parser.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    parser.add_argument(
        "--no-tracemalloc",
        action="store_true",
        help="skip tracemalloc (faster; RSS figures only)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads in each child (default 1; 0 = torch's default)",
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        print(
            json.dumps(
                child(
                    args.child,
                    args.n,
                    args.tokens,
                    args.batch,
                    not args.no_tracemalloc,
                    args.workdir,
                    args.threads,
                )
            )
        )
        return

    sizes = [int(s) for s in args.sizes.split(",")]
    arms = [a for a in args.arms.split(",") if a]
    if args.with_out and "reduce-out" not in arms:
        arms.append("reduce-out")
    if args.capture_loop and "capture-loop" not in arms:
        arms.append("capture-loop")
    if args.capture_all and "capture-all" not in arms:
        arms.append("capture-all")
    capture_sizes = [int(s) for s in args.capture_sizes.split(",")]
    print("memory: peak memory of qktrace.reduce and of batch-by-batch capture to zarr")
    print(f"machine: {machine()} (this parent process)")
    print(f"versions: {versions()}")
    print(
        f"model: tiny random Llama (2 layers, d_model 64, 4 heads / 2 kv of 16), all 8 heads; "
        f"prompts of {args.tokens} random tokens; batch {args.batch}; each arm in a fresh process "
        f"with {args.threads or 'default'} torch thread(s)"
    )
    workdir = tempfile.mkdtemp(prefix="qktrace-mem-")
    results = []
    try:
        for arm in arms:
            for n in sizes if arm.startswith("reduce") else capture_sizes:
                r = run_child(arm, n, args, workdir)
                results.append(r)
                print(
                    f"  {arm:<11} n={n:<6} {r['seconds']:6.1f} s  peak-before "
                    f"{human(r['peak_minus_before'])}",
                    flush=True,
                )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    rows = []
    for r in results:
        rows.append(
            [
                r["arm"],
                r["n"],
                f"{r['seconds']:.1f}",
                human(r["rss_before"]),
                human(r["peak_minus_before"]),
                human(r["tracemalloc_peak"]) if not args.no_tracemalloc else "-",
                human(r["retained"]) if not args.no_tracemalloc else "-",
                human(r["result_bytes"]) if r["result_bytes"] else "-",
                human(r.get("one_batch_bytes", 0)) if r.get("one_batch_bytes") else "-",
                human(r["disk_bytes"]) if r["disk_bytes"] else "-",
            ]
        )
    print()
    print(
        table(
            rows,
            [
                "arm",
                "prompts",
                "s",
                "RSS before",
                "peak-before",
                "tracemalloc peak",
                "retained",
                "result",
                "one batch",
                "on disk",
            ],
        )
    )
    print()
    for arm in arms:
        rs = [r for r in results if r["arm"] == arm]
        if len(rs) < 2:
            continue
        lo, hi = rs[0], rs[-1]
        ratio = hi["peak_minus_before"] / max(lo["peak_minus_before"], 1)
        line = (
            f"{arm}: peak-before n={hi['n']} / n={lo['n']} = {ratio:.2f}"
            f" (absolute peak RSS {human(hi['peak_rss'])} / {human(lo['peak_rss'])} = "
            f"{hi['peak_rss'] / lo['peak_rss']:.2f})"
        )
        if not args.no_tracemalloc:
            t_ratio = hi["tracemalloc_peak"] / max(lo["tracemalloc_peak"], 1)
            line += f"; tracemalloc peak ratio {t_ratio:.2f}"
        if arm.startswith("reduce"):
            line += f"  [goal <= 1.1: {'met' if ratio <= 1.1 else 'NOT met'}]"
        if arm.startswith("capture") and hi.get("one_batch_bytes"):
            line += f"; peak-before / one batch Dataset = {hi['peak_minus_before'] / hi['one_batch_bytes']:.1f}"
        print(line)
        for r in rs:
            if "writer" in r:
                print(f"  ({arm} writes with: {r['writer']})")
                break
        for r in rs:
            if "peak_before_open" in r:
                traced = r.get("tracemalloc_before_open")
                print(
                    f"  ({arm} n={r['n']}: while writing batches, peak-before "
                    f"{human(r['peak_before_open'])}"
                    + (f", tracemalloc peak {human(traced)}" if traced is not None else "")
                    + f" = {r['peak_before_open'] / r['one_batch_bytes']:.1f} x one batch Dataset;"
                    f" then opening the store lazily took {r['open_s']:.1f} s)"
                )
        for r in rs:
            if r.get("n_batches"):
                print(
                    f"  ({arm} n={r['n']}: {r['write_s']:.1f} s of {r['seconds']:.1f} s spent writing "
                    f"{r['n_batches']} batches, {1e3 * r['write_s'] / r['n_batches']:.0f} ms per batch)"
                )


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
