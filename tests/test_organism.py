"""The shipped model organism (data/organism): it loads like any checkpoint and solves the tasks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import qktrace
from qktrace import organism
from qktrace.core.prompts import locate


def _shipped() -> bool:
    try:
        organism.path()
    except FileNotFoundError:
        return False
    return True


pytestmark = pytest.mark.skipif(
    not _shipped(),
    reason="no organism checkpoint in data/organism: python -m qktrace.organism.train "
    "--out data/organism",
)


@pytest.fixture(scope="module")
def lm():
    return qktrace.load(str(organism.path()))


def _greedy(lm, loc):
    """Greedy next token of every located prompt, through the nnsight-wrapped model."""
    out = []
    for ids in loc.ids:
        with torch.inference_mode(), lm.trace([ids]):
            logits = lm.lm.lm_head.output[0, -1].save()
        out.append(lm.tokenizer.convert_ids_to_tokens(int(logits.argmax())))
    return out


def test_loads_through_qktrace_load(lm):
    assert lm.adapter.family == "llama"
    assert lm.n_kv_heads < lm.n_heads  # grouped-query attention
    assert lm.tokenizer.is_fast and lm.tokenizer.chat_template
    heads = organism.heads()
    assert set(heads) == {"binding", "filter_heads"}
    lm.check_heads(qktrace.parse_heads(heads["binding"]))
    lm.check_heads(qktrace.parse_heads(organism.heads("order_id")))


def test_answers_a_boxes_and_a_filter_question(lm):
    from qktrace.studies import binding, filter_heads

    boxes = binding.build_prompts(3, 9, seed=123)
    lists = filter_heads.build_prompts(3, seed=123)  # all, first, last questions
    loc_b, loc_f = locate(lm.tokenizer, boxes), locate(lm.tokenizer, lists)
    got = _greedy(lm, loc_b)
    assert got == [p.meta["letters"][p.meta["answer"]] for p in boxes]
    from qktrace.organism.data import targets

    for p, token in zip(lists, _greedy(lm, loc_f), strict=True):
        assert token in targets(p), (p.meta["question"], p.meta["asked"], token)


def test_capture_remote_local(lm):
    from qktrace.studies import binding

    prompts = binding.build_prompts(4, 4, seed=7)
    loc = locate(lm.tokenizer, prompts)
    head = organism.heads("binding").split(",")[0]
    local = qktrace.capture(lm, loc.ids, head, keys=loc.positions["box"], progress=False)
    remote = qktrace.load(str(organism.path()), remote="local")
    sim = qktrace.capture(remote, loc.ids, head, keys=loc.positions["box"], progress=False)
    np.testing.assert_allclose(sim["k"].values, local["k"].values, rtol=1e-5, atol=1e-5)
    # the top binding head attends from "Box" to the asked box more than to any other box
    att = local["attention"].isel(head=0, query=0).values  # [prompt, key]
    answer = np.array([p.meta["answer"] for p in prompts])
    assert (att.argmax(-1) == answer).mean() >= 0.75


def test_study_without_model_runs_on_the_organism(tmp_path):
    """`qktrace study order-id` with no --model and no --heads: the organism and its heads."""
    from typer.testing import CliRunner

    from qktrace.cli import app

    args = ["study", "order-id", "-o", tmp_path, "--n-prompts", 6, "--n-test", 3]
    args += ["--n-pairs", 3, "--n-random", 1, "--no-figures", "--quiet"]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    ds = qktrace.open(tmp_path / "order_id.zarr")
    assert Path(ds.attrs["model"]).resolve() == organism.path().resolve()
    params = ds.attrs["params"]
    assert params["heads_from"] == "organism" and params["n_prompts"] == 6
    assert params["heads"] == organism.heads("order_id").split(",")
    # the store's shape: named dims, the organism's d_head, one feature "order"
    assert [str(h) for h in ds["head"].values] == params["heads"]
    assert [str(f) for f in ds["feature"].values] == ["order"]
    assert ds.sizes["dq"] == ds.sizes["dk"] == 32 and ds.sizes["prompt"] == 3
    assert ds["key_basis"].dims == ("head", "feature", "dk", "component")
    assert ds["k"].dims == ("prompt", "head", "key", "d_head") and ds.sizes["key"] == 3
    assert ds["flip_rate"].dims == ("head", "subspace") and ds.sizes["subspace"] == 2
    assert ds["null_rank"].dims == ("head", "feature")
    assert (ds["null_rank"].values >= 0).all() and "null_rank" in result.output


def test_eval_command_prints_both_tasks():
    from typer.testing import CliRunner

    from qktrace.cli import app

    args = ["organism", "eval", "--n", "4", "--groups", "boxes n=9,filter all"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    for text in ("boxes n=9", "filter all", "binding (boxes)", "filtering (lists)"):
        assert text in result.output
    assert "boxes n=3" not in result.output


def test_card_and_heads_file():
    directory = organism.path()
    card = (directory / "CARD.md").read_text()
    for fact in ("Held-out accuracy", "Seed", "python -m qktrace.organism.train", "Training aids"):
        assert fact in card
    table = json.loads((directory / "heads.json").read_text())
    assert table["heads"]["binding"] and table["heads"]["filter_heads"]
    size = sum(p.stat().st_size for p in directory.iterdir() if p.is_file())
    assert size < 8 * 2**20
