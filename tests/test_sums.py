"""In-trace covariance sums must equal the sums computed from fully captured q and k."""

import numpy as np
import pytest

from qktrace.model.loading import load
from qktrace.verbs.capture import capture
from qktrace.verbs.reduce import reduce
from tests.conftest import tiny

PROMPTS = [
    "The apple is in Box A, the cat is in Box B",
    "Which box is the cat in? Box",
    "the ship is in Box C, and the cat is in Box A",
    "- apple\n- horse\n- water",
    "What are the fruits in the list?",
]
KEYS = [[1, 2, 3], [2, 4, 5], [0, 1, 2], [1, 3, 5], [0, 2, 4]]
LABELS = [
    [("fruit", "positive"), ("fruit", "negative"), None],
    [("animal", "positive"), ("fruit", "negative"), ("fruit", "positive")],
    [None, ("animal", "negative"), ("fruit", "negative")],
    [("animal", "positive"), ("animal", "negative"), ("fruit", "positive")],
    [("fruit", "negative"), None, ("animal", "negative")],
]
HEADS = "1.1,0.3,1.2"


def sums_from_capture(ds, features):
    ref = np.zeros((ds.sizes["head"], len(features), 2, ds.sizes["d_head"], ds.sizes["d_head"]))
    for p, row in enumerate(LABELS):
        for j, label in enumerate(row):
            if label is not None:
                f, c = features.index(label[0]), ["positive", "negative"].index(label[1])
                for h in range(ds.sizes["head"]):
                    ref[h, f, c] += np.outer(ds.q.values[p, h, 0], ds.k.values[p, h, j])
    return ref


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_in_trace_sums_equal_full_capture(family, remote):
    net, tok = tiny(family)
    m = load(net, tokenizer=tok, remote=remote)
    sums = reduce(m, PROMPTS, HEADS, LABELS, keys=KEYS, batch_size=2, progress=False)
    full = capture(m, PROMPTS, HEADS, keys=KEYS, attention=False, progress=False)
    ref = sums_from_capture(full, list(sums.feature.values))
    rel = np.abs(sums.qk_sum.values - ref).max() / np.abs(ref).max()
    assert rel < 1e-6
    assert sums.qk_sum.dtype == np.float64
    assert sums.pair_count.sel(feature="fruit", contrast="positive").values.tolist() == [3, 3, 3]
    np.testing.assert_allclose(
        sums.q_sum.sel(feature="fruit", contrast="positive").values[0],
        full.q.values[[0, 1, 3], 0, 0].sum(0),
        rtol=1e-5,
        atol=1e-6,
    )


def test_batch_size_does_not_change_sums(llama):
    a = reduce(llama, PROMPTS, HEADS, LABELS, keys=KEYS, batch_size=1, progress=False)
    b = reduce(llama, PROMPTS, HEADS, LABELS, keys=KEYS, batch_size=5, progress=False)
    np.testing.assert_allclose(a.qk_sum.values, b.qk_sum.values, rtol=1e-5, atol=1e-7)


def test_resume_after_crash_equals_uninterrupted(llama, tmp_path, monkeypatch):
    import qktrace.verbs.reduce as reduce_module

    whole = reduce(llama, PROMPTS, HEADS, LABELS, keys=KEYS, batch_size=2, progress=False)
    real = reduce_module._reduce_batch
    calls = {"n": 0}

    def dies_on_third_batch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(reduce_module, "_reduce_batch", dies_on_third_batch)
    out = tmp_path / "sums.zarr"
    with pytest.raises(KeyboardInterrupt):
        reduce(llama, PROMPTS, HEADS, LABELS, keys=KEYS, batch_size=2, out=out, progress=False)
    monkeypatch.setattr(reduce_module, "_reduce_batch", real)
    resumed = reduce(
        llama, PROMPTS, HEADS, LABELS, keys=KEYS, batch_size=2, out=out, progress=False
    )
    np.testing.assert_array_equal(resumed.qk_sum.values, whole.qk_sum.values)
    with pytest.raises(ValueError, match="different parameters.*heads"):
        reduce(llama, PROMPTS, "1.0", LABELS, keys=KEYS, batch_size=2, out=out, progress=False)


def test_bad_labels(llama):
    with pytest.raises(ValueError, match="Unknown contrast 'pos'"):
        reduce(
            llama, PROMPTS[:1], "1.0", [[("a", "pos"), None, None]], keys=KEYS[:1], progress=False
        )
    with pytest.raises(ValueError, match="has 3 key positions but 2 labels"):
        reduce(
            llama, PROMPTS[:1], "1.0", [[("a", "positive"), None]], keys=KEYS[:1], progress=False
        )
    with pytest.raises(ValueError, match="No labelled keys"):
        reduce(llama, PROMPTS[:1], "1.0", [[None, None, None]], keys=KEYS[:1], progress=False)


@pytest.mark.parametrize("per_request", [2, 0])
def test_several_batches_per_request_equal_one_per_request(per_request, remote):
    """A session of several traces (sums added on the model side) gives the same sums."""
    net, tok = tiny("llama")
    m = load(net, tokenizer=tok, remote=remote)
    one = reduce(m, PROMPTS, HEADS, LABELS, keys=KEYS, batch_size=2, progress=False)
    many = reduce(
        m, PROMPTS, HEADS, LABELS, keys=KEYS, batch_size=2, batches_per_request=per_request,
        progress=False,
    )  # fmt: skip
    for name in ("qk_sum", "q_sum", "k_sum", "pair_count"):
        np.testing.assert_allclose(many[name].values, one[name].values, rtol=1e-12, atol=0)


@pytest.mark.parametrize("wire, tolerance", [("float32", 1e-6), ("float16", 1e-3)])
def test_delta_equals_delta_c_from_full_sums(remote, wire, tolerance):
    """delta=True sums ΔC = C+ - C- with ±1/n pair weights and returns it (float32/16 on the wire)."""
    from qktrace.verbs.decompose import decompose

    net, tok = tiny("llama")
    m = load(net, tokenizer=tok, remote=remote)
    sums = reduce(m, PROMPTS, HEADS, LABELS, keys=KEYS, batch_size=2, progress=False)
    delta = reduce(
        m, PROMPTS, HEADS, LABELS, keys=KEYS, batch_size=2, batches_per_request=0, delta=True,
        delta_dtype=wire, progress=False,
    )  # fmt: skip
    assert "qk_sum" not in delta and delta.delta_c.dims == ("head", "feature", "dq", "dk")
    expected = decompose(sums).delta_c.transpose("head", "feature", "dq", "dk").values
    rel = np.abs(delta.delta_c.values - expected).max() / np.abs(expected).max()
    assert rel < tolerance
    np.testing.assert_allclose(delta.q_sum.values, sums.q_sum.values, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(delta.pair_count.values, sums.pair_count.values)
    # decompose takes the ΔC as it comes back, centered or not
    for centered in (False, True):
        full, small = decompose(sums, centered=centered), decompose(delta, centered=centered)
        ref = full.delta_c.transpose("head", "feature", "dq", "dk").values
        got = small.delta_c.transpose("head", "feature", "dq", "dk").values
        assert np.abs(got - ref).max() / np.abs(ref).max() < tolerance
        s_ref, s_got = full.singular_values.values, small.singular_values.values
        assert np.abs(s_got - s_ref).max() / s_ref.max() < 10 * tolerance


def test_delta_needs_both_contrasts(llama):
    labels = [[("fruit", "positive"), ("fruit", "positive"), None]]
    with pytest.raises(ValueError, match="No negative pairs for feature 'fruit': delta=True"):
        reduce(llama, PROMPTS[:1], "1.0", labels, keys=KEYS[:1], delta=True, progress=False)


def test_delta_resumes_with_several_batches_per_request(llama, tmp_path, monkeypatch):
    import qktrace.verbs.reduce as reduce_module

    args = dict(keys=KEYS, batch_size=1, batches_per_request=2, delta=True, progress=False)
    whole = reduce(llama, PROMPTS, HEADS, LABELS, **args)
    real = reduce_module._reduce_batch
    calls = []

    def dies_on_second_request(*a, **k):
        calls.append(len(a[1]))  # batches in this request
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(reduce_module, "_reduce_batch", dies_on_second_request)
    out = tmp_path / "delta.zarr"
    with pytest.raises(KeyboardInterrupt):
        reduce(llama, PROMPTS, HEADS, LABELS, out=out, **args)
    assert calls == [2, 2]
    monkeypatch.setattr(reduce_module, "_reduce_batch", real)
    resumed = reduce(llama, PROMPTS, HEADS, LABELS, out=out, **args)
    np.testing.assert_allclose(resumed.delta_c.values, whole.delta_c.values, rtol=1e-12)


def test_bad_prompt_in_a_late_batch_fails_before_any_trace(llama, monkeypatch):
    """Batches are tokenized when they run, but every prompt is checked before the first one."""
    import qktrace.verbs.reduce as reduce_module

    calls = []
    monkeypatch.setattr(reduce_module, "_reduce_batch", lambda *a, **k: calls.append(1))
    keys = [*KEYS[:-1], [0, 2, 99]]
    with pytest.raises(ValueError, match=r"Key position 99 is outside prompt 4, which has"):
        reduce(llama, PROMPTS, HEADS, LABELS, keys=keys, batch_size=1, progress=False)
    labels = [*LABELS[:-1], LABELS[-1][:2]]
    with pytest.raises(ValueError, match="Prompt 4 has 3 key positions but 2 labels"):
        reduce(llama, PROMPTS, HEADS, labels, keys=KEYS, batch_size=1, progress=False)
    assert calls == []
