"""How much slower is a forward pass when qktrace captures or reduces q/k, versus plain torch?

Model: a random-weight Llama-architecture LM (default 8 layers, d_model 512, 8 query heads of 64,
2 key/value heads), batch 32 x 64 random tokens, CPU, one attention implementation for every arm.
Inputs are token-id tensors / lists, so no arm tokenizes text.

Arms (all under torch.inference_mode; each timed as the median over --repeats rounds, arms
interleaved round by round so machine noise hits them alike, after --warmup untimed rounds):

  a   bare HF forward                 net(input_ids, attention_mask, position_ids)
  a0  the same, before qktrace/nnsight ever touched the model (a `.source` access rewrites
      the attention forward for good; a0 vs a shows whether that costs anything)
  b   bare forward + torch forward hooks on q_proj/k_proj of two layers, selecting the last
      query and all keys of every head and copying them to numpy (pre-RoPE: plain hooks
      cannot reach post-RoPE q/k)
  n   nnsight trace of the same batch with no intervention (nnsight's floor)
  s   nnsight trace reading the two layers' attention-call inputs through `.source` and
      saving the raw q/k tensors (no gather): nnsight's cost of reaching post-RoPE q/k
  c   qktrace.capture: all heads of the two layers, query "last", keys "all", attention=False,
      one batch, result as an xarray Dataset
  cA  the same with attention=True (also logits and attention weights of the chosen query)
  d   qktrace.reduce: in-trace float64 q k^T sums for the same heads, every key labelled with
      one of 2 features x positive/negative (ops.qk_sums: keys summed per group first, then
      one contraction with the queries)
  d0  the same with ops.qk_sums swapped for the single 3-operand einsum qktrace used before
      ('bkg,bhi,bhkj->hgij'): the "before" figure of that fix, measured in the same run

Then a breakdown of one qktrace.capture call (the functions it calls, wrapped with timers), and,
with --profile, a cProfile of capture. Prints figures only; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import cProfile
import importlib
import io
import pstats
import statistics
import time
from typing import Any

from _common import build_llama, machine, median_time, table, versions


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=8, help="decoder layers (default 8)")
    parser.add_argument("--d-model", type=int, default=512, help="hidden size (default 512)")
    parser.add_argument("--heads", type=int, default=8, help="query heads (default 8)")
    parser.add_argument("--kv-heads", type=int, default=2, help="key/value heads (default 2)")
    parser.add_argument("--batch", type=int, default=32, help="prompts per batch (default 32)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per prompt (default 64)")
    parser.add_argument(
        "--capture-layers", default="2,5", help="the two (or more) layers captured (default 2,5)"
    )
    parser.add_argument(
        "--attn",
        choices=["eager", "sdpa"],
        default="eager",
        help="attention implementation for all arms (default eager)",
    )
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds per arm (default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first (default 2)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1; 0 = torch's default). With 2+ threads on a machine whose "
        "cores other processes also use, every parallel region waits for a descheduled thread and "
        "single forwards vary 5-30x; one thread gives stable ratios",
    )
    parser.add_argument(
        "--arms",
        default="a,b,n,s,c,cA,d,d0",
        help="arms to time, comma-separated, from a,b,n,s,c,cA,d,d0 (default all)",
    )
    parser.add_argument("--profile", action="store_true", help="also print a cProfile of capture")
    args = parser.parse_args()

    import nnsight
    import numpy as np
    import torch

    capture_mod = importlib.import_module(
        "qktrace.verbs.capture"
    )  # the module behind qktrace.capture
    batching_mod = importlib.import_module("qktrace.run.batching")  # tokenizing and batch planning
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
        attn=args.attn,
    )
    layers = [int(x) for x in args.capture_layers.split(",")]
    B, T, H, KV = args.batch, args.tokens, args.heads, args.kv_heads
    D = args.d_model // H
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(8, len(tok), (B, T), generator=gen)
    inputs = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "position_ids": torch.arange(T)[None].expand(B, -1).contiguous(),
    }
    id_lists = ids.tolist()
    heads = [(layer, h) for layer in layers for h in range(H)]
    labels = [
        [(f"f{(i + j) % 2}", "positive" if (i * 7 + j) % 3 else "negative") for j in range(T)]
        for i in range(B)
    ]
    n_params = sum(p.numel() for p in net.parameters())

    print("capture_overhead: qktrace capture/reduce vs a bare forward")
    print(f"machine: {machine()}")
    print(f"versions: {versions()}")
    print(
        f"model: random Llama, {args.layers} layers, d_model {args.d_model}, {H} heads / {KV} kv "
        f"heads of {D}, {n_params / 1e6:.1f}M params, attn={args.attn}; batch {B} x {T} tokens; "
        f"captured layers {layers} (all {H} heads each: {len(heads)} heads)"
    )
    print(f"repeats {args.repeats} (median), warmup {args.warmup}")

    # ---- arms -----------------------------------------------------------------------------
    def bare() -> Any:
        return net(**inputs).logits

    attn_mods = [net.model.layers[layer].self_attn for layer in layers]

    def hooked() -> Any:
        got: dict[tuple[int, str], torch.Tensor] = {}
        handles = []
        for layer, mod in zip(layers, attn_mods, strict=True):

            def q_hook(_m, _i, out, layer=layer):  # last query of every head
                got[layer, "q"] = out.view(B, T, H, D)[:, -1:].transpose(1, 2)

            def k_hook(_m, _i, out, layer=layer):  # all keys, expanded to query heads (GQA)
                k = out.view(B, T, KV, D).transpose(1, 2)
                got[layer, "k"] = k.repeat_interleave(H // KV, dim=1)

            handles += [
                mod.q_proj.register_forward_hook(q_hook),
                mod.k_proj.register_forward_hook(k_hook),
            ]
        try:
            net(**inputs)
        finally:
            for h in handles:
                h.remove()
        q = np.concatenate([got[layer, "q"].numpy() for layer in layers], axis=1)
        k = np.concatenate([got[layer, "k"].numpy() for layer in layers], axis=1)
        return q, k

    with torch.inference_mode():
        for _ in range(args.warmup):
            bare()
        pristine = []
        pristine_cpu = []
        for _ in range(args.repeats):
            t0, c0 = time.perf_counter(), time.process_time()
            bare()
            pristine.append(time.perf_counter() - t0)
            pristine_cpu.append(time.process_time() - c0)

    model = load(net, tokenizer=tok)
    lm = model.lm

    def nnsight_empty() -> Any:
        with lm.trace(inputs):
            out = lm.output.save()
        return out

    reads = [model.attention_inputs(layer) for layer in layers]

    def nnsight_raw() -> Any:
        with lm.trace(inputs):
            raw = nnsight.save([])
            for read in reads:
                q, k, _ = read.read()
                raw.append([q, k])
        return [[t.numpy() for t in pair] for pair in raw]

    def qk_capture(attention: bool) -> Any:
        return capture(
            model,
            id_lists,
            heads,
            query="last",
            keys="all",
            attention=attention,
            batch_size=B,
            progress=False,
        )

    def qk_reduce() -> Any:
        return reduce(
            model,
            id_lists,
            heads,
            labels,
            keys="all",
            query="last",
            batch_size=B,
            progress=False,
        )

    from qktrace.core import ops as qk_ops

    def qk_sums_one_einsum(q_sel: Any, k_sel: Any, weights: Any) -> Any:
        """ops.qk_sums as it was before: one 3-operand einsum (36x slower on CPU)."""
        g64, q64, k64 = weights.to(torch.float64), q_sel.to(torch.float64), k_sel.to(torch.float64)
        return torch.einsum("bkg,bhi,bhkj->hgij", g64, q64, k64)

    def qk_reduce_before() -> Any:
        original = qk_ops.qk_sums
        qk_ops.qk_sums = qk_sums_one_einsum
        try:
            return qk_reduce()
        finally:
            qk_ops.qk_sums = original

    arms = {
        "a": ("bare HF forward", bare),
        "b": ("torch hooks q_proj/k_proj -> numpy", hooked),
        "n": ("nnsight trace, no intervention", nnsight_empty),
        "s": ("nnsight trace saving raw q/k of the 2 attention calls", nnsight_raw),
        "c": ("qktrace.capture (attention=False)", lambda: qk_capture(False)),
        "cA": ("qktrace.capture (attention=True)", lambda: qk_capture(True)),
        "d": ("qktrace.reduce (in-trace sums)", qk_reduce),
        "d0": ("qktrace.reduce, before: one 3-operand einsum", qk_reduce_before),
    }
    chosen = [a for a in args.arms.split(",") if a]
    if "a" not in chosen:
        chosen.insert(0, "a")
    times: dict[str, list[float]] = {a: [] for a in chosen}
    cpu: dict[str, list[float]] = {a: [] for a in chosen}
    with torch.inference_mode():
        for _ in range(args.warmup):
            for a in chosen:
                arms[a][1]()
        for _ in range(args.repeats):
            for a in chosen:
                t0, c0 = time.perf_counter(), time.process_time()
                arms[a][1]()
                times[a].append(time.perf_counter() - t0)
                cpu[a].append(time.process_time() - c0)

    med = statistics.median
    base, base_cpu = med(times["a"]), med(cpu["a"])
    rows = [
        [
            "a0",
            "bare HF forward, before nnsight/qktrace",
            ms(med(pristine)),
            "",
            f"{med(pristine) / base:.3f}",
            "",
            ms(med(pristine_cpu)),
            f"{med(pristine_cpu) / base_cpu:.3f}",
        ]
    ]
    for a in chosen:
        rows.append(
            [
                a,
                arms[a][0],
                ms(med(times[a])),
                f"{ms(min(times[a]))}-{ms(max(times[a]))}",
                f"{med(times[a]) / base:.3f}",
                f"{min(times[a]) / min(times['a']):.3f}",
                ms(med(cpu[a])),
                f"{med(cpu[a]) / base_cpu:.3f}",
            ]
        )
    print()
    print(
        table(
            rows,
            [
                "arm",
                "what",
                "wall ms (median)",
                "wall range",
                "x a (median)",
                "x a (min)",
                "CPU ms (median)",
                "x a (CPU)",
            ],
        )
    )
    print(
        "(CPU = time.process_time of this process, all threads: less sensitive than wall time"
        " to other processes competing for the cores)"
    )
    for name, ratio in (
        ("wall, median over median", lambda a: med(times[a]) / base),
        ("wall, min over min", lambda a: min(times[a]) / min(times["a"])),
        ("CPU, median over median", lambda a: med(cpu[a]) / base_cpu),
    ):
        print(
            f"ratios ({name}): " + ", ".join(f"{a}/a = {ratio(a):.3f}" for a in chosen if a != "a")
        )
    if "c" in chosen:
        goals = [
            (n, r)
            for n, r in (
                ("wall median", med(times["c"]) / base),
                ("wall min", min(times["c"]) / min(times["a"])),
                ("CPU median", med(cpu["c"]) / base_cpu),
            )
        ]
        print(
            "goal c/a <= 1.10: "
            + ", ".join(f"{n} {r:.3f} ({'met' if r <= 1.10 else 'NOT met'})" for n, r in goals)
        )

    # ---- breakdowns: the functions capture/reduce call, wrapped with timers ---------------
    # (module, function, level): level 0 pieces add up to the call (the rest is shown), level 1
    # pieces run inside a level-0 one (plan_batches tokenizes; ops run inside the trace).
    from qktrace.core import ops

    reduce_mod = importlib.import_module("qktrace.verbs.reduce")  # the module behind qktrace.reduce
    planning = [
        (batching_mod, "_token_ids", 1),
        (batching_mod, "encode", 1),
        (batching_mod, "resolve_positions", 1),
        (batching_mod, "_index_tensor", 1),
    ]
    capture_pieces = [
        (capture_mod, "plan_run", 0),  # the name qk.capture calls
        (batching_mod.Plan, "batch", 0),
        *planning,
        (capture_mod, "_capture_batch", 0),
        (ops, "gather_heads", 1),
        (ops, "attention_rows", 1),
        (capture_mod, "check_finite", 0),
        (capture_mod, "batch_dataset", 0),
    ]
    reduce_pieces = [
        (reduce_mod, "plan_run", 0),
        (batching_mod.Plan, "batch", 0),
        *planning,
        (reduce_mod, "_label_index", 0),
        (reduce_mod, "_reduce_batch", 0),
        (ops, "gather_heads", 1),
        (ops, "qk_sums", 1),
        (ops, "vector_sums", 1),
        (reduce_mod, "_sums_dataset", 0),
    ]
    with torch.inference_mode():
        for label, fn, pieces in (
            ("qktrace.capture (attention=False)", lambda: qk_capture(False), capture_pieces),
            ("qktrace.reduce", qk_reduce, reduce_pieces),
        ):
            bare_t, total_t, spent = breakdown(fn, bare, pieces, args.repeats)
            missing = [f"{m.__name__}.{n}" for m, n, _ in pieces if (m, n) not in spent]
            total = statistics.median(total_t)
            base_b = statistics.median(bare_t)
            rows = []
            accounted = 0.0
            for m, n, level in pieces:
                if (m, n) not in spent:
                    continue
                med = statistics.median(spent[m, n])
                where = " (inside the trace)" if m is ops else ""
                rows.append(
                    ["  " * level + n + where, f"{med * 1e3:.1f}", f"{100 * med / total:.1f}%"]
                )
                if level == 0:
                    accounted += med
            rows.append(
                [
                    "rest (parse heads, tqdm, coords, sum arrays)",
                    f"{(total - accounted) * 1e3:.1f}",
                    f"{100 * (total - accounted) / total:.1f}%",
                ]
            )
            rows.append(["total", f"{total * 1e3:.1f}", "100%"])
            rows.append(
                ["bare forward, same rounds", f"{base_b * 1e3:.1f}", f"x{total / base_b:.3f}"]
            )
            print(
                f"\nbreakdown of {label} (medians over {args.repeats} calls, each after a bare forward):"
            )
            print(table(rows, ["piece", "ms", "share"]))
            if missing:
                print(
                    f"(not found, so not timed: {', '.join(missing)}; update the pieces after a refactor)"
                )

    # ---- the in-trace reduction op alone, and a cheaper contraction order -------------------
    g = len({f for row in labels for f, _ in row}) * 2
    q_sel = torch.randn(B, H, D)
    k_sel = torch.randn(B, H, T, D)
    onehot = torch.zeros(B, T, g, dtype=torch.float64)
    onehot[
        torch.arange(B)[:, None], torch.arange(T)[None], torch.randint(g, (B, T), generator=gen)
    ] = 1

    def one_einsum() -> Any:
        return qk_sums_one_einsum(q_sel, k_sel, onehot)

    with torch.inference_mode():
        t_old, _ = median_time(one_einsum, args.repeats)
        t_new, _ = median_time(lambda: ops.qk_sums(q_sel, k_sel, onehot), args.repeats)
        a, b = one_einsum(), ops.qk_sums(q_sel, k_sel, onehot)
        diff = float((a - b).abs().max() / a.abs().max())
    print(
        f"\nin-trace op per layer, shapes of this run (batch {B}, {H} heads, {T} keys, {g} groups, "
        f"d_head {D}):\n  before, one 3-operand einsum 'bkg,bhi,bhkj->hgij': {t_old * 1e3:.1f} ms\n"
        f"  ops.qk_sums ('bkg,bhkj->bhgj' then 'bhi,bhgj->hgij'):  {t_new * 1e3:.1f} ms "
        f"({t_old / t_new:.0f}x faster, max rel diff {diff:.1e})"
    )

    if args.profile:
        prof = cProfile.Profile()
        with torch.inference_mode():
            prof.enable()
            for _ in range(3):
                qk_capture(False)
            prof.disable()
        stream = io.StringIO()
        pstats.Stats(prof, stream=stream).sort_stats("cumulative").print_stats(30)
        print("\ncProfile of 3 capture calls (cumulative, top 30):")
        print(stream.getvalue())


def ms(seconds: float) -> str:
    """Milliseconds, with one decimal below 100 ms."""
    return f"{seconds * 1e3:.1f}" if seconds < 0.1 else f"{seconds * 1e3:.0f}"


def breakdown(fn, bare, pieces, repeats):
    """Run bare() then fn() `repeats` times with each (module, name) in `pieces` timed.

    Returns (bare times, fn times, {(module, name): seconds per call}). Only functions that
    exist are wrapped, so this survives refactors (missing ones are reported by the caller).
    """
    spent: dict = {}
    patched = []
    for owner, name, _ in pieces:
        fn0 = getattr(owner, name, None)
        if fn0 is None or (owner, name) in spent:
            continue

        def wrapper(*a, _fn=fn0, _key=(owner, name), **k):
            t0 = time.perf_counter()
            try:
                return _fn(*a, **k)
            finally:
                spent[_key][-1] += time.perf_counter() - t0

        setattr(owner, name, wrapper)
        patched.append((owner, name, fn0))
        spent[owner, name] = []
    bare_t, total_t = [], []
    try:
        for v in spent.values():
            v.append(0.0)
        fn()  # warm-up call, dropped below
        for _ in range(repeats):
            t0 = time.perf_counter()
            bare()
            bare_t.append(time.perf_counter() - t0)
            for v in spent.values():
                v.append(0.0)
            t0 = time.perf_counter()
            fn()
            total_t.append(time.perf_counter() - t0)
    finally:
        for owner, name, fn0 in reversed(patched):
            setattr(owner, name, fn0)
    return bare_t, total_t, {k: v[1:] for k, v in spent.items()}


if __name__ == "__main__":
    main()
