"""The three studies on a real NDIF server on 127.0.0.1 (qktrace.ndif_local) against local runs.

Per study (SmolLM2-135M-Instruct, small sizes, head 17.3 given so no head search runs): the
requests sent, the bytes over the wire (request payloads as POSTed, results as downloaded from
the object store or received on the socket, zstd-compressed as nnsight sends them), and the
wall time with remote=True and with remote=False in this process, on the same CPUs. The
server's overhead is the difference, per request: queueing, (de)serializing, the websocket
status stream, the object-store round trip. Both sides run float32 on CPU, so the model's own
compute costs the same on each.

Bytes are counted by wrapping nnsight's RemoteBackend._post (the request blob) and
RemoteBackend.finalize (the result bytes, however they arrived). Prints figures only.

    python benchmarks/ndif_local.py            # starts its own server, stops it at the end
    python benchmarks/ndif_local.py --host http://127.0.0.1:PORT   # a running one
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _common import human, machine, table, versions

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
STUDIES = {
    "order_id": dict(n_prompts=32, n_test=16, n_pairs=3),
    "lexical": dict(n_prompts=32, n_test=16, n_pairs=3),
    "filter_heads": dict(n_prompts=32, n_test=16),
}
COMMON = dict(heads="17.3", n_random=2, n_random_answers=1, batch_size=8, figures=False,
              progress=False)  # fmt: skip


class Wire:
    """Counts requests and bytes through nnsight's remote backend."""

    def __init__(self) -> None:
        from nnsight.intervention.backends.remote import RemoteBackend

        self.requests = self.sent = self.received = 0
        post, finalize = RemoteBackend._post, RemoteBackend.finalize
        wire = self

        def counted_post(backend, request, blob):
            wire.requests += 1
            wire.sent += len(blob)
            return post(backend, request, blob)

        def counted_finalize(backend, content):
            wire.received += len(content)
            return finalize(backend, content)

        RemoteBackend._post, RemoteBackend.finalize = counted_post, counted_finalize

    def reset(self) -> None:
        self.requests = self.sent = self.received = 0


def run_study(name: str, remote: bool | str, out: Path) -> float:
    import importlib

    module = importlib.import_module(f"qktrace.studies.{name}")
    started = time.perf_counter()
    module.run(HUB_ID, out=out, remote=remote, **COMMON, **STUDIES[name])
    return time.perf_counter() - started


def latency(repeats: int) -> list[list[str]]:
    """Median wall time of one small request (capture of 1 prompt, 2 heads), per mode."""
    import statistics

    import qktrace
    from qktrace.verbs.capture import capture

    rows = []
    for mode in (True, "local", False):
        model = qktrace.load(HUB_ID, remote=mode)
        capture(model, ["The apple is in Box A"], "17.3,18.6", progress=False)  # warm
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            capture(model, ["The apple is in Box A"], "17.3,18.6", progress=False)
            times.append(time.perf_counter() - started)
        rows.append([repr(mode), f"{statistics.median(times):.3f}", f"{min(times):.3f}"])
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", help="a running NDIF (default: start one here)")
    parser.add_argument("--studies", default=",".join(STUDIES), help="comma-separated; '' none")
    parser.add_argument("--repeats", type=int, default=10, help="small requests timed per mode")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import huggingface_hub.constants as hub

    from qktrace.ndif_local import model_cache
    from qktrace.ndif_local.server import LocalNDIF

    server = None
    if args.host is None:
        server = LocalNDIF(run_dir=Path(tempfile.mkdtemp(prefix="ndif-bench-")))
        started = time.perf_counter()
        args.host = server.start(log=lambda line: None)
        print(f"server up in {time.perf_counter() - started:.0f} s at {args.host}")
    hf_hub = str(model_cache.hub_cache(LocalNDIF().hf_home))
    os.environ.update(NDIF_HOST=args.host, HF_HUB_CACHE=hf_hub)
    hub.HF_HUB_CACHE, hub.HF_HUB_OFFLINE = hf_hub, True
    print(machine())
    print(versions())
    wire = Wire()
    rows = []
    try:
        small = latency(args.repeats)
        for name in filter(None, args.studies.split(",")):
            with tempfile.TemporaryDirectory() as folder:
                wire.reset()
                remote = run_study(name, True, Path(folder) / "remote")
                n = max(wire.requests, 1)
                simulated = run_study(name, "local", Path(folder) / "simulated")
                local = run_study(name, False, Path(folder) / "local")
            rows.append([
                name, str(n), human(wire.sent), human(wire.received), f"{remote:.1f}",
                f"{simulated:.1f}", f"{local:.1f}", f"{(remote - simulated) / n:.2f}",
            ])  # fmt: skip
    finally:
        if server is not None:
            server.stop()
    header = ["study", "requests", "sent", "received", "remote s", "remote-local s",
              "local s", "server overhead s/request"]  # fmt: skip
    print(f"one small request (capture, 1 prompt, 2 heads), {args.repeats} repeats:")
    print(table(small, ["remote=", "median s", "min s"]))
    print(table(rows, header))
    print(f"sizes: {STUDIES}; {COMMON}")


if __name__ == "__main__":
    main()
