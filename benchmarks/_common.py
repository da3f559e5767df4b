"""Helpers shared by the benchmark scripts: random-weight models, timing, formatting.

Not a benchmark itself. Everything here builds on `qktrace.model.testing`, so no hub download is needed.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Let `python benchmarks/x.py` import this module and qktrace from a checkout.
_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

warnings.filterwarnings("ignore", message=".*deprecated.*")


def build_llama(
    *,
    layers: int,
    d_model: int,
    n_heads: int,
    n_kv_heads: int,
    d_ff: int | None = None,
    attn: str = "eager",
    seed: int = 0,
    max_positions: int = 2048,
) -> tuple[Any, Any]:
    """A random-weight Llama-architecture causal LM in eval mode, and the offline test tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM

    import qktrace.model.testing as testing

    tok = testing.tokenizer()
    torch.manual_seed(seed)
    cfg = testing.config(
        "llama",
        layers=layers,
        vocab_size=len(tok),
        hidden_size=d_model,
        intermediate_size=d_ff or (8 * d_model) // 3,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads,
        head_dim=d_model // n_heads,
        max_position_embeddings=max_positions,
    )
    net = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn).eval()
    return net, tok


def median_time(fn: Callable[[], Any], repeats: int, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of `fn()` over `repeats` calls after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def machine() -> str:
    import torch

    return (
        f"{platform.machine()} {os.cpu_count()} cpu(s), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), python {platform.python_version()}"
    )


def versions() -> str:
    from importlib import metadata

    out = []
    for pkg in ("nnsight", "transformers", "torch", "xarray", "zarr"):
        try:
            out.append(f"{pkg} {metadata.version(pkg)}")
        except metadata.PackageNotFoundError:
            out.append(f"{pkg} -")
    return ", ".join(out)


def human(n: float) -> str:
    """Bytes as a short human string (binary units)."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def table(rows: list[list[Any]], header: list[str]) -> str:
    """A plain fixed-width text table."""
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
