"""Bytes sent to and returned from the model side, and round trips, with remote="local".

remote="local" is nnsight's offline simulation of NDIF: every request is serialized exactly as
for the server (nnsight.schema.request.RequestModel.serialize), deserialized with non-installed
modules hidden, and run here. This script records the length of every serialized request (by
wrapping RequestModel.serialize), and the bytes of the values each request saves and returns
(the arrays qktrace's per-batch functions get back: sum of nbytes, and the size of
torch.save(values) as NDIF's response carries them, raw and zstd-compressed as nnsight does by
default, CONFIG.API.COMPRESS=True). One trace = one request = one round trip.

Workload, like the filter-heads covariance study: --prompts (default 2000) bullet lists of
--items (default 25) items drawn from 6 categories, ending "Which items in the list are
<category>?"; keys = the last token of each item (found with the tokenizer's offsets); query =
the last token; each key labelled (asked category, positive if the item belongs to it else
negative). Model: a random-weight Llama with d_head 128 like Llama-3.1-8B (default 2 layers,
d_model 128, 1 head of 128), all its heads captured (2 layers x 1 = 2 heads). Bytes scale
with the number of heads in every arm alike, so ratios do not depend on it; they do depend on
d_head (sums grow as d_head^2, raw q/k as d_head) and on the number of features.

Methods compared (every reduce arm is one call of qktrace.reduce):
  raw        qktrace.capture of q (last) and k (the 25 item keys), attention=False: full q/k
             come back and the covariance is summed here.
  reduce     q k^T (and q, k) summed in float64 inside each trace, one request per batch;
             each request returns [heads, 2 x features, d_head, d_head] sums. Run at
             --batch-sizes.
  session    reduce(batches_per_request=K): K traces in one nnsight session, summed on the
             model side; one request returns one set of sums (--session-batches K, 0 = all).
  session ΔC reduce(batches_per_request=K, delta=True): each pair weighted +1/n_positive or
             -1/n_negative of its feature, so the model side sums ΔC = C+ - C- itself and
             returns it (and the q and k sums) as float32 (--no-delta skips it).
  ΔC float16 the same with delta_dtype="float16": ΔC scaled per matrix and sent as float16
             (relative error < 2^-11 of each matrix's largest entry).
Labels travel as one int8 group index per key.

Checks every arm against the covariance computed here from the raw q/k. Prints figures only;
asserts nothing.
"""

from __future__ import annotations

import argparse
import importlib
import io
import time
from typing import Any

from _common import build_llama, human, machine, table, versions

CATEGORIES = {
    "fruit": ["apple", "banana", "cherry", "mango"],
    "animal": ["cat", "horse", "tiger", "eagle", "salmon", "robin", "shark"],
    "vehicle": ["truck", "bus", "train", "plane", "ship"],
    "country": ["France", "Spain", "Japan"],
    "drink": ["water", "milk", "juice"],
    "sport": ["tennis", "soccer", "golf"],
}


def build_prompts(
    tok: Any, n: int, n_items: int, seed: int = 0
) -> tuple[list[str], list[list[int]], list[list[tuple[str, str]]]]:
    """Bullet-list prompts, key positions (last token of each item) and (category, contrast) labels."""
    import random

    rng = random.Random(seed)
    names = list(CATEGORIES)
    pool = [(item, cat) for cat, items in CATEGORIES.items() for item in items]
    prompts, keys, labels = [], [], []
    for i in range(n):
        asked = names[i % len(names)]
        items = [rng.choice(pool) for _ in range(n_items)]
        text, spans = "", []
        for item, _ in items:
            text += "- "
            spans.append((len(text), len(text) + len(item)))
            text += item + "\n"
        text += f"Which items in the list are {asked}?"
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=True)
        offsets = enc["offset_mapping"]
        pos = []
        for start, end in spans:
            last = max(t for t, (a, b) in enumerate(offsets) if b > a and a < end and b > start)
            pos.append(last)
        prompts.append(text)
        keys.append(pos)
        labels.append([(asked, "positive" if cat == asked else "negative") for _, cat in items])
    return prompts, keys, labels


class Recorder:
    """Counts serialized requests and the values each qktrace batch function returns."""

    def __init__(self) -> None:
        self.requests: list[int] = []
        self.requests_zstd: list[int] = []
        self.results: list[list[Any]] = []

    def reset(self) -> None:
        self.__init__()

    def install(self, capture_mod: Any, reduce_mod: Any) -> None:
        import zstandard
        from nnsight.schema.request import RequestModel

        original = RequestModel.serialize

        def serialize(tracer: Any, compress: bool = False) -> bytes:
            blob = original(tracer, compress)
            self.requests.append(len(blob))
            raw = blob if not compress else zstandard.ZstdDecompressor().decompress(blob)
            self.requests_zstd.append(len(zstandard.ZstdCompressor(level=6).compress(raw)))
            return blob

        RequestModel.serialize = serialize  # a plain function on the class: called as RequestModel.serialize(tracer, ...)
        for mod, name in ((capture_mod, "_capture_batch"), (reduce_mod, "_reduce_batch")):
            fn = getattr(mod, name, None)
            if fn is None:
                raise RuntimeError(
                    f"{mod.__name__} has no {name} any more: point Recorder.install at the function "
                    "that runs one trace per batch and returns its saved values."
                )

            def wrapper(*a: Any, _fn: Any = fn, **k: Any) -> Any:
                out = _fn(*a, **k)
                values = list(out.values()) if isinstance(out, dict) else list(out)
                self.results.append(values)
                return out

            setattr(mod, name, wrapper)


def result_sizes(results: list[list[Any]]) -> tuple[int, int, int]:
    """(sum nbytes, torch.save bytes, zstd(torch.save) bytes) over all requests' returned values."""
    import numpy as np
    import torch
    import zstandard

    nbytes = saved = packed = 0
    comp = zstandard.ZstdCompressor(level=6)
    for values in results:
        arrays = [np.asarray(v) for v in values]
        nbytes += sum(a.nbytes for a in arrays)
        buf = io.BytesIO()
        torch.save(
            {f"v{i}": torch.from_numpy(np.ascontiguousarray(a)) for i, a in enumerate(arrays)},
            buf,
            pickle_protocol=4,
        )
        blob = buf.getvalue()
        saved += len(blob)
        packed += len(comp.compress(blob))
    return nbytes, saved, packed


def ranks(delta_c: Any) -> Any:
    """Rank of every ΔC [..., d, d] by the 99% rule of qktrace.verbs.decompose."""
    import numpy as np

    from qktrace.verbs.decompose import rank_for_threshold

    s = np.linalg.svd(delta_c, compute_uv=False)
    return np.array([rank_for_threshold(row) for row in s.reshape(-1, s.shape[-1])]).reshape(
        s.shape[:-1]
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--prompts", type=int, default=2000, help="number of prompts (default 2000)"
    )
    parser.add_argument(
        "--items", type=int, default=25, help="items (keys) per prompt (default 25)"
    )
    parser.add_argument(
        "--layers", type=int, default=2, help="model layers, all captured (default 2)"
    )
    parser.add_argument("--d-model", type=int, default=128, help="hidden size (default 128)")
    parser.add_argument("--heads", type=int, default=1, help="query heads per layer (default 1)")
    parser.add_argument("--kv-heads", type=int, default=1, help="key/value heads (default 1)")
    parser.add_argument(
        "--raw-batch", type=int, default=32, help="batch size of the raw arm (default 32)"
    )
    parser.add_argument(
        "--batch-sizes",
        default="32,256",
        help="batch sizes of the reduce arm, comma-separated (default 32,256)",
    )
    parser.add_argument(
        "--session-batch", type=int, default=64, help="batch size inside the session (default 64)"
    )
    parser.add_argument(
        "--session-batches",
        type=int,
        default=0,
        help="batches_per_request of the session arms; 0 = all in one request (default 0)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1, steadier on a shared machine; 0 = torch's default)",
    )
    parser.add_argument(
        "--no-delta",
        action="store_true",
        help="skip the 'session, delta=True' arm",
    )
    args = parser.parse_args()

    import numpy as np
    import torch

    capture_mod = importlib.import_module(
        "qktrace.verbs.capture"
    )  # the module behind qktrace.capture
    reduce_mod = importlib.import_module("qktrace.verbs.reduce")  # the module behind qktrace.reduce
    from qktrace.model.loading import load
    from qktrace.verbs.capture import capture
    from qktrace.verbs.reduce import reduce

    if args.threads:
        torch.set_num_threads(args.threads)
    net, tok = build_llama(
        layers=args.layers,
        d_model=args.d_model,
        n_heads=args.heads,
        n_kv_heads=args.kv_heads,
        d_ff=2 * args.d_model,
    )
    model = load(net, tokenizer=tok, remote="local")
    heads = [(layer, h) for layer in range(args.layers) for h in range(args.heads)]
    prompts, keys, labels = build_prompts(tok, args.prompts, args.items)
    features = list(dict.fromkeys(f for row in labels for f, _ in row))
    n_tokens = [len(tok(p)["input_ids"]) for p in prompts]
    d = model.d_head
    print("remote_bytes: request/result bytes and round trips with remote='local'")
    print(f"machine: {machine()}")
    print(f"versions: {versions()}")
    print(
        f"model: random Llama, {args.layers} layers, d_model {args.d_model}, {args.heads} heads / "
        f"{args.kv_heads} kv heads of d_head {d}; {len(heads)} heads captured"
    )
    print(
        f"workload: {len(prompts)} prompts, {args.items} keys each, {len(features)} features x 2 "
        f"contrasts = {2 * len(features)} groups, {np.mean(n_tokens):.0f} tokens per prompt "
        f"(min {min(n_tokens)}, max {max(n_tokens)})"
    )
    print(f"example prompt: {prompts[0][:60]!r} ... {prompts[0][-40:]!r}")

    rec = Recorder()
    rec.install(capture_mod, reduce_mod)
    rows = []
    runs: dict[str, Any] = {}

    def record(method: str, batch: int, seconds: float, extra: str = "") -> dict:
        nbytes, saved, packed = result_sizes(rec.results)
        r = {
            "method": method,
            "batch": batch,
            "requests": len(rec.requests),
            "req": sum(rec.requests),
            "req_zstd": sum(rec.requests_zstd),
            "req_mean": sum(rec.requests) / max(len(rec.requests), 1),
            "nbytes": nbytes,
            "saved": saved,
            "packed": packed,
            "seconds": seconds,
            "extra": extra,
        }
        rec.reset()
        return r

    with torch.inference_mode():
        # raw q/k
        rec.reset()
        t0 = time.perf_counter()
        raw = capture(
            model,
            prompts,
            heads,
            query="last",
            keys=keys,
            attention=False,
            batch_size=args.raw_batch,
            progress=False,
        )
        runs["raw"] = record("raw q/k (capture)", args.raw_batch, time.perf_counter() - t0)
        # covariance from the raw q/k, here
        qv, kv = raw.q.values[:, :, 0].astype(np.float64), raw.k.values.astype(np.float64)
        del raw
        ref = np.zeros((len(heads), len(features), 2, d, d))
        for p, row in enumerate(labels):
            for j, (feat, contrast) in enumerate(row):
                f, c = features.index(feat), int(contrast == "negative")
                ref[:, f, c] += np.einsum("hi,hj->hij", qv[p], kv[p, :, j])
        del qv, kv

        n_pos = np.array(
            [sum(lab == (f, "positive") for row in labels for lab in row) for f in features]
        )
        n_neg = np.array(
            [sum(lab == (f, "negative") for row in labels for lab in row) for f in features]
        )
        dc_ref = (
            ref[:, :, 0] / n_pos[None, :, None, None] - ref[:, :, 1] / n_neg[None, :, None, None]
        )

        per = args.session_batches
        arms = [(f"reduce{bs}", "reduce, one request per batch", bs, 1, False) for bs in
                [int(b) for b in args.batch_sizes.split(",")]]  # fmt: skip
        arms.append(
            ("session", "reduce, session (batches_per_request)", args.session_batch, per, False)
        )
        if not args.no_delta:
            arms.append(
                ("delta", "reduce, session, delta=True (ΔC float32)", args.session_batch, per, True)
            )
            arms.append(
                ("delta16", "reduce, session, delta_dtype=float16", args.session_batch, per, True)
            )
        for key, label, bs, per_request, delta in arms:
            t0 = time.perf_counter()
            sums = reduce(
                model,
                prompts,
                heads,
                labels,
                keys=keys,
                query="last",
                batch_size=bs,
                batches_per_request=per_request,
                delta=delta,
                delta_dtype="float16" if key == "delta16" else "float32",
                progress=False,
            )
            what = label if per_request == 1 else f"{label}={per_request or 'all'}"
            runs[key] = record(what, bs, time.perf_counter() - t0)
            if delta:
                got = sums.delta_c.sel(feature=features).values
                runs[key]["err"] = float(np.abs(got - dc_ref).max() / np.abs(dc_ref).max())
                runs[key]["ranks"] = ranks(got), ranks(dc_ref)
            else:
                got = sums.qk_sum.sel(feature=features).values
                runs[key]["err"] = float(np.abs(got - ref).max() / np.abs(ref).max())

    raw_bytes = runs["raw"]["nbytes"]
    for r in runs.values():
        rows.append(
            [
                r["method"],
                r["batch"],
                r["requests"],
                human(r["req"]),
                human(r["req_mean"]),
                human(r["req_zstd"]),
                human(r["nbytes"]),
                human(r["packed"]),
                f"{100 * r['nbytes'] / raw_bytes:.2f}%",
                f"{r['seconds']:.1f}",
                "" if "err" not in r else f"{r['err']:.1e}",
            ]
        )
    print()
    print(
        table(
            rows,
            [
                "method",
                "batch",
                "requests",
                "sent",
                "sent/request",
                "sent zstd",
                "returned",
                "returned zstd",
                "returned / raw",
                "s",
                "max rel err vs raw",
            ],
        )
    )
    G = 2 * len(features)
    per_request = len(heads) * G * (d * d + 2 * d) * 8
    per_delta = len(heads) * (len(features) * d * d + 2 * G * d) * 4
    raw_per_prompt = raw_bytes / len(prompts)
    print(
        f"\nreturned per reduce request = heads x groups x (d_head^2 + 2 d_head) x 8 B = "
        f"{len(heads)} x {G} x ({d}^2 + 2x{d}) x 8 = {human(per_request)}, whatever its batch size;"
        f" raw q/k returns {human(raw_per_prompt)} per prompt (float32, 1 query + {args.items} keys"
        f" per head)."
    )
    print(
        f"one request of sums returns fewer bytes than raw once it covers > "
        f"{per_request / raw_per_prompt:.0f} prompts, and <= 1% of raw once it covers >= "
        f"{per_request / (0.01 * raw_per_prompt):.0f} prompts (a batch that big, or a session)."
    )
    print(
        f"delta=True returns heads x (features x d_head^2 + groups x 2 d_head) x 4 B (float32) = "
        f"{human(per_delta)} per request: "
        f"<= 1% of raw once one request covers >= {per_delta / (0.01 * raw_per_prompt):.0f} prompts."
    )
    for r in runs.values():
        if "ranks" in r:
            got, want = r["ranks"]
            print(
                f"{r['method']}: ranks at the 0.99 rule {got.ravel().tolist()} "
                f"(from raw q/k: {want.ravel().tolist()}), "
                f"{int((got == want).sum())}/{got.size} equal"
            )
    best = min((r for k, r in runs.items() if k != "raw"), key=lambda r: r["nbytes"])
    ratio = best["nbytes"] / raw_bytes
    print(
        f"goal: reduction returns <= 1% of raw bytes: best {best['method']} batch {best['batch']}: "
        f"{100 * ratio:.2f}% in {best['requests']} request(s) ({'met' if ratio <= 0.01 else 'NOT met'})"
    )
    print(
        "round trips: "
        + ", ".join(f"{r['method']} (batch {r['batch']}): {r['requests']}" for r in runs.values())
    )


if __name__ == "__main__":
    main()
