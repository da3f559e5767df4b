"""Numerics: half-precision models give the ranks of float32 ones; NaN/inf never passes silently.

`qktrace.reduce` casts q and k to float64 inside the trace and accumulates there, so a bfloat16 or
float16 model changes the sums only by the rounding of q and k themselves, not by the number of
pairs summed. Planted structure makes the ranks real: in layer 1, query head 2 and key head 1
(read by query heads 2 and 3) keep only two rotary planes of q_proj / k_proj, so ΔC of heads
1.2 and 1.3 has rank <= 4 in any precision (RoPE keeps each plane), with a spectrum that the 99%
rule cuts inside, not at exact zeros.
"""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

import qktrace
import qktrace.model.testing as testing
from qktrace.core.prompts import locate
from qktrace.model.loading import load
from qktrace.studies import binding

PLANTED = ["1.2", "1.3"]
D_HEAD = 16
PLANES = [0, 1, 0 + D_HEAD // 2, 1 + D_HEAD // 2]  # two rotary pairs (i, i + d/2)


@pytest.fixture(scope="module")
def planted():
    """A tiny float32 Llama with the low-rank heads planted, and order-ID prompts for it."""
    net, tok = testing.model("llama", seed=0)
    attn = net.model.layers[1].self_attn
    off = torch.ones(D_HEAD, dtype=torch.bool)
    off[PLANES] = False
    with torch.no_grad():
        attn.q_proj.weight[2 * D_HEAD : 3 * D_HEAD][off] = 0  # query head 2
        attn.k_proj.weight[1 * D_HEAD : 2 * D_HEAD][off] = 0  # key head 1 (query heads 2, 3)
    prompts = binding.build_prompts(32, 3, seed=0)
    loc = locate(tok, prompts, chat=False)
    return net, tok, loc, binding.order_labels(prompts)


def run_reduce(net, tok, loc, labels, dtype):
    model = load(copy.deepcopy(net).to(dtype), tokenizer=tok)
    return model, qktrace.reduce(
        model, loc.ids, PLANTED, labels, keys=loc.positions["box"], batch_size=32, progress=False
    )


def test_half_precision_gives_float32_ranks(planted):
    net, tok, loc, labels = planted
    _, sums32 = run_reduce(net, tok, loc, labels, torch.float32)
    ref = qktrace.decompose(sums32)
    s = ref["singular_values"].sel(feature="order").values
    energy = np.cumsum(s**2, axis=-1) / (s**2).sum(-1, keepdims=True)
    rank = ref["rank"].sel(feature="order").values
    assert (rank >= 2).all() and (rank <= 4).all(), rank  # planted: at most 4 directions
    assert (s[:, 4:] < 1e-6 * s[:, :1]).all()
    # not a knife edge: the rule's cut is at least 0.002 of the energy away from 99%
    rows = np.arange(len(rank))
    assert (energy[rows, rank - 2] < 0.99 - 0.002).all() and (energy[rows, rank - 1] > 0.992).all()

    for dtype, tol in ((torch.bfloat16, 0.05), (torch.float16, 0.01)):
        model, sums = run_reduce(net, tok, loc, labels, dtype)
        assert sums["qk_sum"].dtype == np.float64
        out = qktrace.decompose(sums)
        np.testing.assert_array_equal(out["rank"].values, ref["rank"].values, err_msg=str(dtype))
        delta = np.abs(out["delta_c"] - ref["delta_c"]).max() / np.abs(ref["delta_c"]).max()
        assert float(delta) < tol, (dtype, float(delta))

        if dtype != torch.bfloat16:
            continue
        # the sums are float64 sums of the bfloat16 q and k: equal to summing captured values in
        # float64 to 1e-9 (a bfloat16 accumulator would be off by ~1e-2)
        head = PLANTED[0]
        cap = qktrace.capture(
            model, loc.ids, head, keys=loc.positions["box"], batch_size=32, progress=False
        )
        q = cap["q"].sel(head=head).values[:, 0].astype(np.float64)  # [prompt, d]
        k = cap["k"].sel(head=head).values.astype(np.float64)  # [prompt, key, d]
        positive = np.array([[c == "positive" for _, c in row] for row in labels], dtype=float)
        expected = np.einsum("pj,pi,pjk->ik", positive, q, k)
        got = sums["qk_sum"].sel(head=head, feature="order", contrast="positive").values
        np.testing.assert_allclose(got, expected, rtol=1e-9, atol=1e-9 * np.abs(expected).max())


PROMPTS = [
    "The apple is in Box A",
    "Which box is the cat in? Box",
    "- apple\n- horse\n- water",
    "the ship is in Box C",  # prompt 3: the one that overflows
    "What are the fruits in the list?",
]
KEYS = [[0, 1]] * len(PROMPTS)
LABELS = [[("x", "positive"), ("x", "negative")]] * len(PROMPTS)


@pytest.fixture
def overflows_on_prompt_3():
    """A tiny Llama whose embedding of prompt 3 is inf, as an overflow would make it."""
    net, tok = testing.model("llama", seed=0)
    ids = [set(tok(p)["input_ids"]) for p in PROMPTS]
    marker = min(ids[3].difference(*ids[:3], *ids[4:]))  # a token only prompt 3 has

    def hook(module, args, output):
        rows = (args[0] == marker).any(-1)
        output[rows] = float("inf")
        return output

    handle = net.model.embed_tokens.register_forward_hook(hook)
    yield load(net, tokenizer=tok)
    handle.remove()


def quoted_nan_messages() -> list[str]:
    """The messages the bad-input table in docs/errors.md quotes for NaN/inf (capture, then reduce)."""
    from pathlib import Path

    table = (Path(__file__).parents[1] / "docs" / "errors.md").read_text()
    (row,) = [line for line in table.splitlines() if "`test_numerics.py`" in line]
    return [q for q in re.findall(r"`([^`]+)`", row.split(" | ")[1]) if q.startswith("Captured")]


@pytest.mark.parametrize("verb", ["capture", "reduce"])
def test_nan_or_inf_names_the_prompt(overflows_on_prompt_3, verb):
    model = overflows_on_prompt_3
    with pytest.raises(
        FloatingPointError, match=r"NaN/inf for prompt 3\b.*float32 or bfloat16"
    ) as err:
        if verb == "capture":
            qktrace.capture(model, PROMPTS, "1.0", keys=KEYS, batch_size=2, progress=False)
        else:
            qktrace.reduce(model, PROMPTS, "1.0", LABELS, keys=KEYS, batch_size=2, progress=False)
    # the table in docs/errors.md quotes this message (abridged with "...")
    quote = quoted_nan_messages()[0 if verb == "capture" else 1]
    for piece in quote.split("..."):
        assert piece.strip() in str(err.value), (piece, str(err.value))
    # the other prompts are fine: without prompt 3 both verbs run
    rest = [p for i, p in enumerate(PROMPTS) if i != 3]
    out = qktrace.reduce(model, rest, "1.0", LABELS[:4], keys=KEYS[:4], progress=False)
    assert np.isfinite(out["qk_sum"].values).all()
