"""The language-model studies run end to end and store what they claim, locally and remote="local".

Tiny random-weight Llama (byte-level BPE) and Qwen3 (Metaspace, grouped-query attention)
checkpoints are saved to disk with chat templates, as a hub checkpoint would be. Random weights
give no real findings: these tests check the mechanics (prompts -> positions -> sums -> subspaces
-> store -> figures -> CLI), and that the simulated NDIF path gives the same numbers as a local run.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from typer.testing import CliRunner

import qktrace.model.testing as testing
from qktrace.cli import app
from qktrace.core.prompts import load_categories, load_objects
from qktrace.model.loading import load
from qktrace.store import io as store
from qktrace.studies import binding, filter_heads, lexical, order_id

FAMILIES = {"llama": "bpe", "qwen3": "metaspace"}
HEAD = "1.3"  # Qwen3 tiny: 4 query heads share 2 key heads, so this one reads key head 1
FAST = {"n_prompts": 32, "n_test": 8, "n_random": 2, "n_random_answers": 1, "batch_size": 32}
CATEGORIES = ["fruit", "animal"]
N_PAIRS = 3


@pytest.fixture(scope="module", params=list(FAMILIES))
def checkpoint(request, tmp_path_factory):
    family = request.param
    path = tmp_path_factory.mktemp(family) / "model"
    return testing.save_checkpoint(path, family, tokenizer_style=FAMILIES[family])


def cli(*args: str) -> str:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result.output


def cli_flags() -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()] + ["--quiet"]


def last_char_in_token(ds, spans) -> None:
    """Each stored key token holds the last character of its span (item, box letter)."""
    for p in range(ds.sizes["prompt"]):
        for j in range(ds.sizes["key"]):
            token = str(ds["key_token"].values[p, j]).replace("Ġ", " ").replace("▁", " ")
            assert spans[p][j][-1] in token, (p, j, token, spans[p][j])


def check_answers(a, b, name: str) -> None:
    """Answer-level variables: labelled dims, probabilities, and remote-local = local."""
    assert list(a["answer_heads"].values) == [HEAD]  # one head: no "all" set
    assert list(a["answer_subspace"].values) == [name, "random_0"]
    assert a["answer_random"].values.tolist() == [False, True]
    assert a["answer_prob_after"].dims == (
        "answer_heads",
        "answer_subspace",
        "prompt",
        "answer_candidate",
    )
    assert a["answer_flip"].dims == ("answer_heads", "answer_subspace", "prompt")
    assert a["answer_flip_rate"].dims == ("answer_heads", "answer_subspace")
    p = a["answer_prob_before"]  # NaN: a candidate with no first token of its own (unscored)
    assert (((p > 0) & (p <= 1)) | p.isnull()).all() and p.notnull().any()
    np.testing.assert_allclose(a["answer_candidate_mass"], p.sum("answer_candidate"), rtol=1e-6)
    assert (a["answer_prob_before"].sum("answer_candidate") <= 1 + 1e-5).all()
    diff = a["answer_logit_diff_after"] - a["answer_logit_diff_before"]
    np.testing.assert_allclose(diff, a["delta_answer_logit_diff"], atol=1e-5)
    np.testing.assert_allclose(a["answer_logit_after"], b["answer_logit_after"], atol=1e-4)
    assert int(a["answer_correct"].sum()) == 0 or np.isfinite(a["answer_flip_rate"]).all()


def test_filter_heads_local_and_remote_local_agree(checkpoint, tmp_path):
    local = filter_heads.run(
        checkpoint, heads=HEAD, out=tmp_path / "a", categories=CATEGORIES, progress=False, **FAST
    )
    cli(
        "study", "filter-heads", "-m", checkpoint, "--heads", HEAD, "--remote-local",
        "--categories", ",".join(CATEGORIES), "--no-figures", "-o", tmp_path / "b", *cli_flags(),
    )  # fmt: skip
    a = store.open(local).load()
    b = store.open(tmp_path / "b" / "filter_heads.zarr").load()

    # named dims and label coordinates
    assert list(a["head"].values) == [HEAD] and a["layer"].values.tolist() == [1]
    assert list(a["feature"].values) == CATEGORIES
    assert a["rank"].dims == ("head", "feature")
    assert a["key_basis"].dims == ("head", "feature", "dk", "component")
    assert a["k"].dims == ("prompt", "head", "key", "d_head")
    assert a["key_pc"].dims == ("head", "prompt", "key", "pc")
    for name in ("category", "item", "key_label", "key_token"):
        assert a[name].dims == ("prompt", "key")
    assert a["asked"].dims == ("prompt",)
    assert set(a["subspace"].values) == {"category", "random_0", "random_1"}
    assert a["flip_rate"].dims == ("head", "subspace")
    assert a.attrs["study"] == "filter_heads" and a.attrs["remote"] == "local"
    assert all("<|assistant|>" in str(t) for t in a["prompt_text"].values)  # chat template
    assert b.attrs["remote"] == "remote-local" and a.attrs["params"]["heads"] == [HEAD]

    # labels: positives are exactly the asked category's items, 5 per prompt
    positive = a["key_label"].values == "positive"
    assert (positive == (a["category"].values == a["asked"].values[:, None])).all()
    assert (positive.sum(1) == 5).all()
    counts = a["pair_count"].sel(head=HEAD)
    assert counts.sel(contrast="positive").values.tolist() == [16 * 5, 16 * 5]
    assert counts.sel(contrast="negative").values.tolist() == [16 * 5, 16 * 5]
    last_char_in_token(a, a["item"].values)
    assert ((a["rank"] >= 1) & (a["rank"] <= 16)).all()
    # the permutation null of every category's ΔC, on the fresh prompts' pairs
    assert a["null_rank"].dims == ("head", "feature") and (a["null_rank"] >= 0).all()
    assert a["null_quantile"].dims == ("head", "feature", "component")

    # the simulated NDIF request gives the same ΔC (remote: ΔC only, no qk_sum), subspaces and
    # interventions
    assert "qk_sum" not in b and "covariance_sums" in b.attrs["params"]
    np.testing.assert_allclose(a["delta_c"].values, b["delta_c"].values, rtol=1e-4, atol=1e-6)
    assert (a["rank"].values == b["rank"].values).all()
    np.testing.assert_allclose(a["flip_rate"].values, b["flip_rate"].values)
    check_answers(a, b, "category")
    # the candidate answers are the items' first tokens; the answer is an asked-category item
    answered = a["answer_index"].values
    assert (a["category"].values[np.arange(8), answered] == a["asked"].values).all()
    for png in ("ranks", "pca_category", "swap", "answer"):
        assert (tmp_path / "a" / f"filter_heads_{png}.png").stat().st_size > 0
    assert not list((tmp_path / "b").glob("*.png"))
    assert not list((tmp_path / "a").glob("filter_heads.*.zarr"))  # checkpoints cleaned up


@pytest.mark.e2e
def test_binding_studies_local_and_remote_local_agree(checkpoint, tmp_path):
    common = {"heads": HEAD, "n_pairs": N_PAIRS, "progress": False, **FAST}
    order_path = order_id.run(checkpoint, out=tmp_path / "a", **common)
    lexical_path = lexical.run(checkpoint, out=tmp_path / "a", **common)
    flags = ["--heads", HEAD, "--n-pairs", N_PAIRS, "--remote-local", "--no-figures"]
    # remote-local: lexical first, so it computes the order subspace itself
    cli("study", "lexical", "-m", checkpoint, *flags, "-o", tmp_path / "b", *cli_flags())
    cli("study", "order-id", "-m", checkpoint, *flags, "-o", tmp_path / "b", *cli_flags())
    oa, la = store.open(order_path).load(), store.open(lexical_path).load()
    ob = store.open(tmp_path / "b" / "order_id.zarr").load()
    lb = store.open(tmp_path / "b" / "lexical.zarr").load()

    # order-ID: one queried object at every position; positive = the answer's box
    assert list(oa["feature"].values) == ["order"]
    assert len(set(oa["query_object"].values)) == 1
    assert (oa["order"].values == np.arange(N_PAIRS)).all()
    assert (oa["answer"].values == np.arange(8) % N_PAIRS).all()
    answer = oa["key_label"].values == "positive"
    assert (answer.argmax(1) == oa["answer"].values).all() and (answer.sum(1) == 1).all()
    count = oa["pair_count"].sel(head=HEAD, feature="order")
    assert count.values.tolist() == [32, 32 * (N_PAIRS - 1)]
    last_char_in_token(oa, oa["box"].values)
    assert all("<|assistant|>" in str(t) for t in oa["prompt_text"].values)  # chat template
    for name in ("order", "object", "box", "key_label", "key_token"):
        assert oa[name].dims == ("prompt", "key")

    # lexical: one positive and one negative pair per prompt; order reused from order_id.zarr
    assert list(la["feature"].values) == ["lexical", "order"]
    assert la["pair_count"].sel(head=HEAD, feature="lexical").values.tolist() == [32, 32]
    # positive and negative pairs share the original query; only the key differs
    lex = la.sel(head=HEAD, feature="lexical")
    np.testing.assert_allclose(
        lex["q_sum"].sel(contrast="positive"), lex["q_sum"].sel(contrast="negative")
    )
    assert not np.allclose(
        lex["k_sum"].sel(contrast="positive"), lex["k_sum"].sel(contrast="negative")
    )
    assert la.attrs["params"]["order_subspace"].endswith("order_id.zarr")
    # the permutation null: tested for lexical here, for order in order_id.zarr
    assert la["null_rank"].sel(feature="order").values.tolist() == [-1]
    assert (la["null_rank"].sel(feature="lexical") >= 0).all()
    assert (oa["null_rank"] >= 0).all()
    assert lb.attrs["params"]["order_subspace"] == "computed"
    np.testing.assert_allclose(
        la["qk_sum"].sel(feature="order").values, oa["qk_sum"].sel(feature="order").values
    )
    # attribution: parts sum to the captured logit, explained fraction in [0, 1]
    assert la["logit_part"].dims == ("prompt", "head", "query", "key", "part")
    assert list(la["part"].values) == ["order", "lexical", "residual"]
    np.testing.assert_allclose(
        la["logit_part"].sum("part").values, la["logit"].values, rtol=1e-4, atol=1e-5
    )
    assert ((la["explained"] >= -1e-9) & (la["explained"] <= 1 + 1e-9)).all()

    # the simulated NDIF request gives the same numbers
    for a, b in ((oa, ob), (la, lb)):
        np.testing.assert_allclose(a["delta_c"].values, b["delta_c"].values, rtol=1e-4, atol=1e-6)
        assert (a["rank"].values == b["rank"].values).all()
        np.testing.assert_allclose(a["flip_rate"].values, b["flip_rate"].values)
    # remote: the order sums are ΔC only, so lexical's store has C+ and C- (qk_sum) for its own
    # feature (captured pairs) and NaN for order's
    assert "qk_sum" not in ob
    lexical_sums = lb["qk_sum"].sel(feature="lexical").values
    # (remote: prompts and counterfactuals share traces, so padding differs: float32 rounding)
    local_sums = la["qk_sum"].sel(feature="lexical").values
    np.testing.assert_allclose(
        lexical_sums, local_sums, rtol=1e-4, atol=1e-6 * abs(local_sums).max()
    )
    assert np.isnan(lb["qk_sum"].sel(feature="order")).all()
    # and a remote lexical run reuses that ΔC-only order_id.zarr
    cli("study", "lexical", "-m", checkpoint, *flags, "-o", tmp_path / "b", *cli_flags(),
        "--overwrite")  # fmt: skip
    again = store.open(tmp_path / "b" / "lexical.zarr").load()
    assert again.attrs["params"]["order_subspace"].endswith("order_id.zarr")
    np.testing.assert_allclose(
        again["delta_c"].sel(feature="order"), ob["delta_c"].sel(feature="order"), rtol=1e-12
    )
    check_answers(oa, ob, "order")
    check_answers(la, lb, "lexical")
    # candidates: the box letters, by their surface forms (the token as the prompt writes it
    # among them); the answer is the queried box
    assert (oa["answer_index"].values == oa["answer"].values).all()
    for p in range(8):
        tokens = [str(t).replace("Ġ", " ").replace("▁", " ") for t in oa["key_token"].values[p]]
        counted = [str(t).split("|") for t in oa["answer_candidate_token"].values[p]]
        assert all(k in c for k, c in zip(oa["key_token"].values[p], counted, strict=True))
        assert all(box in t for box, t in zip(oa["box"].values[p], tokens, strict=True))
    for out in ("a", "b"):  # resumable checkpoints are gone once the stores are written
        assert sorted(p.name for p in (tmp_path / out).glob("*.zarr")) == [
            "lexical.zarr",
            "order_id.zarr",
        ]
    pngs = {p.name for p in (tmp_path / "a").glob("*.png")}
    assert {"order_id_pca_order.png", "lexical_attribution.png", "lexical_swap.png"} <= pngs

    shown = cli("show", lexical_path)
    for text in ("study lexical", "Ranks", "Interventions", "Answers", "answer flip rate", HEAD):
        assert text in shown


def test_prompt_builders_label_what_they_build():
    ps = filter_heads.build_prompts(12, categories=["fruit", "city", "US state"], seed=3)
    assert [p.meta["asked"] for p in ps[:3]] == ["fruit", "city", "US state"]
    for p in ps:
        items, cats = p.meta["items"], p.meta["item_categories"]
        assert len(items) == len(set(items)) == 15 and p.span_texts("item") == items
        assert cats.count(p.meta["asked"]) == 5
        asked = p.meta["asked"]
        word = load_categories()[asked]["plural"] if p.meta["question"] == "all" else asked
        assert p.span_texts("category") == [word]
    boxes = binding.build_prompts(6, 4, query_object="coin", seed=1)
    flipped = binding.counterfactuals(boxes, seed=2)
    for p, c in zip(boxes, flipped, strict=True):
        assert p.span_texts("query_object") == ["coin"] and len(set(p.meta["letters"])) == 4
        assert c.meta["letters"] == p.meta["letters"] and c.meta["answer"] == p.meta["answer"]
        changed = [i for i in range(4) if c.meta["objects"][i] != p.meta["objects"][i]]
        assert changed == [p.meta["answer"]]
        assert c.meta["query_object"] not in p.meta["objects"]
        assert c.meta["query_object"] in load_objects()
        assert c.span_texts("query_object") == [c.meta["query_object"]]
    for p, row in zip(ps, filter_heads.labels(ps), strict=True):
        assert [c for c, _ in row] == [p.meta["asked"]] * 15
        assert [lab == "positive" for _, lab in row] == [
            c == p.meta["asked"] for c in p.meta["item_categories"]
        ]
    for p, row in zip(boxes, binding.order_labels(boxes), strict=True):
        assert [lab for _, lab in row].index("positive") == p.meta["answer"]
        assert [lab for _, lab in row].count("positive") == 1
    with pytest.raises(ValueError, match="fewer than items_per_category"):
        filter_heads.build_prompts(1, categories=["fruit", "city"], items_per_category=30)


def test_heads_default_to_the_papers_for_its_model_or_those_given():
    """The pipeline's head choice (`qktrace.study.pipeline.resolve_heads`): heads given, else the
    study's for the model (the paper's for Llama-3.1-8B-Instruct); no search, no capture."""
    from qktrace.study.pipeline import resolve_heads

    net, tok = testing.model("llama")
    lm = load(net, tokenizer=tok)
    paper = dataclasses.replace(
        lm, name="meta-llama/Llama-3.1-8B-Instruct", n_layers=32, n_heads=32, n_kv_heads=8
    )
    chosen, source, ranking, captured = resolve_heads(
        filter_heads.study, paper, None, None, 16, False
    )
    assert [h.label for h in chosen] == ["16.19", "20.26", "20.14"] and source == "paper"
    assert captured is None and not ranking.data_vars
    assert len(resolve_heads(order_id.study, paper, None, None, 16, False)[0]) == 9
    chosen, source, *_ = resolve_heads(order_id.study, lm, "1.2", None, 16, False)
    assert [h.label for h in chosen] == ["1.2"] and source == "given"
    with pytest.raises(ValueError, match="out of range"):
        resolve_heads(order_id.study, lm, "5.1", None, 16, False)


def test_default_sizes_organism_and_paper(checkpoint):
    from qktrace import organism
    from qktrace.studies._common import ORGANISM_SIZES, PAPER_SIZES, is_organism, sizes

    assert is_organism(str(organism.path())) and not is_organism(checkpoint)
    for study in ("filter_heads", "order_id", "lexical"):
        assert sizes(str(organism.path()), study, None, None) == ORGANISM_SIZES[study]
        assert sizes(checkpoint, study, None, None) == PAPER_SIZES[study]
        assert sizes(checkpoint, study, 7, None) == (7, PAPER_SIZES[study][1])


def test_cli_refuses_bad_input_with_the_fix(tmp_path, checkpoint):
    runner = CliRunner()
    bad = runner.invoke(app, ["study", "toy", "-m", "x", "-o", str(tmp_path)])
    assert bad.exit_code == 2 and "filter-heads" in bad.output
    bad = runner.invoke(
        app, ["study", "filter-heads", "-m", "x", "-o", str(tmp_path), "--n-pairs", "4"]
    )
    assert bad.exit_code == 2 and "--n-pairs is not an option of filter-heads" in bad.output
    bad = runner.invoke(
        app, ["study", "lexical", "-m", "x", "-o", str(tmp_path), "--remote", "--remote-local"]
    )
    assert bad.exit_code == 2
    (tmp_path / "order_id.zarr").mkdir()
    (tmp_path / "order_id.zarr" / "zarr.json").write_text("{}")
    bad = runner.invoke(app, ["study", "order-id", "-m", str(checkpoint), "-o", str(tmp_path)])
    assert bad.exit_code == 2 and "--overwrite" in bad.output
    bad = runner.invoke(app, ["show", str(tmp_path / "missing.zarr")])
    assert bad.exit_code == 2 and "no qktrace store" in bad.output
    assert "qktrace study filter-heads" in runner.invoke(app, ["study", "--help"]).output


def test_correct_only_summarizes_the_prompts_the_model_answers_right(tmp_path):
    """A random tiny Llama answers some order-id prompts right and some wrong: with
    correct_only the summaries are over the right ones (recomputed here from the per-prompt
    variables), the all-prompt ones stay as *_all_prompts, and the count is in the params."""
    path = testing.save_checkpoint(tmp_path / "model", "llama")
    settings = {"heads": "1.1", "n_pairs": N_PAIRS, "progress": False, **FAST, "n_test": 16}
    ds = store.open(order_id.run(path, out=tmp_path / "a", correct_only=True, **settings)).load()
    right = ds["answer_correct"].values.astype(bool)
    assert 0 < right.sum() < right.size  # both kinds of prompt, so a wrong restriction shows
    assert ds.attrs["params"]["n_test_correct"] == int(right.sum())
    assert ds.attrs["params"]["correct_only"] is True
    flips = ds["flip"].isel(prompt=right).sum("prompt")
    attends = ds["attends_orig"].isel(prompt=right).sum("prompt")
    np.testing.assert_allclose(ds["flip_rate"].values, (flips / attends).values)
    every = ds["flip"].sum("prompt") / ds["attends_orig"].sum("prompt")
    np.testing.assert_allclose(ds["flip_rate_all_prompts"].values, every.values)
    delta = ds["delta_answer_logit_diff"].isel(prompt=right).mean("prompt")
    np.testing.assert_allclose(ds["mean_delta_answer_logit_diff"].values, delta.values)


def test_key_scope_flag_reaches_the_answer_swaps_and_is_recorded(tmp_path, checkpoint):
    """`qktrace study --key-scope key_head` edits the shared key head (recorded in the params
    and the answer attrs); a scope that is not one is refused (exit 2) naming both scopes."""
    common = ["study", "order-id", "-m", checkpoint, "--heads", HEAD, "--n-pairs", N_PAIRS]
    for scope in ("key_head", None):
        out = tmp_path / str(scope)
        cli(*common, "-o", out, *cli_flags(), *(["--key-scope", scope] if scope else []))
        ds = store.open(out / "order_id.zarr")
        assert ds.attrs["params"]["key_scope"] == (scope or "query_head")
    bad = CliRunner().invoke(app, [*map(str, common), "-o", str(tmp_path / "x"), "--key-scope",
                                   "group"])  # fmt: skip
    assert bad.exit_code == 2 and "query_head" in bad.output and "key_head" in bad.output
