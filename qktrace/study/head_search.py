"""A study's head search and its capture of the fresh prompts in one forward pass per batch.

When a study runs on a model with no heads given (neither the organism nor the paper's model),
`qktrace.find_heads` ranks every head by its attention to the answer on the fresh prompts, and
the fresh prompts are then captured again for the chosen heads: two passes over the same
prompts. Both read the same thing (the post-RoPE q and k at the attention function, and each
head's attention row at the query, with the model's own mask, scaling and soft cap), so one
`qktrace.capture` of EVERY head gives both: `rank_heads` ranks the heads from its attention,
exactly as `find_heads` would, and the capture of the chosen heads is a selection of it.

The price is memory (and, on NDIF, bytes returned): q and k of every head at the query and
keys of every fresh prompt. Above `MAX_BYTES` (locally) or `MAX_REMOTE_BYTES` (NDIF and
``remote="local"``, where they travel back: `find_heads` alone returns only the attention at
the keys) the search runs as its own pass, as before, and the store's parameters say which
(``find_heads_pass``). On a 19M random Llama (72 heads, 60 order-ID prompts, `remote="local"`)
sharing saved 4 of 9 requests and 60 prompt-forwards, and returned 11 MiB instead of 0.8 MiB.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from qktrace.model.loading import Head, Model
from qktrace.study.prompts import Prepared
from qktrace.verbs.capture import capture
from qktrace.verbs.find_heads import find_heads, rank_heads

__all__ = ["MAX_BYTES", "MAX_REMOTE_BYTES", "capture_bytes", "search_and_capture"]

# Largest capture of every head of the fresh prompts (q, k, logit, attention; float32) that the
# shared pass holds (about twice that at its peak, while the batches are joined); above it the
# head search takes a pass of its own.
MAX_BYTES = 1 << 30
MAX_REMOTE_BYTES = 16 << 20

SHARED = "shared with the capture of the fresh prompts (one pass)"
SEPARATE = (
    "separate (every head's q/k of the fresh prompts would take {need}, over the {cap} cap{where})"
)


def capture_bytes(model: Model, test: Prepared, n_heads: int) -> int:
    """Bytes of `capture` (float32 q, k, logit, attention) of `n_heads` heads on `test`."""
    n_keys = max((len(row) for row in test.keys), default=0)
    per_head = (1 + n_keys) * model.d_head + 2 * n_keys  # one query position
    return 4 * len(test.ids) * n_heads * per_head


def search_and_capture(
    lm: Model,
    test: Prepared,
    n_best: int,
    batch_size: int,
    progress: bool,
    max_bytes: int | None = None,
) -> tuple[xr.Dataset, xr.Dataset | None, str]:
    """(`find_heads` ranking of every head, capture of the best `n_best` heads on `test`, how
    the search ran: `SHARED` or `SEPARATE`).

    One pass over `test` when the capture of every head fits in `max_bytes` (default
    `MAX_BYTES`, or `MAX_REMOTE_BYTES` for a remote model); else `find_heads` runs alone and the
    capture is None (the caller captures the chosen heads in a pass of its own).
    """
    if max_bytes is not None:
        cap = max_bytes
    else:
        cap = MAX_REMOTE_BYTES if lm.remote else MAX_BYTES
    every = [Head(layer, h) for layer in range(lm.n_layers) for h in range(lm.n_heads)]
    need = capture_bytes(lm, test, len(every))
    if need > cap:
        answer = [row[a] for row, a in zip(test.keys, test.answer, strict=True)]
        ranking = find_heads(lm, test.ids, answer, keys=test.keys, query=test.query, top=None,
                             batch_size=batch_size, progress=progress)  # fmt: skip
        where = " on what a remote run returns" if lm.remote and max_bytes is None else ""
        return ranking, None, SEPARATE.format(need=_mib(need), cap=_mib(cap), where=where)
    captured = capture(lm, test.ids, every, query=test.query, keys=test.keys,
                       batch_size=batch_size, progress=progress)  # fmt: skip
    attention = captured["attention"].isel(query=0).transpose("prompt", "head", "key").values
    positions = captured["key_position"].values
    answer_slot = np.array(  # the first slot at the answer's position, as find_heads takes it
        [list(row).index(row[a]) for row, a in zip(positions, test.answer, strict=True)]
    )
    ranking = rank_heads(lm, range(lm.n_layers), attention, answer_slot, top=None)
    best = [str(h) for h in ranking["head"].values[:n_best]]
    chosen = captured.sel(head=best).copy(deep=True)  # the rest of the capture can go
    return ranking, chosen, SHARED


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB"
