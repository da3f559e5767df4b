"""`qktrace eval`: task accuracy among the candidate answers, on the organism and a tiny model."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from qktrace import organism
from qktrace.cli import app
from qktrace.core.prompts import boxes_prompts, filter_prompts
from qktrace.model.loading import load
from qktrace.store import io as store
from qktrace.verbs.evaluate import candidates, evaluate, task_sets
from tests.conftest import tiny


@pytest.fixture(scope="module")
def organism_model():
    return load(organism.path())


def test_candidates_and_correct_answers():
    box = boxes_prompts(1, 4, seed=0)[0]
    names, right = candidates(box)
    assert names == box.meta["letters"] and sum(right) == 1
    assert names[right.index(True)] == box.meta["letters"][box.meta["answer"]]
    for question, n_right in (("all", 5), ("first", 1), ("last", 1)):
        p = filter_prompts(1, questions=[question], seed=4)[0]
        names, right = candidates(p)
        assert len(names) == 15 and sum(right) == n_right
        hits = [i for i, c in enumerate(p.meta["item_categories"]) if c == p.meta["asked"]]
        if question != "all":
            assert right.index(True) == (hits[0] if question == "first" else hits[-1])


def test_organism_solves_its_tasks(organism_model, remote):
    """The organism is trained to 100% on these tasks; chance is far lower."""
    if remote is False:
        model, groups = organism_model, None
    else:
        model, groups = load(organism.path(), remote=remote), ["boxes", "filter first"]
    ds = evaluate(model, n=8, pairs=[3, 9], groups=groups, progress=False)
    chance = {"boxes n=3": 1 / 3, "boxes n=9": 1 / 9, "order-id n=3": 1 / 3}
    chance.update({"order-id n=9": 1 / 9, "filter all": 5 / 15, "filter first": 1 / 15})
    chance["filter last"] = 1 / 15
    expected = [
        t for t in task_sets(8, pairs=[3, 9]) if groups is None or t.startswith(tuple(groups))
    ]
    assert list(ds["task"].values) == expected
    np.testing.assert_allclose(ds["chance"].values, [chance[t] for t in expected])
    assert (ds["accuracy"] >= 0.85).all(), ds["accuracy"].values
    assert (ds["candidate_mass"].sel(task=["boxes n=3", "filter first"]) > 0.9).all()


def test_random_weights_score_near_chance():
    net, tok = tiny("llama")
    ds = evaluate(load(net, tokenizer=tok), n=40, pairs=[2], groups=["boxes"], progress=False)
    assert abs(float(ds["accuracy"].sel(task="boxes n=2")) - 0.5) < 0.3
    assert float(ds["candidate_mass"].sel(task="boxes n=2")) < 0.5
    # the interval: Wilson's, over the task's 40 prompts, and printed beside the accuracy
    from scipy import stats

    from qktrace.verbs.evaluate import format_table

    k = round(float(ds["accuracy"].sel(task="boxes n=2")) * 40)
    ci = stats.binomtest(k, 40).proportion_ci(method="wilson")
    low, high = float(ds["accuracy_low"][0]), float(ds["accuracy_high"][0])
    np.testing.assert_allclose([low, high], [ci.low, ci.high], atol=1e-12)
    assert f"[{low:.1%}, {high:.1%}]" in format_table(ds).splitlines()[1]


def test_bad_arguments_are_clear():
    net, tok = tiny("llama")
    model = load(net, tokenizer=tok)
    with pytest.raises(ValueError, match="match no group"):
        evaluate(model, n=2, groups=["nonsense"], progress=False)
    with pytest.raises(ValueError, match="at least 1 prompt"):
        evaluate(model, n=0, progress=False)


def test_cli_eval_writes_store_and_figure(tmp_path):
    runner = CliRunner()
    args = ["eval", "-o", str(tmp_path), "--n", "6", "--pairs", "2-3", "--groups", "boxes", "-q"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert "boxes n=2" in result.output and "chance" in result.output
    ds = store.open(tmp_path / "eval.zarr")
    assert list(ds["task"].values) == ["boxes n=2", "boxes n=3"]
    assert ds.attrs["verb"] == "evaluate"
    assert (tmp_path / "eval.png").stat().st_size > 0
    again = runner.invoke(app, args)
    assert again.exit_code == 2 and "already exists" in again.output
    bad = runner.invoke(app, ["eval", "--pairs", "two"])
    assert bad.exit_code == 2 and "--pairs" in bad.output
