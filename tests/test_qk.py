"""Captured q/k must reproduce the model's own eager attention weights, in every family."""

import numpy as np
import pytest
import torch

import qktrace.model.testing as testing
from qktrace.model.loading import load
from qktrace.verbs.capture import capture
from tests.conftest import tiny

PROMPTS = [
    "The apple is in Box A, the cat is in Box B.",
    "Which box is the cat in? Box",
    "- apple\n- horse\n- water\nWhat are the fruits in the list?",
]


def eager_weights(net, tok, prompt):
    """The model's own attention weights [layer][head, query, key] for one unpadded prompt."""
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        out = net(**enc, output_attentions=True)
    return [a[0].numpy() for a in out.attentions]


@pytest.mark.parametrize("family", testing.FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_attention_recomputed_from_qk_matches_model(family, side, remote):
    net, tok = tiny(family)
    tok.padding_side = side
    m = load(net, tokenizer=tok, remote=remote)
    heads = [(0, 0), (1, 1), (1, 3)]
    ds = capture(m, PROMPTS, heads, query="last", keys="all", batch_size=3, progress=False)
    for p, prompt in enumerate(PROMPTS):
        weights = eager_weights(net, tok, prompt)
        n = int(ds.n_tokens[p])
        for label, (layer, head) in zip(ds["head"].values, heads, strict=True):
            sel = ds.sel(head=label).isel(prompt=p, query=0)
            own = weights[layer][head, -1, :n]
            # (1) the softmax weights qktrace reports
            np.testing.assert_allclose(sel.attention.values[:n], own, atol=1e-5)
            # (2) recomputed offline from the captured q and k (GQA: k is the key head it reads)
            logits = sel.k.values[:n] @ sel.q.values * m.scaling(layer)
            softcap = m.softcap(layer)
            if softcap:
                logits = np.tanh(logits / softcap) * softcap
            window = getattr(net.config, "sliding_window", None)
            layer_types = getattr(net.config, "layer_types", None)
            if window and (layer_types is None or layer_types[layer] == "sliding_attention"):
                logits[: max(0, n - window)] = -np.inf
            recomputed = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
            np.testing.assert_allclose(recomputed, own, atol=1e-5)


def test_padding_does_not_change_vectors(remote):
    net, tok = tiny("llama")
    m = load(net, tokenizer=tok, remote=remote)
    alone = capture(m, PROMPTS[1:2], "1.2", keys="all", progress=False)
    for side in ("left", "right"):
        tok.padding_side = side
        batched = capture(m, PROMPTS, "1.2", keys="all", progress=False)
        n = int(alone.n_tokens[0])
        np.testing.assert_allclose(batched.q.values[1], alone.q.values[0], atol=1e-5)
        np.testing.assert_allclose(batched.k.values[1, :, :n], alone.k.values[0], atol=1e-5)
        assert np.isnan(batched.k.values[1, :, n:]).all()


def test_gqa_key_head_mapping():
    net, tok = tiny("qwen3")
    m = load(net, tokenizer=tok)
    ds = capture(m, PROMPTS[:1], "1.0,1.1,1.2,1.3", keys="all", attention=False, progress=False)
    assert list(ds.kv_head.values) == [0, 0, 1, 1]
    np.testing.assert_array_equal(ds.k.values[:, 0], ds.k.values[:, 1])
    assert not np.allclose(ds.k.values[:, 1], ds.k.values[:, 2])


def test_labels_and_positions(llama):
    keys = [[1, 2], [0, -1, 3], [4]]
    ds = capture(llama, PROMPTS, "1.0", keys=keys, progress=False)
    assert dict(ds.sizes) == {"prompt": 3, "head": 1, "query": 1, "key": 3, "d_head": 16}
    assert ds.key_position.values.tolist() == [
        [1, 2, -1],
        [0, int(ds.n_tokens[1]) - 1, 3],
        [4, -1, -1],
    ]
    tokens = llama.tokenizer.convert_ids_to_tokens(llama.tokenizer(PROMPTS[0])["input_ids"])
    assert ds.key_token.values[0, :2].tolist() == tokens[1:3]
    assert ds.query_token.values[0, 0] == tokens[-1]
    assert np.isnan(ds.k.values[0, 0, 2]).all() and np.isnan(ds.attention.values[2, 0, 0, 1:]).all()


def test_half_precision_returns_float32():
    # a model of its own: casting the cached one to bfloat16 and back would round its weights
    # for every later test that shares it
    net, tok = testing.model("llama")
    m = load(net.to(torch.bfloat16), tokenizer=tok)
    ds = capture(m, PROMPTS[:2], "1.1", progress=False)
    assert ds.q.dtype == np.float32 and ds.attention.dtype == np.float32


def test_bad_positions_and_prompts(llama):
    with pytest.raises(
        ValueError, match=r"Key position 99 is outside prompt 1, which has \d+ tokens"
    ):
        capture(llama, PROMPTS[:2], "1.0", keys=[[0], [99]], progress=False)
    with pytest.raises(ValueError, match="No prompts given"):
        capture(llama, [], "1.0", progress=False)
    with pytest.raises(ValueError, match="given for 1 prompts but there are 2"):
        capture(llama, PROMPTS[:2], "1.0", keys=[[0]], progress=False)
    with pytest.raises(ValueError, match="out of range"):
        capture(llama, PROMPTS[:2], "5.0", progress=False)


def test_capture_to_store_resumes_after_crash(llama, tmp_path, monkeypatch):
    import xarray as xr

    import qktrace.verbs.capture as capture_module

    whole = capture(llama, PROMPTS * 2, "1.0,0.2", keys="all", batch_size=2, progress=False)
    real = capture_module._capture_batch
    calls = {"n": 0}

    def dies_on_second_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(capture_module, "_capture_batch", dies_on_second_batch)
    out = tmp_path / "capture.zarr"
    with pytest.raises(KeyboardInterrupt):
        capture(llama, PROMPTS * 2, "1.0,0.2", keys="all", batch_size=2, out=out, progress=False)
    resumed_calls = []
    monkeypatch.setattr(
        capture_module, "_capture_batch", lambda *a, **k: resumed_calls.append(1) or real(*a, **k)
    )
    resumed = capture(
        llama, PROMPTS * 2, "1.0,0.2", keys="all", batch_size=2, out=out, progress=False
    )
    assert len(resumed_calls) == 2  # batches 2 and 3 of 3: the first was not recomputed
    xr.testing.assert_allclose(resumed.load().drop_attrs(), whole.drop_attrs())
    # one zarr group appended along prompt, one chunk per batch (not one store per batch)
    assert [p.relative_to(out).as_posix() for p in out.rglob(".zgroup")] == [".zgroup"]
    assert sorted(p.name for p in (out / "k").iterdir() if not p.name.startswith(".")) == [
        "0.0.0.0", "1.0.0.0", "2.0.0.0"
    ]  # fmt: skip


HARD_KILL = """
import json, os, signal, sys
import qktrace, qktrace.verbs.capture as qk, qktrace.model.testing as testing
from qktrace.model.loading import load
out, every, prompts = json.loads(sys.argv[1])
qk.WRITE_EVERY_S = every
real, calls = qk._capture_batch, []
def dies(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
qk._capture_batch = dies
net, tok = testing.model("llama")
qktrace.capture(load(net, tokenizer=tok), prompts, "1.0,0.2", keys="all", batch_size=2, out=out,
                progress=False)
"""


@pytest.mark.parametrize(
    "every, saved_batches", [(0.0, 2), (1e9, 0)], ids=["due-every-batch", "not-yet"]
)
def test_a_hard_kill_loses_at_most_the_batches_not_yet_written(
    llama, tmp_path, monkeypatch, every, saved_batches
):
    """capture(out=) holds its batches and writes them every `WRITE_EVERY_S` seconds: a SIGKILL
    in batch 3 keeps batches 1-2 when a write was due after each, none when none was due yet;
    the store opens at what was written and the rerun computes only the rest."""
    import json
    import signal
    import subprocess
    import sys

    import xarray as xr

    import qktrace
    import qktrace.verbs.capture as capture_module

    prompts = PROMPTS * 2
    out = tmp_path / "capture.zarr"
    args = json.dumps([str(out), every, prompts])
    killed = subprocess.run([sys.executable, "-c", HARD_KILL, args], capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    whole = capture(llama, prompts, "1.0,0.2", keys="all", batch_size=2, progress=False)
    if saved_batches:
        kept = qktrace.open(out, checksums=True).load()
        xr.testing.assert_allclose(kept.drop_attrs(), whole.isel(prompt=slice(0, 4)).drop_attrs())
    else:
        with pytest.raises(ValueError, match="no complete batch yet"):
            qktrace.open(out)
    real, calls = capture_module._capture_batch, []
    monkeypatch.setattr(
        capture_module, "_capture_batch", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    resumed = capture(llama, prompts, "1.0,0.2", keys="all", batch_size=2, out=out, progress=False)
    assert len(calls) == 3 - saved_batches  # the lost batches, and only they, run again
    xr.testing.assert_allclose(resumed.load().drop_attrs(), whole.drop_attrs())


def test_prompt_longer_than_context():
    net, tok = tiny("gpt2")
    m = load(net, tokenizer=tok)
    with pytest.raises(ValueError, match=r"Prompt 1 has \d+ tokens, more than .* context of 256"):
        capture(m, ["short", "apple " * 300], "0.0", progress=False)


def test_heads_given_out_of_layer_order_keep_their_labels(llama):
    """Heads are traced layer by layer; results must come back under the labels given."""
    from qktrace.verbs.reduce import reduce

    labels = [[("f", "positive"), ("f", "negative")]] * 2
    keys = [[1, 2], [2, 3]]
    a = capture(llama, PROMPTS[:2], "1.0,0.1", keys=keys, progress=False)
    b = capture(llama, PROMPTS[:2], "0.1,1.0", keys=keys, progress=False)
    assert list(a["head"].values) == ["1.0", "0.1"] and a["layer"].values.tolist() == [1, 0]
    for head in ("1.0", "0.1"):
        for name in ("q", "k", "attention"):
            np.testing.assert_array_equal(a[name].sel(head=head), b[name].sel(head=head))
    sa = reduce(llama, PROMPTS[:2], "1.0,0.1", labels, keys=keys, progress=False)
    sb = reduce(llama, PROMPTS[:2], "0.1,1.0", labels, keys=keys, progress=False)
    for head in ("1.0", "0.1"):
        np.testing.assert_array_equal(sa.qk_sum.sel(head=head), sb.qk_sum.sel(head=head))
        q = a.q.sel(head=head).values[:, 0].astype(np.float64)  # [prompt, d]
        k = a.k.sel(head=head).values[:, 0].astype(np.float64)
        expected = np.einsum("pi,pj->ij", q, k)  # the positive pairs: key slot 0 of each prompt
        np.testing.assert_allclose(
            sa.qk_sum.sel(head=head, feature="f", contrast="positive"), expected, rtol=1e-5
        )


def test_bad_prompt_in_a_late_batch_fails_before_any_trace(llama, monkeypatch, tmp_path):
    """Batches are tokenized as they run, but every prompt is checked before the first trace."""
    import qktrace.verbs.capture as capture_module

    calls = []
    monkeypatch.setattr(capture_module, "_capture_batch", lambda *a, **k: calls.append(1))
    prompts = ["ok", "fine", "good", "apple " * 300]
    with pytest.raises(ValueError, match=r"Prompt 3 has \d+ tokens, more than .* context of 256"):
        capture(llama, prompts, "1.0", batch_size=1, out=tmp_path / "c.zarr", progress=False)
    with pytest.raises(ValueError, match=r"Prompt 2 \(''\) has no tokens"):
        capture(llama, ["a", "b", ""], "1.0", batch_size=1, add_special_tokens=False)
    assert calls == [] and not (tmp_path / "c.zarr").exists()


def test_plan_tokenizes_one_batch_at_a_time(llama, monkeypatch):
    import qktrace.run.batching as batching

    plan = batching.plan_run(llama, PROMPTS * 3, "last", "all", batch_size=2)
    assert len(plan) == len(plan.starts()) == -(-len(PROMPTS * 3) // 2)
    encoded = []
    real = batching.encode
    monkeypatch.setattr(
        batching, "encode", lambda m, p, **k: encoded.append(len(p)) or real(m, p, **k)
    )
    batches = iter(plan)
    first = next(batches)
    assert encoded == [2] and first.key_index.shape[1] == plan.key_width
    eager = batching.plan_batches(llama, PROMPTS * 3, "last", "all", batch_size=2)
    assert [b.key_slots.tolist() for b in plan] == [b.key_slots.tolist() for b in eager]
