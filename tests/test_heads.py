"""find_heads must find a planted answer-retrieving head, and agree with capture's attention."""

import numpy as np
import pytest
import torch

import qktrace.model.testing as testing
from qktrace.model.loading import load
from qktrace.verbs.capture import capture
from qktrace.verbs.find_heads import find_heads
from tests.conftest import tiny

MARKER, ASKER = 50, 60  # token ids: the answer's token, and the query token
_PLANTED: list = []


def planted_model():
    """A tiny Llama whose head 0.2 attends from ASKER tokens to MARKER tokens, nothing else.

    Hidden dim 0 flags MARKER and dim 1 flags ASKER in the embeddings; head 2 of layer 0 reads
    dim 1 into its query and its key head reads dim 0 into its key, on the rotary pair (7, 15),
    whose frequency is so low that RoPE barely turns it over a few tokens. So q·k is large
    exactly between the asker (the last token) and the marker.
    """
    if not _PLANTED:
        net, tok = testing.model("llama", seed=3)
        with torch.no_grad():
            emb = net.model.embed_tokens.weight
            emb[:, :2] = 0.0
            emb[MARKER, 0] = emb[ASKER, 1] = 10.0
            attn = net.model.layers[0].self_attn
            q_row = 2 * 16 + 7  # head 2, dim 7
            k_row = 1 * 16 + 7  # key head 1 (head 2 // group size 2), dim 7
            attn.q_proj.weight[2 * 16 : 3 * 16] = 0.0
            attn.q_proj.weight[q_row, 1] = 5.0
            attn.k_proj.weight[k_row] = 0.0
            attn.k_proj.weight[k_row, 0] = 5.0
        _PLANTED.append((net, tok))
    return _PLANTED[0]


def planted_prompts(n=6, seed=0):
    rng = np.random.default_rng(seed)
    prompts, answers = [], []
    for _ in range(n):
        length = int(rng.integers(8, 14))
        ids = [int(i) for i in rng.integers(70, 300, size=length)]
        answer = int(rng.integers(1, length - 1))
        ids[answer], ids[-1] = MARKER, ASKER
        prompts.append(ids)
        answers.append(answer)
    return prompts, answers


def test_finds_the_planted_head(remote):
    net, tok = planted_model()
    m = load(net, tokenizer=tok, remote=remote)
    prompts, answers = planted_prompts()
    keys = [list(range(1, len(p) - 1)) for p in prompts]
    best = find_heads(m, prompts, answers, keys=keys, top=3, batch_size=4, progress=False)
    assert best["head"].values[0] == "0.2"
    assert best.ranking.values.tolist() == [1, 2, 3]
    top = best.isel(head=0)
    assert top.answer_attention > 0.99 and top.answer_argmax == 1.0 and top.answer_share > 0.99
    assert best.answer_attention.values[1] < 0.5
    assert list(best.layer.values[:1]) == [0] and best.kv_head.values[0] == 1


def test_scores_agree_with_capture(remote):
    net, tok = tiny("qwen3")
    m = load(net, tokenizer=tok, remote=remote)
    prompts = [
        "The apple is in Box A, the cat is in Box B.",
        "Which box is the cat in? Box",
        "- apple\n- horse\n- water\nWhat are the fruits in the list?",
    ]
    keys = [[1, 3, 5], [2, 4], [1, 2, 6, 7]]
    answers = [3, 2, 7]
    table = find_heads(m, prompts, answers, keys=keys, top=None, by="answer_argmax", progress=False)
    assert table.sizes["head"] == m.n_layers * m.n_heads
    ds = capture(m, prompts, [h.label for h in m.all_heads()], keys=keys, progress=False)
    att = ds.attention.values[:, :, 0]  # [prompt, head, key]
    slot = np.array([row.index(a) for row, a in zip(keys, answers, strict=True)])
    rows = np.arange(3)
    on_answer = att[rows, :, slot]
    argmax = np.where(np.isnan(att), -np.inf, att).argmax(-1) == slot[:, None]
    share = on_answer / np.nansum(att, axis=-1)
    labels = list(ds["head"].values)
    for h, label in enumerate(table["head"].values):
        i = labels.index(label)
        row = table.isel(head=h)
        assert float(row.answer_attention) == pytest.approx(on_answer[:, i].mean(), abs=1e-6)
        assert float(row.answer_share) == pytest.approx(share[:, i].mean(), abs=1e-6)
        assert float(row.answer_argmax) == pytest.approx(argmax[:, i].mean())
    assert (np.diff(table.answer_argmax.values) <= 0).all()


def test_layers_and_errors(llama):
    prompts = ["The apple is in Box A, the cat is in Box B.", "Which box is the cat in? Box"]
    keys = [[1, 2], [3, 4]]
    out = find_heads(llama, prompts, [2, 3], keys=keys, layers=[1], top=None, progress=False)
    assert set(out.layer.values) == {1} and out.sizes["head"] == 4
    with pytest.raises(ValueError, match=r"answer position 5 is not among .*\[3, 4\].*add it"):
        find_heads(llama, prompts, [2, 5], keys=keys, progress=False)
    with pytest.raises(ValueError, match="Layer 4 is out of range"):
        find_heads(llama, prompts, [2, 3], keys=keys, layers=[4], progress=False)
    with pytest.raises(ValueError, match="one token position per prompt"):
        find_heads(llama, prompts, [2], keys=keys, progress=False)
    with pytest.raises(ValueError, match="by must be one of"):
        find_heads(llama, prompts, [2, 3], keys=keys, by="loudest", progress=False)
