"""A study's head search shares its forward pass with the capture of the fresh prompts.

Counted at the model itself (a forward pre-hook on the torch module that nnsight runs), a study
on a model with no heads given runs n_prompts + n_test prompt rows, not n_prompts + 2 n_test,
and chooses exactly the heads `find_heads` chooses on the same prompts, with the same scores and
the same captured q and k. Over the memory cap, it falls back to a pass of its own and says so.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import qktrace.model.testing as testing
import qktrace.study.head_search as head_search
import qktrace.study.pipeline as pipeline
from qktrace.model.loading import load
from qktrace.store import io as store
from qktrace.study.pipeline import load_study, run_study
from qktrace.study.prompts import prepare
from qktrace.verbs.capture import capture
from qktrace.verbs.find_heads import find_heads

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "gender_agreement.py"
SIZES = {"n_prompts": 12, "n_test": 7, "n_random": 1, "batch_size": 4}


def rows_run(net) -> list[int]:
    """Prompt rows of every forward pass of `net`, appended as they run."""
    rows: list[int] = []

    def count(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        rows.append(int(ids.shape[0]))

    net.register_forward_pre_hook(count, with_kwargs=True)
    return rows


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "over-the-cap"])
def test_head_search_shares_the_fresh_prompts_pass(tmp_path, monkeypatch, shared):
    study = load_study(EXAMPLE)
    net, tok = testing.model("llama")
    lm = load(net, tokenizer=tok)
    if not shared:
        monkeypatch.setattr(head_search, "MAX_BYTES", 0)
    answer_rows: list[int] = []
    real_answers = pipeline.answer_swaps

    def answers_apart(*args, **kwargs):  # the answer-level step is counted on its own
        before = len(rows)
        try:
            return real_answers(*args, **kwargs)
        finally:
            answer_rows.extend(rows[before:])
            del rows[before:]

    monkeypatch.setattr(pipeline, "answer_swaps", answers_apart)
    rows = rows_run(net)
    path = run_study(study, lm, out=tmp_path, figures=False, progress=False, **SIZES)
    extra = 0 if shared else SIZES["n_test"]  # the separate search reads the fresh prompts again
    assert sum(rows) == SIZES["n_prompts"] + SIZES["n_test"] + extra

    ds = store.open(path).load()
    params = ds.attrs["params"]
    assert params["heads_from"] == "find_heads"
    assert params["find_heads_pass"].startswith("shared" if shared else "separate")
    # the same heads, scores and captured q/k as find_heads and capture on the same prompts
    test = prepare(study, lm.tokenizer, SIZES["n_test"], 0, None, "fresh")
    answer = [row[a] for row, a in zip(test.keys, test.answer, strict=True)]
    found = find_heads(lm, test.ids, answer, keys=test.keys, query=test.query, top=None,
                       batch_size=SIZES["batch_size"], progress=False)  # fmt: skip
    assert params["heads"] == [str(h) for h in found["head"].values[:3]]
    assert ds.sizes["ranked_head"] == lm.n_layers * lm.n_heads
    assert list(ds["ranked_head"].values) == [str(h) for h in found["head"].values]
    np.testing.assert_allclose(
        ds["find_answer_attention"].values, found["answer_attention"].values, rtol=1e-6
    )
    alone = capture(lm, test.ids, params["heads"], query=test.query, keys=test.keys,
                    batch_size=SIZES["batch_size"], progress=False)  # fmt: skip
    for name in ("q", "k", "attention"):
        np.testing.assert_allclose(ds[name].values, alone[name].values, rtol=1e-5, atol=1e-6)


def test_a_remote_run_shares_the_pass_only_under_its_own_cap(monkeypatch):
    """What a shared search keeps travels back from NDIF: a remote model has a smaller cap."""
    study = load_study(EXAMPLE)
    net, tok = testing.model("llama")
    lm = load(net, tokenizer=tok, remote="local")
    test = prepare(study, lm.tokenizer, 3, 0, None, "fresh")
    need = head_search.capture_bytes(lm, test, lm.n_layers * lm.n_heads)
    monkeypatch.setattr(head_search, "MAX_BYTES", need)  # would share, were it local
    monkeypatch.setattr(head_search, "MAX_REMOTE_BYTES", need - 1)
    ranking, captured, how = head_search.search_and_capture(lm, test, 3, 4, False)
    assert captured is None and how.startswith("separate") and "remote" in how
    monkeypatch.setattr(head_search, "MAX_REMOTE_BYTES", need)
    shared_ranking, captured, how = head_search.search_and_capture(lm, test, 3, 4, False)
    assert how.startswith("shared") and list(captured["head"].values) == list(
        ranking["head"].values[:3]
    )
    np.testing.assert_allclose(
        shared_ranking["answer_attention"].values, ranking["answer_attention"].values, rtol=1e-6
    )
