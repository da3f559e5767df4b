import numpy as np
import pytest

import qktrace.testing as testing
from qktrace.models import Head, adapter_for, load, parse_heads
from qktrace.remote import check_ndif_key
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


def test_in_memory_model_needs_tokenizer():
    net, _ = tiny("llama")
    with pytest.raises(ValueError, match="tokenizer="):
        load(net)


def test_load_from_saved_checkpoint(tmp_path):
    path = testing.save_checkpoint(tmp_path / "tiny-qwen3", "qwen3")
    m = load(path)
    assert m.adapter.family == "qwen3" and m.n_kv_heads == 2
    # a checkpoint opened from disk for the simulated NDIF path is traced at once, weights loaded
    from qktrace.qk import capture

    local = capture(m, ["The cat is in Box A"], "1.1", progress=False)
    simulated = capture(load(path, remote="local"), ["The cat is in Box A"], "1.1", progress=False)
    np.testing.assert_allclose(simulated.q.values, local.q.values, atol=1e-6)
