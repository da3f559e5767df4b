import numpy as np
import pytest
import transformers

import qktrace.model.testing as testing
from qktrace.model.loading import Head, adapter_for, load, parse_heads
from qktrace.model.remote import check_ndif_key
from qktrace.verbs.capture import capture
from tests.conftest import tiny


@pytest.mark.parametrize("family", testing.FAMILIES)
def test_facts_from_config(family):
    net, tok = tiny(family)
    m = load(net, tokenizer=tok)
    assert (m.n_layers, m.n_heads, m.d_head) == (2, 4, 16)
    assert (
        m.n_kv_heads == net.config.num_key_value_heads
        if hasattr(net.config, "num_key_value_heads")
        else 4
    )
    assert m.kv_head(3) == 3 // (m.n_heads // m.n_kv_heads)


def test_parse_heads():
    assert parse_heads("16.19, 20.26") == [Head(16, 19), Head(20, 26)]
    assert parse_heads([(1, 2), "3:4"]) == [Head(1, 2), Head(3, 4)]
    assert parse_heads((16, 19)) == [Head(16, 19)]
    with pytest.raises(ValueError, match="LAYER.HEAD"):
        parse_heads("16-19")


def test_unknown_architecture_lists_supported_and_how_to_add():
    with pytest.raises(ValueError, match=r"Supported: .*llama.*register_adapter"):
        adapter_for("mamba")


def test_out_of_range(llama):
    with pytest.raises(ValueError, match=r"Layer 7 is out of range.*0\.\.1"):
        llama.check_heads([Head(7, 0)])
    with pytest.raises(ValueError, match=r"Head 1\.9 is out of range.*0\.\.3"):
        llama.check_heads([Head(1, 9)])


def test_missing_ndif_key(monkeypatch):
    import nnsight

    monkeypatch.delenv("NDIF_API_KEY", raising=False)
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)
    with pytest.raises(RuntimeError, match="NDIF_API_KEY is not set.*remote='local'"):
        check_ndif_key()
    net, tok = tiny("llama")
    with pytest.raises(RuntimeError, match="NDIF_API_KEY"):
        load(net, tokenizer=tok, remote=True)

    # before any work: no config, tokenizer or weights are read
    import qktrace.model.loading as models_module

    def no_work(*args, **kwargs):
        raise AssertionError("a model was opened before the key was checked")

    monkeypatch.setattr(models_module.nnsight, "TransformersModel", no_work)
    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_work)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", no_work)
    with pytest.raises(RuntimeError, match="NDIF_API_KEY is not set"):
        load("meta-llama/Llama-3.1-8B-Instruct", remote=True)


def test_in_memory_model_needs_tokenizer():
    net, _ = tiny("llama")
    with pytest.raises(ValueError, match="tokenizer="):
        load(net)


def test_load_from_saved_checkpoint(tmp_path):
    path = testing.save_checkpoint(tmp_path / "tiny-qwen3", "qwen3")
    m = load(path)
    assert m.adapter.family == "qwen3" and m.n_kv_heads == 2
    # a checkpoint opened from disk for the simulated NDIF path is traced at once, weights loaded
    from qktrace.verbs.capture import capture

    local = capture(m, ["The cat is in Box A"], "1.1", progress=False)
    simulated = capture(load(path, remote="local"), ["The cat is in Box A"], "1.1", progress=False)
    np.testing.assert_allclose(simulated.q.values, local.q.values, atol=1e-6)


CAUSAL_PROMPTS = [
    "The apple is in Box A, the cat is in Box B, and the ship is in Box C.",
    "Which box is the cat in? Box",
    "- apple\n- horse",
]


def eager_attention(net, tok, prompt):
    """The model's own attention weights [layer][head, query, key] for one unpadded prompt."""
    import torch

    with torch.no_grad():
        out = net(**tok(prompt, return_tensors="pt"), output_attentions=True)
    return [a[0].numpy() for a in out.attentions]


def causal_softmax(q, k, scaling, softcap=None, window=None):
    """softmax(q k^T * scaling + causal mask) for q, k [n, d] of one prompt, in float64."""
    n = len(q)
    logits = q.astype(np.float64) @ k.astype(np.float64).T * scaling
    if softcap:
        logits = np.tanh(logits / softcap) * softcap
    i, j = np.indices((n, n))
    hidden = j > i  # causal: a query never sees later keys
    if window:
        hidden |= j <= i - window  # sliding-window layers see only the last `window` keys
    logits[hidden] = -np.inf
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("family", testing.FAMILIES)
@pytest.mark.parametrize("side", ["left", "right"])
def test_full_attention_from_captured_qk_with_causal_mask(family, side):
    """Every query row, not just the last: the causal (and sliding-window) mask is part of it.

    A padded batch of prompts of different lengths; q and k of every position of a GQA-shared
    pair of heads (1.0 and 1.1 read key head 0 where the family has GQA) and of 0.3.
    """
    net, tok = tiny(family)
    padding, tok.padding_side = tok.padding_side, side
    try:
        m = load(net, tokenizer=tok)
        heads = [(0, 3), (1, 0), (1, 1)]
        ds = capture(m, CAUSAL_PROMPTS, heads, query="all", keys="all", progress=False)
    finally:
        tok.padding_side = padding
    assert ds.sizes["query"] == ds.sizes["key"] == max(ds.n_tokens.values) > 8  # > the window
    layer_types = getattr(net.config, "layer_types", None)
    window = getattr(net.config, "sliding_window", None)
    for p, prompt in enumerate(CAUSAL_PROMPTS):
        own = eager_attention(net, tok, prompt)
        n = int(ds.n_tokens[p])
        for label, (layer, head) in zip(ds["head"].values, heads, strict=True):
            sel = ds.sel(head=label).isel(prompt=p)
            sliding = window and (layer_types is None or layer_types[layer] == "sliding_attention")
            want = own[layer][head]
            got = causal_softmax(
                sel.q.values[:n], sel.k.values[:n], m.scaling(layer), m.softcap(layer),
                window if sliding else None,
            )  # fmt: skip
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"{family} {label} {p}")
            np.testing.assert_allclose(sel.attention.values[:n, :n], want, atol=1e-5)
            assert np.isnan(sel.q.values[n:]).all() and np.isnan(sel.k.values[n:]).all()
