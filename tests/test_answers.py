"""Answer-level effects: the edit written into the traced q/k is what changes the model's output."""

import warnings

import numpy as np
import pytest
import torch
import transformers.models.llama.modeling_llama as modeling_llama

from qktrace.model.loading import load
from qktrace.model.testing import model as fresh_model
from qktrace.run.batching import encode
from qktrace.verbs.answers import intervene_answers
from qktrace.verbs.decompose import random_subspaces
from qktrace.verbs.intervene import Edit, RandomBaseline
from tests.conftest import tiny

PROMPTS = [
    "The apple is in Box A, the cat is in Box B.",
    "Which box is the cat in? Box",
    "- apple\n- horse\n- water\nWhat are the fruits in the list?",
]
ORIG, TARGET = [1, 2, 3], [4, 5, -2]
CANDIDATES = [[10, 11, 12, 13]] * 3
ANSWER, TARGET_ANSWER = [0, 1, 2], [1, 2, 3]


def basis(d=16, r=8, seed=3):
    return np.linalg.qr(np.random.default_rng(seed).normal(size=(d, r)))[0]


def manual_logits(net, tok, prompt, edits, monkeypatch, weights=None):
    """Last-token logits of `net` (a plain model, never traced: nnsight rewrites a traced
    module's forward, which would bypass the wrapper) with the edits applied by a plain wrapper of the eager attention function.

    edits: {(layer, kv_head): (basis, kind, positions)}; kind "swap" (two key positions of a
    key head), "swap_query_head" (the same, on the copy of the keys only query head `kv_head`
    reads: the attention is then computed here, eagerly, with per-query-head keys) or
    "ablate_query" (the last token's query of query head kv_head). `weights`, a list, gets
    each edited layer's attention weights [heads, query, key].
    """
    original = modeling_llama.eager_attention_forward

    def swap(x, v, pos):
        o, t = pos
        delta = (x[t] @ v - x[o] @ v) @ v.T
        x[o] += delta
        x[t] -= delta

    def edited(module, query, key, value, attention_mask, scaling, *args, **kwargs):
        key, query = key.clone(), query.clone()
        per_head = {}
        for (layer, head), (v, kind, pos) in edits.items():
            if layer != module.layer_idx:
                continue
            v = torch.tensor(v, dtype=key.dtype)
            if kind == "swap":
                swap(key[0, head], v, pos)
            elif kind == "swap_query_head":
                per_head[head] = (v, pos)
            else:
                query[0, head, -1] -= (query[0, head, -1] @ v) @ v.T
        if not per_head:
            out, w = original(module, query, key, value, attention_mask, scaling, *args, **kwargs)
        else:  # eager attention with one copy of the keys per query head
            keys = modeling_llama.repeat_kv(key, module.num_key_value_groups).clone()
            values = modeling_llama.repeat_kv(value, module.num_key_value_groups)
            for head, (v, pos) in per_head.items():
                swap(keys[0, head], v, pos)
            logits = query @ keys.transpose(2, 3) * scaling
            if attention_mask is not None:
                logits = logits + attention_mask
            w = torch.softmax(logits.float(), dim=-1).to(query.dtype)
            out = (w @ values).transpose(1, 2).contiguous()
        if weights is not None and any(layer == module.layer_idx for layer, _ in edits):
            weights.append(w[0].detach().clone())
        return out, w

    monkeypatch.setattr(modeling_llama, "eager_attention_forward", edited)
    try:
        ids = torch.tensor([tok(prompt)["input_ids"]])
        with torch.inference_mode():
            return net(ids).logits[0, -1].float().numpy()
    finally:
        monkeypatch.setattr(modeling_llama, "eager_attention_forward", original)


@pytest.mark.parametrize("remote", [False, "local"], ids=["local", "remote-local"])
def test_key_swap_in_two_layers_matches_a_manual_edit(remote, monkeypatch):
    net, tok = tiny("llama")
    m = load(net, tokenizer=tok, remote=remote)
    bases = {"1.1": basis(seed=3), "0.2": basis(seed=4)}  # two layers; 1.1 reads key head 0
    fx = intervene_answers(
        m, PROMPTS, bases, candidates=CANDIDATES, answer=ANSWER, target_answer=TARGET_ANSWER,
        orig=ORIG, target=TARGET, random=RandomBaseline(2, seed=9), batch_size=2, progress=False,
        edit=Edit("swap", key_scope="key_head"),
    )  # fmt: skip
    lengths = encode(m, PROMPTS).lengths
    randoms = {
        label: random_subspaces(16, 8, 2, 9 + i) for i, label in enumerate(bases)
    }  # per head: seed + its index
    plain, _ = fresh_model("llama")  # the same weights (seeded), never wrapped by nnsight
    for p, prompt in enumerate(PROMPTS):
        pos = (ORIG[p] % lengths[p], TARGET[p] % lengths[p])
        clean = manual_logits(plain, tok, prompt, {}, monkeypatch)
        np.testing.assert_allclose(
            fx.answer_logit_before.values[p], clean[CANDIDATES[p]], atol=1e-5
        )
        for s, choose in (("subspace", lambda lab: bases[lab]), ("random_1", None)):
            pick = choose or (lambda lab: randoms[lab][1])
            edits = {(1, m.kv_head(1)): (pick("1.1"), "swap", pos),
                     (0, m.kv_head(2)): (pick("0.2"), "swap", pos)}  # fmt: skip
            want = manual_logits(plain, tok, prompt, edits, monkeypatch)[CANDIDATES[p]]
            got = fx.answer_logit_after.sel(subspace=s).values[p]
            np.testing.assert_allclose(got, want, atol=1e-5, err_msg=f"{s} {p}")
            # the edit really changed the answer logits (so the check above can fail)
            assert np.abs(want - clean[CANDIDATES[p]]).max() > 1e-4
    assert fx.attrs["forward_passes"] == 2 and fx.attrs["rows"] == 4 * len(PROMPTS)
    log_p = np.log(fx.answer_prob_after.values)
    np.testing.assert_allclose(  # probabilities are over the whole vocabulary: log-softmax
        log_p - fx.answer_logit_after.values,
        (log_p - fx.answer_logit_after.values)[..., :1] * np.ones((1, 1, 4)),
        atol=1e-4,
    )


def test_query_ablation_matches_a_manual_edit(monkeypatch):
    net, tok = tiny("llama")
    m = load(net, tokenizer=tok)
    v = basis(r=12, seed=5)
    fx = intervene_answers(
        m, PROMPTS, {"1.3": v}, candidates=CANDIDATES, answer=ANSWER,
        target_answer=TARGET_ANSWER, mode="ablate", side="query", random=1, progress=False,
    )  # fmt: skip
    plain, _ = fresh_model("llama")
    for p, prompt in enumerate(PROMPTS):
        want = manual_logits(plain, tok, prompt, {(1, 3): (v, "ablate_query", None)}, monkeypatch)
        clean = manual_logits(plain, tok, prompt, {}, monkeypatch)
        assert np.abs(want - clean).max() > 1e-4
        got = fx.answer_logit_after.sel(subspace="subspace").values[p]
        np.testing.assert_allclose(got, want[CANDIDATES[p]], atol=1e-5)


def test_metrics_follow_the_logits():
    """Flip, p(answer) and logit differences are read off the candidates' logits correctly."""
    from qktrace.verbs.answers import _answer_metrics

    logits = np.array([[[3.0, 1.0, 0.0]], [[0.0, 2.0, 1.0]], [[2.0, 1.0, 0.0]]])  # S=3, 1 prompt
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    ds = _answer_metrics(logits, logprobs, np.array([0]), np.array([1]), ["real", "random_0"])
    assert ds.answer_correct.item() and list(ds.answer_flip.values[:, 0]) == [True, False]
    np.testing.assert_allclose(ds.delta_answer_logit_diff.values[:, 0], [-4.0, -1.0])
    assert list(ds.answer_flip_rate.values) == [1.0, 0.0]
    assert list(ds.answer_moved.values[:, 0]) == [True, False]
    other = _answer_metrics(
        logits[:, :, ::-1], logprobs[:, :, ::-1], np.array([2]), np.array([0]), ["r", "q"]
    )
    # before: argmax 2 (the answer); after "r": argmax 1, neither answer nor target: moved, no flip
    assert list(other.answer_moved.values[:, 0]) == [True, False]
    assert not other.answer_flip.values.any()


def test_bad_input_names_the_fix():
    net, tok = tiny("llama")
    m = load(net, tokenizer=tok)
    kw = dict(candidates=CANDIDATES, answer=ANSWER, target_answer=TARGET_ANSWER, progress=False)
    with pytest.raises(ValueError, match="side='key'"):
        intervene_answers(m, PROMPTS, {"1.1": basis()}, side="query", **kw)
    with pytest.raises(ValueError, match="orig= and target="):
        intervene_answers(m, PROMPTS, {"1.1": basis()}, **kw)
    with pytest.raises(ValueError, match="index the 4 candidates"):
        intervene_answers(
            m, PROMPTS, {"1.1": basis()}, orig=ORIG, target=TARGET,
            **{**kw, "answer": [0, 1, 7]},
        )  # fmt: skip


def test_heads_sharing_a_key_head_get_one_edit_in_the_union():
    """key_scope="key_head": 1.0 and 1.1 read key head 0: swapping the same subspace for both
    is ONE swap (two sequential swaps would undo each other), and two different subspaces swap
    their union."""
    net, tok = tiny("llama")
    m = load(net, tokenizer=tok)
    v, w = basis(r=4, seed=1), basis(r=4, seed=2)
    kw = dict(
        candidates=CANDIDATES, answer=ANSWER, target_answer=TARGET_ANSWER, orig=ORIG,
        target=TARGET, random=1, progress=False, edit=Edit("swap", key_scope="key_head"),
    )  # fmt: skip
    one = intervene_answers(m, PROMPTS, {"1.0": v}, **kw)
    both = intervene_answers(m, PROMPTS, {"1.0": v, "1.1": v}, **kw)
    real = "subspace"
    np.testing.assert_allclose(
        both.answer_logit_after.sel(subspace=real), one.answer_logit_after.sel(subspace=real),
        atol=1e-6,
    )  # fmt: skip
    moved = one.answer_logit_after.sel(subspace=real) - one.answer_logit_before
    assert float(np.abs(moved).max()) > 1e-4
    union = np.linalg.qr(np.concatenate([v, w], axis=1))[0]
    pair = intervene_answers(m, PROMPTS, {"1.0": v, "1.1": w}, **kw)
    merged = intervene_answers(m, PROMPTS, {"1.0": union}, **kw)
    np.testing.assert_allclose(
        pair.answer_logit_after.sel(subspace=real), merged.answer_logit_after.sel(subspace=real),
        atol=1e-5,
    )  # fmt: skip
    assert pair.attrs["key_edit_ranks"] == {"1.kv0": 8}


@pytest.mark.parametrize("remote", [False, "local"], ids=["local", "remote-local"])
def test_a_per_query_head_key_swap_matches_a_manual_eager_edit(remote, monkeypatch):
    """key_scope="query_head" (the default) on a GQA model (4 query heads, 2 key heads): heads
    1.1 and 1.0 (one key head) each swap their own copy of the keys, in their own subspaces and
    their own random draws; the answer logits equal an eager forward that repeats the key
    heads and edits each query head's copy, and differ from the key-head edit's."""
    net, tok = tiny("llama")
    m = load(net, tokenizer=tok, remote=remote)
    bases = {"1.1": basis(r=4, seed=3), "1.0": basis(r=4, seed=4)}
    kw = dict(
        candidates=CANDIDATES, answer=ANSWER, target_answer=TARGET_ANSWER, orig=ORIG,
        target=TARGET, random=RandomBaseline(1, seed=9), batch_size=2, progress=False,
    )  # fmt: skip
    fx = intervene_answers(m, PROMPTS, bases, **kw)
    shared = intervene_answers(m, PROMPTS, bases, edit=Edit("swap", key_scope="key_head"), **kw)
    assert fx.attrs["key_scope"] == "query_head"
    assert fx.attrs["key_edit_ranks"] == {"1.1": 4, "1.0": 4}
    lengths = encode(m, PROMPTS).lengths
    randoms = {label: random_subspaces(16, 4, 1, 9 + i)[0] for i, label in enumerate(bases)}
    plain, _ = fresh_model("llama")
    change = {"subspace": 0.0, "random_0": 0.0}
    for p, prompt in enumerate(PROMPTS):
        pos = (ORIG[p] % lengths[p], TARGET[p] % lengths[p])
        clean = manual_logits(plain, tok, prompt, {}, monkeypatch)[CANDIDATES[p]]
        np.testing.assert_allclose(fx.answer_logit_before.values[p], clean, atol=1e-5)
        for s, pick in (("subspace", bases), ("random_0", randoms)):
            edits = {(1, int(label[-1])): (pick[label], "swap_query_head", pos) for label in bases}
            want = manual_logits(plain, tok, prompt, edits, monkeypatch)[CANDIDATES[p]]
            got = fx.answer_logit_after.sel(subspace=s).values[p]
            np.testing.assert_allclose(got, want, atol=1e-6, err_msg=f"{s} {p}")
            change[s] = max(change[s], float(np.abs(want - clean).max()))
    assert min(change.values()) > 1e-4  # the edits moved the logits: the checks above can fail
    real = fx.answer_logit_after.sel(subspace="subspace").values
    assert np.abs(shared.answer_logit_after.sel(subspace="subspace").values - real).max() > 1e-4


def test_a_per_query_head_edit_moves_only_its_heads_attention(monkeypatch):
    """On a GQA model, a per-query-head key swap for head 1.1 changes the attention of head 1.1
    alone, the key-head swap that of its whole group (1.0 and 1.1); the other group's heads
    (1.2, 1.3) never move. Checked twice: in the manual eager computation's attention weights,
    and in the traced model's per-head attention outputs (the input of o_proj) under
    `intervene_answers`, copy 1 (the edit) against copy 0 (unedited)."""
    net, tok = tiny("llama")
    m = load(net, tokenizer=tok)
    prompt, pos, v = PROMPTS[0], (1, 4), basis(r=6, seed=3)
    plain, _ = fresh_model("llama")

    def moved(a, b):
        return {h for h in range(4) if float((a[h] - b[h]).abs().max()) > 1e-5}

    clean = []
    manual_logits(plain, tok, prompt, {(1, 1): (np.zeros((16, 1)), "swap_query_head", pos)},
                  monkeypatch, weights=clean)  # fmt: skip
    for scope, edit, group in (
        ("query_head", {(1, 1): (v, "swap_query_head", pos)}, {1}),
        ("key_head", {(1, m.kv_head(1)): (v, "swap", pos)}, {0, 1}),
    ):
        weights = []
        manual_logits(plain, tok, prompt, edit, monkeypatch, weights=weights)
        assert moved(weights[0], clean[0]) == group, scope
        outputs: list = []
        hook = net.model.layers[1].self_attn.o_proj.register_forward_pre_hook(
            lambda _, args, seen=outputs: seen.append(args[0].detach().clone())
        )
        try:
            intervene_answers(
                m, [prompt], {"1.1": v}, candidates=[CANDIDATES[0]], answer=[0],
                target_answer=[1], orig=[pos[0]], target=[pos[1]], random=0, progress=False,
                edit=Edit("swap", key_scope=scope),
            )  # fmt: skip
        finally:
            hook.remove()
        per_head = outputs[0].reshape(2, -1, 4, 16).transpose(1, 2)  # [copy, head, token, d]
        assert moved(per_head[1], per_head[0]) == group, scope


def test_random_baselines_are_per_query_head():
    """Two heads of one group, the same subspace: the key-head edit is one edit of one key head
    with the same draws (identical rows, the issue); per query head, each head's own."""
    net, tok = tiny("llama")
    m = load(net, tokenizer=tok)
    v = basis(r=4, seed=1)
    kw = dict(
        candidates=CANDIDATES, answer=ANSWER, target_answer=TARGET_ANSWER, orig=ORIG,
        target=TARGET, random=2, progress=False,
    )  # fmt: skip

    def after(head, scope):
        fx = intervene_answers(m, PROMPTS, {head: v}, edit=Edit("swap", key_scope=scope), **kw)
        return fx.answer_logit_after.values

    np.testing.assert_allclose(after("1.0", "key_head"), after("1.1", "key_head"), atol=1e-6)
    assert np.abs(after("1.0", "query_head") - after("1.1", "query_head")).max() > 1e-4


def test_a_string_candidate_counts_by_its_surface_forms_and_an_ambiguous_token_for_none(
    monkeypatch,
):
    """ "apple" is said as "a|pp|le", "Ġapple", "A|pp|le" or "ĠA|pp|le" by this tokenizer, and
    "apricot" as "a|...", "Ġa|...", "A|..." or "ĠA|...": only "Ġapple" and "Ġa" tell them
    apart. "pear" is said as "p|e|ar", "P|e|ar" (and "Ġ|p|e|ar": after a bare space, "p")."""
    net, tok = tiny("llama")
    m = load(net, tokenizer=tok)
    ids = {s: tok.convert_tokens_to_ids(s) for s in ["a", "A", "ĠA", "Ġapple", "Ġa", "p", "P"]}
    fx = intervene_answers(
        m, PROMPTS[:2], {"1.1": basis()}, candidates=[["apple", "apricot", "pear"]] * 2,
        answer=[0, 2], target_answer=[1, 0], orig=ORIG[:2], target=TARGET[:2], random=0,
        progress=False,
    )  # fmt: skip
    assert list(fx.candidate_token.values[0]) == ["Ġapple", "Ġa", "p|P"]
    plain, _ = fresh_model("llama")
    for p, prompt in enumerate(PROMPTS[:2]):
        logits = manual_logits(plain, tok, prompt, {}, monkeypatch).astype(np.float64)
        prob = np.exp(logits - logits.max()) / np.exp(logits - logits.max()).sum()
        want = [prob[ids["Ġapple"]], prob[ids["Ġa"]], prob[ids["p"]] + prob[ids["P"]]]
        np.testing.assert_allclose(fx.answer_prob_before.values[p], want, rtol=1e-4)
        # the logit of a candidate: logsumexp of its forms' logits (differences are log-odds)
        pear = np.logaddexp(logits[ids["p"]], logits[ids["P"]])
        np.testing.assert_allclose(fx.answer_logit_before.values[p, 2], pear, atol=1e-4)
        np.testing.assert_allclose(fx.answer_candidate_mass.values[p], sum(want), rtol=1e-4)
        # a wrong implementation counting "apple"'s ambiguous first tokens would add these
        assert prob[[ids["a"], ids["A"], ids["ĠA"]]].sum() > 1e-3 * want[0]
    assert float(fx.mean_answer_candidate_mass) == pytest.approx(
        float(fx.answer_candidate_mass.mean())
    )
    # a tuple gives the forms exactly; a candidate with no first token of its own is an error
    exact = intervene_answers(
        m, PROMPTS[:1], {"1.1": basis()}, candidates=[[("pear",), ids["P"]]], answer=[0],
        target_answer=[1], orig=ORIG[:1], target=TARGET[:1], random=0, progress=False,
    )  # fmt: skip
    assert list(exact.candidate_token.values[0]) == ["p", "P"]
    # a candidate with no first token of its own is unscored: NaN, never the argmax, and a
    # prompt whose answer it is does not count as answered
    from qktrace.verbs.answers import CandidateMassWarning

    with pytest.warns(CandidateMassWarning, match="1 candidates of 1 of 1 prompts"):
        unscored = intervene_answers(
            m, PROMPTS[:1], {"1.1": basis()}, candidates=[["apple", ("a",), "pear"]],
            answer=[1], target_answer=[0], orig=ORIG[:1], target=TARGET[:1], random=0,
            progress=False,
        )  # fmt: skip
    assert list(unscored.candidate_token.values[0]) == ["Ġapple|A|ĠA", "", "p|P"]  # "a" shared
    assert np.isnan(unscored.answer_prob_before.values[0, 1])
    assert not unscored.answer_correct.item() and unscored.answer_argmax_before.item() != 1
    np.testing.assert_allclose(
        unscored.answer_candidate_mass.values, np.nansum(unscored.answer_prob_before.values)
    )


def test_the_candidate_mass_warns_when_the_candidates_are_not_what_the_model_says():
    from qktrace.verbs.answers import CandidateMassWarning

    net, tok = tiny("llama")
    m = load(net, tokenizer=tok)
    kw = dict(answer=[0], target_answer=[1], orig=ORIG[:1], target=TARGET[:1], random=0,
              progress=False)  # fmt: skip
    with pytest.warns(CandidateMassWarning, match="not what the model says"):
        few = intervene_answers(m, PROMPTS[:1], {"1.1": basis()}, candidates=[[10, 11]], **kw)
    assert 0 < float(few.mean_answer_candidate_mass) < 0.1
    with warnings.catch_warnings():
        warnings.simplefilter("error", CandidateMassWarning)
        every = intervene_answers(  # every token of the vocabulary: all of the probability
            m, PROMPTS[:1], {"1.1": basis()}, candidates=[list(range(len(tok)))], **kw
        )
    assert float(every.answer_candidate_mass[0]) == pytest.approx(1.0, abs=1e-4)


def test_a_bare_space_first_token_counts_by_the_token_after_it():
    """A SentencePiece-style tokenizer spells " U" (and "U") as "▁" + "U": "▁" starts every
    candidate, so counting it would make every box letter unscored (or all alike)."""
    from qktrace.verbs.answers import candidate_tokens

    _, tok = fresh_model("qwen3", tokenizer_style="metaspace")
    assert tok.convert_ids_to_tokens(tok("U", add_special_tokens=False)["input_ids"])[0] == "▁"
    ids, counted = candidate_tokens(tok, [["U", "Y", "D"]])
    got = [tok.convert_ids_to_tokens([int(t) for t in ids[0, c][counted[0, c]]]) for c in range(3)]
    assert got == [["U"], ["Y"], ["D"]]
