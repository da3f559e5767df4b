"""What does `capture(out=)` cost over `capture()` in memory, writing each batch vs holding them?

Model: the shipped organism (3-layer Llama, ``data/organism``; no download) or, with
``--random L,D,H,KV``, a random-weight Llama of that shape. Prompts: organism boxes prompts (2-5
boxes), captured at the organism's binding heads with query "last" and keys "all".

Arms (each timed as the median over --repeats rounds, interleaved round by round so machine
noise hits them alike, after one untimed round):

  memory   capture(...) with no out=: the batches concatenated in memory
  each     capture(..., out=) with qktrace.verbs.capture.WRITE_EVERY_S = 0: one zarr write and one manifest
           commit per batch (what capture(out=) did before the batches were held)
  held     capture(..., out=) as shipped: batches held and written at most every WRITE_EVERY_S
           seconds or WRITE_BUFFER_MIB, and at the end

Each out= arm writes a fresh store (deleted after the round) and returns it opened lazily, as
capture does; nothing is loaded back. A breakdown per arm (medians over the rounds) splits the
call into the traced forwards (`_capture_batch`), the writes (`BatchWriter.flush`), and the rest.
Prints figures only; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from typing import Any

from _common import build_llama, machine, table, versions


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=320, help="prompts (default 320)")
    parser.add_argument("--batch", type=int, default=16, help="prompts per batch (default 16)")
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    parser.add_argument(
        "--random",
        default=None,
        metavar="L,D,H,KV",
        help="a random Llama with L layers, d_model D, H heads, KV kv heads instead of the "
        "organism; captures all heads of its last layer",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1; 0 = torch's default)"
    )
    args = parser.parse_args()

    import numpy as np
    import torch

    import qktrace
    import qktrace.verbs.capture as qk
    from qktrace import organism
    from qktrace.organism.data import boxes_prompts
    from qktrace.store import BatchWriter

    if args.threads:
        torch.set_num_threads(args.threads)
    texts = [p.text for p in boxes_prompts(np.random.default_rng(0), args.prompts, [2, 3, 4, 5])]
    if args.random:
        layers, d_model, n_heads, n_kv = (int(x) for x in args.random.split(","))
        net, tok = build_llama(layers=layers, d_model=d_model, n_heads=n_heads, n_kv_heads=n_kv)
        model = qktrace.load(net, tokenizer=tok)
        heads = [(layers - 1, h) for h in range(n_heads)]
        what = f"random Llama {args.random} (L,D,H,KV), all {n_heads} heads of layer {layers - 1}"
    else:
        model = qktrace.load(organism.path())
        heads = organism.heads("binding")
        what = f"organism ({organism.path()}), heads {heads}"

    print("capture_writes: capture(out=) vs capture() in memory")
    print(f"machine: {machine()}")
    print(f"versions: {versions()}")
    print(
        f"model: {what}; {args.prompts} prompts, batch {args.batch}; repeats {args.repeats}; "
        f"WRITE_EVERY_S {qk.WRITE_EVERY_S}, WRITE_BUFFER_MIB {qk.WRITE_BUFFER_MIB}"
    )

    spent: dict[str, float] = {}

    def timed(owner: Any, name: str, key: str) -> None:
        real = getattr(owner, name)

        def wrapper(*a: Any, **k: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return real(*a, **k)
            finally:
                spent[key] = spent.get(key, 0.0) + time.perf_counter() - t0

        setattr(owner, name, wrapper)

    timed(qk, "_capture_batch", "forward")
    timed(BatchWriter, "flush", "write")
    every = qk.WRITE_EVERY_S

    def call(out_every: float | None) -> None:
        if out_every is None:
            qktrace.capture(model, texts, heads, keys="all", batch_size=args.batch, progress=False)
            return
        qk.WRITE_EVERY_S = out_every
        folder = tempfile.mkdtemp()
        try:
            qktrace.capture(
                model, texts, heads, keys="all", batch_size=args.batch, progress=False,
                out=os.path.join(folder, "c.zarr"),
            )  # fmt: skip
        finally:
            qk.WRITE_EVERY_S = every
            shutil.rmtree(folder)

    arms = {
        "memory": ("capture() in memory", None),
        "each": ("capture(out=), one write per batch (before)", 0.0),
        "held": (f"capture(out=), held, written every {every:g} s (now)", every),
    }
    wall: dict[str, list[float]] = {a: [] for a in arms}
    cpu: dict[str, list[float]] = {a: [] for a in arms}
    parts: dict[str, list[dict[str, float]]] = {a: [] for a in arms}
    for _, out_every in arms.values():
        call(out_every)
    load_before = os.getloadavg()
    for _ in range(args.repeats):
        for arm, (_, out_every) in arms.items():
            spent.clear()
            t0, c0 = time.perf_counter(), time.process_time()
            call(out_every)
            wall[arm].append(time.perf_counter() - t0)
            cpu[arm].append(time.process_time() - c0)
            parts[arm].append(dict(spent))
    load_after = os.getloadavg()

    med = statistics.median
    base, base_cpu = med(wall["memory"]), med(cpu["memory"])
    rows = []
    for arm, (label, _) in arms.items():
        forward = med(p.get("forward", 0.0) for p in parts[arm])
        write = med(p.get("write", 0.0) for p in parts[arm])
        rows.append(
            [
                arm,
                label,
                f"{med(wall[arm]):.2f}",
                f"{min(wall[arm]):.2f}-{max(wall[arm]):.2f}",
                f"{med(wall[arm]) / base:.2f}",
                f"{med(cpu[arm]):.2f}",
                f"{med(cpu[arm]) / base_cpu:.2f}",
                f"{forward:.2f}",
                f"{write:.2f}",
            ]
        )
    print()
    print(
        table(
            rows,
            [
                "arm", "what", "wall s (median)", "wall range", "x memory", "CPU s (median)",
                "x memory (CPU)", "forwards s", "writes s",
            ],
        )
    )  # fmt: skip
    print(
        "load average (1, 5, 15 min): before "
        + ", ".join(f"{x:.2f}" for x in load_before)
        + "; after "
        + ", ".join(f"{x:.2f}" for x in load_after)
    )
    print(
        "(forwards s: the traced forwards, qk._capture_batch; writes s: BatchWriter.flush, the "
        "zarr writes and manifest commits; CPU = time.process_time of this process)"
    )


if __name__ == "__main__":
    main()
