"""The toy model: data, intervention mechanics, and the study's recovered ranks and store."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from scipy.linalg import subspace_angles
from typer.testing import CliRunner

from qktrace.cli import app
from qktrace.store import io as store
from qktrace.studies import STUDIES
from qktrace.studies import toy as toy_study
from qktrace.study import plots
from qktrace.toy.analysis import (
    diagonal_dominance,
    interaction_matrix,
    recover_subspaces,
    swap_effects,
)
from qktrace.toy.data import PayloadTask
from qktrace.toy.model import PayloadRetrievalHead
from qktrace.toy.train import train
from qktrace.verbs.decompose import Subspace

# ------------------------------------------------------------------------------------------
# data


@pytest.mark.parametrize("variant", ["discrete", "continuous"])
def test_episodes_carry_the_target_latents(variant):
    task = PayloadTask(rank_z1=3, rank_z2=4, variant=variant, seed=0, noise=0.0)
    batch = task.sample(64, torch.Generator().manual_seed(0))
    rows = torch.arange(64)
    e = task.encoders
    expected = batch.z1[rows, batch.target] @ e["B1"].T + batch.z2[rows, batch.target] @ e["B2"].T
    torch.testing.assert_close(batch.query, expected)
    assert batch.context.shape == (64, 16, 32)
    assert batch.label.max() < 10
    if variant == "discrete":
        assert set(batch.z1.unique().tolist()) == {-1.0, 1.0}


def test_only_the_target_carries_its_latents():
    task = PayloadTask(rank_z1=1, rank_z2=2, variant="discrete", seed=0)  # 8 corners, 16 tokens
    batch = task.sample(256, torch.Generator().manual_seed(1))
    z = torch.cat([batch.z1, batch.z2], -1)
    rows = torch.arange(256)
    same = (z == z[rows, batch.target][:, None]).all(-1)
    assert same.sum(1).eq(1).all()


@pytest.mark.parametrize("latent", ["z1", "z2"])
def test_contrast_sets_share_exactly_what_they_should(latent):
    task = PayloadTask(rank_z1=3, rank_z2=5, variant="discrete", seed=0)
    inputs = task.contrast_inputs(latent, 2000, torch.Generator().manual_seed(0))
    # the negative key's latent differs from the query's in every pair
    assert (inputs.negative_value != inputs.query_value).any(-1).all()
    # the query's other latent is drawn independently of the keys' (shared) one: equal by chance
    rank_other = inputs.key_other.shape[1]
    chance = (inputs.query_other == inputs.key_other).all(-1).float().mean()
    assert chance < 2 * 2.0**-rank_other
    # both keys carry the same other latent: their difference has no component along it
    other = "A2" if latent == "z1" else "A1"
    own = "A1" if latent == "z1" else "A2"
    e = task.encoders
    design = torch.cat([e[own], e[other], e["E"].T], dim=1)
    coef = torch.linalg.lstsq(design, (inputs.positive - inputs.negative).T).solution.T
    n_own = e[own].shape[1]
    n_other = e[other].shape[1]
    torch.testing.assert_close(
        coef[:, :n_own], inputs.query_value - inputs.negative_value, atol=0.05, rtol=0
    )
    assert coef[:, n_own : n_own + n_other].abs().max() < 0.05


# ------------------------------------------------------------------------------------------
# intervention and G mechanics (no training)


def test_swapping_the_whole_key_moves_attention_to_the_target():
    task = PayloadTask(rank_z1=3, rank_z2=3, seed=0)
    torch.manual_seed(0)
    model = PayloadRetrievalHead(task.d_model, 8, task.n_classes)
    episodes = task.sample(500, torch.Generator().manual_seed(0))
    target = torch.randint(0, 16, (500,))
    with torch.no_grad():
        logits = model.attention_logits(model.queries(episodes.query), model.keys(episodes.context))
    target = torch.where(target == logits.argmax(-1), (target + 1) % 16, target)
    whole = swap_effects(model, episodes, np.eye(8), target)
    assert whole["flip_rate"] == 1.0
    nothing = swap_effects(model, episodes, np.zeros((8, 0)), target)
    assert nothing["flip_rate"] == 0.0 and nothing["mean_delta_p_target"] == 0.0


def test_interaction_matrix_and_dominance():
    task = PayloadTask(rank_z1=2, rank_z2=3, seed=0)
    model = PayloadRetrievalHead(task.d_model, 16, task.n_classes)
    g = interaction_matrix(model, task)
    e = task.encoders
    b = torch.cat([e["B1"], e["B2"]], 1)
    a = torch.cat([e["A1"], e["A2"]], 1)
    expected = (model.W_Q.weight @ b).T @ (model.W_K.weight @ a)
    np.testing.assert_allclose(g.values, expected.detach().double().numpy(), rtol=1e-5)
    assert list(g["query_latent"].values) == ["z1.0", "z1.1", "z2.0", "z2.1", "z2.2"]
    eye = g.copy(data=np.eye(5))
    assert diagonal_dominance(eye) == {"diagonal_fraction": 1.0, "block_fraction": 1.0}
    blocks = g.copy(data=np.ones((5, 5)))
    shares = diagonal_dominance(blocks)
    assert shares["diagonal_fraction"] == pytest.approx(5 / 25)
    assert shares["block_fraction"] == pytest.approx((4 + 9) / 25)


# ------------------------------------------------------------------------------------------
# the study (trains models)

CI_GRID = {"variants": ("discrete",), "ranks": (3, 5), "d_heads": (16, 8), "workers": 1}


# the tests that read it are the e2e tier (python -m pytest -m e2e): a whole toy study run
@pytest.fixture(scope="module")
def toy_store(tmp_path_factory) -> Path:
    """A small study run: discrete latents, N, M in {3, 5}, d_head 16 and 8, one seed."""
    out = tmp_path_factory.mktemp("toy")
    return toy_study.run(out, quick=True, progress=False, **CI_GRID)


def assert_ranks_recovered(ds: xr.Dataset) -> int:
    """Every model with val accuracy >= 0.9 and N + M < d_head recovers ranks (N, M) exactly."""
    checked = 0
    for cell in ds["accuracy"].to_dataframe().reset_index().itertuples():
        if cell.accuracy < 0.9 or cell.N + cell.M >= cell.d_head:
            continue
        where = {
            "variant": cell.variant,
            "d_head": cell.d_head,
            "N": cell.N,
            "M": cell.M,
            "seed": cell.seed,
        }
        ranks = ds["rank"].sel(where)
        assert (int(ranks.sel(latent="z1")), int(ranks.sel(latent="z2"))) == (cell.N, cell.M), where
        checked += 1
    return checked


def assert_both_swap_beats_random(ds: xr.Dataset) -> None:
    room = (ds["N"] + ds["M"] < ds["d_head"]) & (ds["accuracy"] >= 0.9)
    flips = ds["flip_rate"].where(room)
    both = flips.sel(subspace="both")
    random = flips.sel(subspace="random_both")
    assert bool(((both - random) > 0.2).where(room, True).all()), (both - random).values
    assert float(both.mean()) > 0.9


def test_recovered_subspaces_are_the_latent_directions():
    """The key basis of z_i spans W_K A_i and the query basis W_Q B_i (ΔC ∝ W_Q B_i A_i^T W_K^T)."""
    task = PayloadTask(rank_z1=3, rank_z2=4, variant="discrete", seed=0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the model is tiny: more threads only add overhead
    try:
        trained = train(task, 16, seed=0, max_steps=600)
    finally:
        torch.set_num_threads(threads)
    assert trained.val_accuracy > 0.95
    subspaces = recover_subspaces(trained.model, task, n_contrast_pairs=20_000)
    e = task.encoders
    for latent, a, b in (("z1", "A1", "B1"), ("z2", "A2", "B2")):
        sub = Subspace.from_dataset(subspaces.sel(feature=latent))
        with torch.no_grad():
            keys = (trained.model.W_K.weight @ e[a]).double().numpy()
            queries = (trained.model.W_Q.weight @ e[b]).double().numpy()
        assert np.degrees(subspace_angles(sub.key_basis, keys).max()) < 1.0, latent
        assert np.degrees(subspace_angles(sub.query_basis, queries).max()) < 5.0, latent


@pytest.mark.e2e
def test_recovered_ranks_equal_latent_ranks(toy_store):
    ds = store.open(toy_store).load()
    assert assert_ranks_recovered(ds) >= 4  # d_head 16: four cells; d_head 8: N = M = 3


@pytest.mark.e2e
def test_swap_in_both_subspaces_flips_more_than_random(toy_store):
    assert_both_swap_beats_random(store.open(toy_store).load())


@pytest.mark.e2e
def test_store_contract(toy_store):
    ds = store.open(toy_store)
    grid = ("variant", "d_head", "N", "M")
    assert ds["rank"].dims == (*grid, "latent", "seed")
    assert ds["accuracy"].dims == (*grid, "seed")
    assert ds["singular_values"].dims == (*grid, "latent", "seed", "component")
    for name in (
        "flip_rate",
        "mean_attention_target_after",
        "mean_delta_p_target",
        "subspace_size",
    ):
        assert ds[name].dims == (*grid, "seed", "subspace"), name
    assert ds["random_flip_rate"].dims == (*grid, "seed", "random_subspace", "draw")
    assert ds["pca"].dims == (*grid, "seed", "role", "point", "pc")
    assert ds["interaction"].dims == (*grid, "seed", "query_latent", "key_latent")
    assert ds["diagonal_fraction"].dims == (*grid, "seed")
    assert list(ds["latent"].values) == ["z1", "z2"]
    assert list(ds["subspace"].values) == [
        "z1",
        "z2",
        "both",
        "random_z1",
        "random_z2",
        "random_both",
    ]
    assert list(ds["role"].values) == ["query", "key"]
    assert list(ds["d_head"].values) == [16, 8]
    assert ds.sizes["draw"] == 10 and ds.sizes["component"] == 16
    assert ds["rank"].dtype.kind == "i"
    assert ds.attrs["study"] == "toy" and ds.attrs["params"]["ranks"] == [3, 5]
    # d_head = 8 models have 8 singular values; the rest is padding
    assert ds["singular_values"].sel(d_head=8).isel(component=slice(8, None)).isnull().all()
    assert ds["singular_values"].sel(d_head=8).isel(component=slice(0, 8)).notnull().all()
    # the random baselines of the main variables are the means of the draws
    np.testing.assert_allclose(
        ds["flip_rate"].sel(subspace="random_both").values,
        ds["random_flip_rate"].sel(random_subspace="random_both").mean("draw").values,
    )


@pytest.mark.e2e
def test_figures_are_written(toy_store):
    for name in toy_study.FIGURES:
        path = toy_store.parent / name
        assert path.exists() and path.stat().st_size > 10_000, name


@pytest.mark.e2e
def test_existing_store_is_not_overwritten(toy_store):
    with pytest.raises(FileExistsError, match="overwrite"):
        toy_study.run(toy_store.parent, quick=True, progress=False, **CI_GRID)


@pytest.mark.slow
def test_quick_study_both_variants(tmp_path):
    """The whole --quick path (both variants), as the CLI runs it."""
    result = CliRunner().invoke(app, ["toy", "--out", str(tmp_path), "--quick"])
    assert result.exit_code == 0, result.output
    ds = store.open(tmp_path / toy_study.STORE).load()
    assert list(ds["variant"].values) == ["discrete", "continuous"]
    assert assert_ranks_recovered(ds) >= 6
    assert_both_swap_beats_random(ds)


# ------------------------------------------------------------------------------------------
# CLI


def test_cli_help_teaches():
    runner = CliRunner()
    top = runner.invoke(app, ["--help"])
    assert top.exit_code == 0 and "toy" in top.output
    result = runner.invoke(app, ["toy", "--help"])
    assert result.exit_code == 0
    for option in ("--out", "--quick", "--seed", "--overwrite"):
        assert option in result.output
    assert STUDIES["toy"] == "qktrace.studies.toy"


@pytest.mark.e2e
def test_cli_refuses_existing_store(toy_store):
    result = CliRunner().invoke(app, ["toy", "--out", str(toy_store.parent), "--quick"])
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: --out:"), result.output
    assert "--overwrite" in lines[0] and "Traceback" not in result.output


def test_cli_rejects_zero_seeds(tmp_path):
    result = CliRunner().invoke(app, ["toy", "--out", str(tmp_path), "--n-seeds", "0"])
    assert result.exit_code == 2
    assert result.output.strip() == "Error: n_seeds=0 (CLI --n-seeds) must be >= 1; pass e.g. 1."


# ------------------------------------------------------------------------------------------
# figures


def test_intervention_bars_draws_an_all_nan_panel():
    values = np.array([[[0.9, 0.1], [0.8, 0.3]], [[np.nan] * 2] * 2])
    ds = xr.Dataset(
        {"flip_rate": (("regime", "seed", "subspace"), values)},
        coords={"regime": ["room", "superposition"], "subspace": ["both", "random_both"]},
    )
    fig = plots.intervention_bars(ds, ["flip_rate"], row="regime")
    empty = fig.axes[1]
    assert "no data" in " ".join(text.get_text() for text in empty.texts)
    assert [t.get_text() for t in empty.get_xticklabels()] == ["both", "random_both"]


@pytest.mark.e2e
def test_a_store_written_before_the_renames_still_shows_and_draws(toy_store, tmp_path):
    """toy.zarr once said recovered_rank, target_attention, ...: figures and summary read both."""
    ds = store.open(toy_store).load()
    renamed_back = {new: old for old, new in toy_study.RENAMED.items() if new in ds.data_vars}
    assert set(renamed_back) >= {"rank", "mean_attention_target_after", "pc_variance_ratio"}
    old = store.save(ds.rename(renamed_back), tmp_path / "toy.zarr")
    assert toy_study.summary(store.open(old)) == toy_study.summary(ds)
    assert len(toy_study.draw_figures(store.open(old), tmp_path)) == len(toy_study.FIGURES)
    result = CliRunner().invoke(app, ["show", str(old)])
    assert result.exit_code == 0 and "recovered_rank" in result.output, result.output
