"""Subspace edits inside the trace must be what the model's own attention computes with."""

import numpy as np
import pytest
import torch
import xarray as xr

import qktrace.model.testing as testing
from qktrace.model.loading import load
from qktrace.verbs.capture import capture
from qktrace.verbs.decompose import random_subspaces
from qktrace.verbs.intervene import Edit, RandomBaseline, intervene
from tests.conftest import tiny

PROMPTS = [
    "The apple is in Box A, the cat is in Box B.",
    "Which box is the cat in? Box",
    "- apple\n- horse\n- water\nWhat are the fruits in the list?",
]
ORIG = [3, 2, 4]
TARGET = [-3, 5, 1]


def basis(d=16, r=4, seed=1):
    return np.linalg.qr(np.random.default_rng(seed).normal(size=(d, r)))[0]


def offline_attention(m, net, cap, p, layer, k):
    """Softmax of the captured query against keys k [n, d], with the model's scaling, cap, window."""
    n = int(cap.n_tokens[p])
    q = cap.q.values[p, 0, 0].astype(np.float64)
    logits = k[:n].astype(np.float64) @ q * m.scaling(layer)
    if m.softcap(layer):
        logits = np.tanh(logits / m.softcap(layer)) * m.softcap(layer)
    window = getattr(net.config, "sliding_window", None)
    layer_types = getattr(net.config, "layer_types", None)
    if window and (layer_types is None or layer_types[layer] == "sliding_attention"):
        logits[: max(0, n - window)] = -np.inf
    e = np.exp(logits - logits.max())
    return e / e.sum()


def swapped(k, o, t, v):
    k = k.astype(np.float64).copy()
    delta = ((k[t] - k[o]) @ v) @ v.T
    k[o] += delta
    k[t] -= delta
    return k


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2", "gpt2"])
def test_key_swap_is_what_the_model_computes(family, remote):
    """The model's own eager weights after the in-trace swap = offline recomputation = `after`."""
    net, tok = tiny(family)
    padding, tok.padding_side = tok.padding_side, "left" if family in ("qwen3", "gpt2") else "right"
    m = load(net, tokenizer=tok, remote=remote)
    layer, head = 1, 2
    v = basis()
    try:
        ds = intervene(
            m, PROMPTS, (layer, head), v, name="feat", orig=ORIG, target=TARGET, keys="all",
            random=RandomBaseline(3, seed=7), verify=True, batch_size=2, progress=False,
        )  # fmt: skip
        cap = capture(m, PROMPTS, [(layer, head)], keys="all", progress=False)
    finally:
        tok.padding_side = padding
    randoms = random_subspaces(16, 4, 3, seed=7)
    for p in range(len(PROMPTS)):
        n = int(cap.n_tokens[p])
        o, t = ORIG[p] % n, TARGET[p] % n
        k = cap.k.values[p, 0, :n]
        expected = offline_attention(m, net, cap, p, layer, swapped(k, o, t, v))
        own = ds.model_attention.values[p, :n]
        np.testing.assert_allclose(own, expected, atol=1e-5)
        np.testing.assert_allclose(ds.attention_after.sel(subspace="feat")[p, :n], own, atol=1e-5)
        # before = the unedited model (capture checks that against eager weights)
        np.testing.assert_allclose(
            ds.attention_before.values[p, :n], cap.attention.values[p, 0, 0, :n], atol=1e-6
        )
        # the random baselines of the same trace: the same swap in each random subspace
        for i in range(3):
            want = offline_attention(m, net, cap, p, layer, swapped(k, o, t, randoms[i]))
            got = ds.attention_after.sel(subspace=f"random_{i}").values[p, :n]
            np.testing.assert_allclose(got, want, atol=1e-5)
    assert ds.attrs["kv_head"] == m.kv_head(head)
    assert len(ds.attrs["heads_sharing_key"]) == m.group_size
    assert list(ds.random.values) == [False, True, True, True]


def test_ablating_everything_equalizes_logits(remote):
    net, tok = tiny("llama")
    m = load(net, tokenizer=tok, remote=remote)
    at = [[1, 2, 3], [1, 4, 5], [2, 3, 6]]
    ds = intervene(
        m, PROMPTS, "1.1", np.eye(16), edit=Edit("ablate", at=at), orig=[1, 1, 2],
        target=[3, 5, 6], keys=at, random=2, verify=True, progress=False,
    )  # fmt: skip
    for s in ds.subspace.values:  # a random rank-16 subspace is the whole space too
        np.testing.assert_allclose(ds.logit_after.sel(subspace=s), 0.0, atol=1e-6)
        after = ds.attention_after.sel(subspace=s).values
        np.testing.assert_allclose(after, after[:, :1] * np.ones((1, 3)), rtol=1e-5)
    np.testing.assert_allclose(ds.model_attention, ds.attention_after.sel(subspace="subspace"))
    assert not np.allclose(ds.logit_before, 0.0)


def test_ablating_a_low_rank_subspace_that_holds_the_keys(remote):
    """A rank-9 subspace spanned by the edited keys themselves: their logits become 0 (so equal),
    every other key keeps its logit, and random rank-9 subspaces do not equalize anything."""
    net, tok = tiny("qwen3")
    m = load(net, tokenizer=tok, remote=remote)
    at = [[1, 2, 3], [1, 4, 5], [2, 3, 6]]
    keys = [row + [0, 7] for row in at]  # two keys that are not edited
    cap = capture(m, PROMPTS, "1.2", keys=at, attention=False, progress=False)
    v = np.linalg.qr(cap.k.values[:, 0].reshape(-1, 16).T.astype(np.float64))[0]  # [16, 9]
    assert v.shape == (16, 9)
    ds = intervene(
        m, PROMPTS, "1.2", v, name="keys", edit=Edit("ablate", at=at), orig=[1, 1, 2],
        target=[3, 5, 6], keys=keys, random=RandomBaseline(2, seed=0), verify=True, progress=False,
    )  # fmt: skip
    after = ds.logit_after.sel(subspace="keys").values
    np.testing.assert_allclose(after[:, :3], 0.0, atol=1e-5)
    np.testing.assert_allclose(after[:, 3:], ds.logit_before.values[:, 3:], atol=1e-5)
    attention = ds.model_attention.values
    np.testing.assert_allclose(attention[:, :3], attention[:, :1] * np.ones((1, 3)), rtol=1e-5)
    for s in ("random_0", "random_1"):
        assert np.abs(ds.logit_after.sel(subspace=s).values[:, :3]).max() > 1e-2


def test_real_subspace_flips_random_ones_do_not():
    """Keys differ only inside a known subspace: swapping it exchanges them; random ones don't."""
    net, tok = tiny("llama")
    m = load(net, tokenizer=tok)
    prompts = [*PROMPTS, "the ship is in Box C, and the cat is in Box A"]
    keys = [list(range(1, 9))] * len(prompts)
    cap = capture(m, prompts, "1.1", keys=keys, progress=False)
    att = cap.attention.values[:, 0, 0]
    o, t = att.argmax(1), att.argmin(1)
    rows = np.arange(len(prompts))
    k = cap.k.values[:, 0]
    # the subspace spanned by each prompt's key difference holds everything that tells them apart
    v = np.linalg.qr((k[rows, t] - k[rows, o]).T)[0]
    pos = cap.key_position.values
    ds = intervene(
        m, prompts, "1.1", v, name="diff", orig=pos[rows, o], target=pos[rows, t], keys=keys,
        random=RandomBaseline(20, seed=0), progress=False,
    )  # fmt: skip
    real = ds.sel(subspace="diff")
    assert ds.attends_orig.all()
    assert real.flip_rate == 1.0 and real.flip.all()
    # the two keys are exchanged exactly: p(target) after = p(orig) before
    np.testing.assert_allclose(real.p_target_after, 1 - ds.p_target_before, atol=1e-5)
    random = ds.where(ds.random, drop=True)
    assert float(random.flip_rate.mean()) < 0.5
    assert float(random.mean_delta_p_target.max()) < float(real.mean_delta_p_target)
    # seeded: the same call gives the same baselines, another seed others
    again = intervene(
        m, prompts, "1.1", v, orig=pos[rows, o], target=pos[rows, t], keys=keys,
        random=RandomBaseline(20, seed=0), progress=False,
    )  # fmt: skip
    np.testing.assert_array_equal(again.attention_after[1:], ds.attention_after[1:])


def test_patch_copies_source_coordinates(remote):
    net, tok = tiny("qwen3")
    m = load(net, tokenizer=tok, remote=remote)
    keys = [[o, t] for o, t in zip(ORIG, TARGET, strict=True)]
    cap = capture(m, PROMPTS, "0.3", keys=keys, progress=False)
    source = cap.k.sel(head="0.3").isel(key=1)  # (prompt, d_head): the target keys
    ds = intervene(
        m, PROMPTS, "0.3", np.eye(16), edit=Edit("patch", source=source), orig=ORIG, target=TARGET,
        random=0, progress=False,
    )  # fmt: skip
    after = ds.logit_after.sel(subspace="subspace").values
    # the orig key became the target key, so both get the target's logit
    np.testing.assert_allclose(after[:, 0], ds.logit_before.values[:, 1], atol=1e-5)
    np.testing.assert_allclose(after[:, 1], ds.logit_before.values[:, 1], atol=1e-6)
    assert list(ds.key_role.values[0]) == ["orig", "target"]


def test_query_ablation_gives_uniform_attention(remote):
    net, tok = tiny("llama")
    m = load(net, tokenizer=tok, remote=remote)
    ds = intervene(
        m, PROMPTS, "1.3", np.eye(16), edit=Edit("ablate", side="query"), orig=ORIG, target=TARGET,
        keys="all", random=1, verify=True, progress=False,
    )  # fmt: skip
    for p in range(len(PROMPTS)):
        n = int(ds.n_tokens[p])
        for s in ds.subspace.values:
            row = ds.attention_after.sel(subspace=s).values[p, :n]
            np.testing.assert_allclose(row, 1.0 / n, rtol=1e-5)
        np.testing.assert_allclose(ds.model_attention.values[p, :n], 1.0 / n, rtol=1e-5)


def test_query_patch_from_other_prompts():
    net, tok = tiny("qwen3")
    m = load(net, tokenizer=tok)
    keys = [[1, 2, 3, 4]] * 3
    cap = capture(m, PROMPTS, "1.1", keys=keys, progress=False)
    source = cap.q.roll(prompt=1, roll_coords=False)  # each prompt gets the previous one's query
    ds = intervene(
        m, PROMPTS, "1.1", np.eye(16), edit=Edit("patch", side="query", source=source), orig=[1] * 3,
        target=[2] * 3, keys=keys, random=0, progress=False,
    )  # fmt: skip
    scale = m.scaling(1)
    want = np.einsum("pkd,pd->pk", cap.k.values[:, 0], source.values[:, 0, 0]) * scale
    np.testing.assert_allclose(ds.logit_after.sel(subspace="subspace"), want, atol=1e-5)


def test_half_precision_edit_reaches_the_model():
    net, tok = testing.model("qwen3")  # its own: a bfloat16 round trip would round the cached one
    m = load(net.to(torch.bfloat16), tokenizer=tok)
    ds = intervene(
        m, PROMPTS, "1.0", basis(), orig=ORIG, target=TARGET, keys="all", random=2,
        verify=True, progress=False,
    )  # fmt: skip
    after = ds.attention_after.sel(subspace="subspace")
    assert after.dtype == np.float32
    np.testing.assert_allclose(ds.model_attention, after, atol=1e-2)
    assert not np.allclose(after.fillna(0), ds.attention_before.fillna(0), atol=1e-4)


def test_basis_from_decompose_dataarray():
    net, tok = tiny("llama")
    m = load(net, tokenizer=tok)
    padded = np.full((16, 6), np.nan)
    padded[:, :4] = basis()
    da = xr.DataArray(
        padded[None], dims=("head", "dk", "component"), coords={"head": ["1.2"], "feature": "order"}
    )
    ds = intervene(m, PROMPTS, "1.2", da, orig=ORIG, target=TARGET, random=1, progress=False)
    assert list(ds.subspace.values) == ["order", "random_0"]
    assert ds.attrs["rank"] == 4 and ds.basis.shape == (16, 4)


def test_errors_name_the_fix(llama):
    kw = dict(orig=ORIG, target=TARGET, progress=False)
    with pytest.raises(ValueError, match=r"expected \[d_head, r\] = \[16, r\]"):
        intervene(llama, PROMPTS, "1.0", np.ones((4, 16)), **kw)
    with pytest.raises(ValueError, match="Prompt 1: orig and target are the same position 2"):
        intervene(llama, PROMPTS, "1.0", basis(), orig=ORIG, target=[5, 2, 1], progress=False)
    with pytest.raises(ValueError, match=r"Orig/target position 99 is outside prompt 1"):
        intervene(llama, PROMPTS, "1.0", basis(), orig=[3, 99, 4], target=TARGET, progress=False)
    with pytest.raises(ValueError, match="not among its candidate keys .* add it to keys"):
        intervene(llama, PROMPTS, "1.0", basis(), keys=[[3, 4]] * 3, **kw)
    with pytest.raises(ValueError, match="needs side='key'"):
        intervene(llama, PROMPTS, "1.0", basis(), edit=Edit(side="query"), **kw)
    with pytest.raises(ValueError, match="one head at a time"):
        intervene(llama, PROMPTS, "1.0,1.1", basis(), **kw)
    with pytest.raises(ValueError, match="needs source="):
        intervene(llama, PROMPTS, "1.0", basis(), edit="patch", **kw)
    with pytest.raises(ValueError, match=r"expected \[n_prompts, d_head\] = \[3, 16\]"):
        intervene(llama, PROMPTS, "1.0", basis(), edit=Edit("patch", source=np.ones((3, 8))), **kw)
    with pytest.raises(ValueError, match="distinct positions"):
        intervene(llama, PROMPTS, "1.0", basis(), edit=Edit("ablate", at=[[1, 1], [2], [3]]), **kw)
    with pytest.raises(ValueError, match="one token position per prompt"):
        intervene(llama, PROMPTS, "1.0", basis(), orig=[1], target=[2], progress=False)
    with pytest.raises(ValueError, match="only eager attention"):
        net, tok = tiny("llama")
        net.config._attn_implementation = "sdpa"
        try:
            intervene(load(net, tokenizer=tok), PROMPTS, "1.0", basis(), verify=True, **kw)
        finally:
            net.config._attn_implementation = "eager"


CAPTURED_METRICS = (
    "attention_before", "attention_after", "logit_after", "p_target_after", "delta_p_target",
    "attention_target_after", "flip", "argmax_after",
)  # fmt: skip


@pytest.mark.parametrize(
    "family,keys,mode",
    [
        ("llama", "all", "swap"),
        ("qwen3", "items", "swap"),
        ("gemma2", "all", "swap"),  # soft cap and a sliding window that hides early keys
        ("gpt2", "items", "ablate"),
        ("mistral", "items", "patch"),
    ],
)
def test_captured_metrics_equal_the_in_trace_edit(family, keys, mode):
    """No forward pass: attention after a key edit, from the capture, = the traced edit's."""
    from qktrace.verbs.intervene import intervene_captured

    net, tok = tiny(family)
    m = load(net, tokenizer=tok)
    candidates = "all" if keys == "all" else [[1, 2, 3, 4, 5], [1, 2, 3, 4, 5], [1, 2, 3, 4, 6]]
    orig, target = ([1, 2, 4], [3, 5, 6]) if keys != "all" else (ORIG, TARGET)
    v = basis(r=3, seed=4)
    extra: dict = {}
    if mode == "patch":
        extra["source"] = np.random.default_rng(0).normal(size=(3, 16)).astype(np.float32)
    edit = Edit(mode, **extra)
    kwargs = dict(orig=orig, target=target, edit=edit, name="f", random=RandomBaseline(3, seed=5))
    for layer in range(2):
        head = f"{layer}.1"
        traced = intervene(
            m, PROMPTS, head, v, keys=candidates, batch_size=2, progress=False, **kwargs
        )
        cap = capture(m, PROMPTS, head, keys=candidates, progress=False)
        free = intervene_captured(cap, head, v, **kwargs)
        for var in CAPTURED_METRICS:
            a, b = traced[var].values, free[var].values
            if a.dtype == bool or var == "argmax_after":
                np.testing.assert_array_equal(a, b, err_msg=var)
            else:
                np.testing.assert_allclose(a, b, atol=1e-5, err_msg=var)
        assert free.attrs["forward_passes"] == 0
        # the edit moves attention (so equality is not of two unedited rows)
        moved = np.abs(free.attention_after.values - free.attention_before.values[None])
        assert np.nanmax(moved) > 1e-3


def test_p_target_is_nan_without_a_warning_where_orig_and_target_get_no_attention():
    """gemma2's sliding window hides early keys: where orig and target both get attention 0,
    p_target = a_t / (a_o + a_t) is undefined, NaN (no RuntimeWarning), left out of the mean."""
    import warnings

    from qktrace.verbs.intervene import intervene_captured

    net, tok = tiny("gemma2")
    m = load(net, tokenizer=tok)
    undefined = 0
    for layer in range(2):
        head = f"{layer}.1"
        cap = capture(m, PROMPTS, head, keys="all", progress=False)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            fx = intervene_captured(
                cap, head, basis(r=3, seed=4), orig=ORIG, target=TARGET, edit=Edit("swap"),
                name="f", random=RandomBaseline(2, seed=5),
            )  # fmt: skip
        for when in ("before", "after"):
            a = fx[f"attention_{when}"]
            a_o = a.where(fx.key_role == "orig").max("key").values
            a_t = a.where(fx.key_role == "target").max("key").values
            none = a_o + a_t == 0
            undefined += int(none.sum())
            expected = np.where(none, np.nan, a_t / np.where(none, 1.0, a_o + a_t))
            np.testing.assert_allclose(fx[f"p_target_{when}"].values, expected, rtol=1e-6)
        delta = fx.p_target_after.values - fx.p_target_before.values[None]
        np.testing.assert_allclose(fx.delta_p_target.values, delta, rtol=1e-6)
        means = [
            np.mean(row[~np.isnan(row)]) if (~np.isnan(row)).any() else np.nan for row in delta
        ]
        np.testing.assert_allclose(fx.mean_delta_p_target.values, means, rtol=1e-6)
    assert undefined  # the case is reached (both keys outside the window for some prompt)


def test_captured_metrics_refuse_bad_input():
    from qktrace.verbs.intervene import intervene_captured

    net, tok = tiny("llama")
    m = load(net, tokenizer=tok)
    cap = capture(m, PROMPTS, "1.1", keys=[[1, 2]] * 3, progress=False)
    with pytest.raises(ValueError, match="not among its captured keys"):
        intervene_captured(cap, "1.1", basis(), orig=[1, 1, 1], target=[3, 2, 2])
    with pytest.raises(ValueError, match="not in captured"):
        intervene_captured(cap, "0.1", basis(), orig=[1, 1, 1], target=[2, 2, 2])
    no_attention = capture(m, PROMPTS, "1.1", keys=[[1, 2]] * 3, attention=False, progress=False)
    with pytest.raises(ValueError, match="attention=True"):
        intervene_captured(no_attention, "1.1", basis(), orig=[1, 1, 1], target=[2, 2, 2])
