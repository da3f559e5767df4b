"""Toy study: the payload-retrieval model of the paper's §2, over the grid of latent ranks.

What it reproduces and what it found: docs/results/toy.md.

For every variant (discrete, continuous), head width d_head (16, 8), latent ranks N, M in
{3, 5, 7} and seed: train the one-head model, recover the z1 and z2 subspaces with
contrastive covariances, project on the z1 subspace (PCA), swap key coordinates in the
recovered subspaces against random ones, and compute the interaction matrix G. Everything goes
to ``<out>/toy.zarr``; the figures are then drawn from the stored dataset.

Store contract (read by other code)::

    rank            (variant, d_head, N, M, latent, seed)            latent = z1, z2
    singular_values (variant, d_head, N, M, latent, seed, component) NaN past d_head
    delta_c         (variant, d_head, N, M, latent, seed, dq, dk)    NaN past d_head
    accuracy, steps (variant, d_head, N, M, seed)                    validation accuracy
    flip_rate, mean_delta_p_target, mean_attention_target_after
                    (variant, d_head, N, M, seed, subspace)          subspace = z1, z2, both,
                                                                     random_z1/z2/both (mean)
    random_flip_rate, … (…, seed, random_subspace, draw)             each random draw
    subspace_size   (…, seed, subspace)
    pca             (variant, d_head, N, M, seed, role, point, pc)   role = query, key
    pca_corner      (…, seed, role, point)                           sign pattern of z1
    pc_variance_ratio (…, seed, pc)                                  of each PC in pca
    interaction     (variant, d_head, N, M, seed, query_latent, key_latent)   G, NaN padded
    diagonal_fraction, block_fraction (variant, d_head, N, M, seed)  G's mass on its diagonal
                                                                     and in its z1/z2 blocks

The names are the language-model stores' (`rank`, `mean_attention_target_after`, ...); a store
written before they were (`recovered_rank`, `target_attention`, `delta_p_target`,
`pca_explained_variance`) is read with them by `current_names` (figures, summary).

Run it with ``qktrace toy --out DIR`` (``--quick`` for a one-seed, 2 x 2 grid).
"""

from __future__ import annotations

import json
import multiprocessing
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from multiprocessing import connection
from pathlib import Path
from typing import Any, cast

import numpy as np
import pandas as pd
import torch
import xarray as xr
from tqdm.auto import tqdm

from qktrace.core import checks
from qktrace.store import check_same_run, provenance
from qktrace.store import io as store
from qktrace.store.locks import one_writer
from qktrace.study import plots
from qktrace.toy.analysis import analyze
from qktrace.toy.data import VARIANTS, PayloadTask
from qktrace.toy.train import train

STORE = "toy.zarr"
CELLS = "toy.cells"  # finished models of an unfinished run (see `Cells`)
FIGURES = ("rank_grid.png", "pca.png", "intervention.png", "interaction.png")
ORDER = ("variant", "d_head", "N", "M", "latent", "seed")


def settings(
    *,
    quick: bool = False,
    seed: int = 0,
    n_seeds: int | None = None,
    ranks: tuple[int, ...] | None = None,
    d_heads: tuple[int, ...] = (16, 8),
    variants: tuple[str, ...] = VARIANTS,
    max_steps: int | None = None,
    lr: float = 1e-3,
    n_contrast_pairs: int = 20_000,
    threshold: float = 0.99,
    n_random: int = 10,
) -> dict[str, Any]:
    """The study's parameters, with the defaults of a full or a `quick` run filled in.

    Full: N, M in {3, 5, 7}, 3 seeds (seed, seed+1, seed+2), up to 1200 steps.
    Quick: N, M in {3, 5}, one seed, up to 600 steps.
    """
    n_seeds = n_seeds if n_seeds is not None else (1 if quick else 3)
    checks.integer("seed", seed, low=0, flag="--seed", example="0")
    for name, value in (
        ("n_seeds", n_seeds),
        ("max_steps", max_steps),
        ("n_contrast_pairs", n_contrast_pairs),
    ):
        if value is not None:
            checks.integer(name, value, low=1, flag=f"--{name.replace('_', '-')}", example="1")
    checks.integer("n_random", n_random, low=0, example="10")
    checks.number("threshold", threshold, low=0, high=1, low_open=True, example="0.99")
    checks.number("lr", lr, low=0, high=1, low_open=True, example="1e-3")
    return {
        "seeds": list(range(seed, seed + n_seeds)),
        "ranks": list(ranks if ranks is not None else ((3, 5) if quick else (3, 5, 7))),
        "d_heads": list(d_heads),
        "variants": list(variants),
        "max_steps": max_steps if max_steps is not None else (600 if quick else 1200),
        "lr": lr,
        "n_contrast_pairs": n_contrast_pairs,
        "threshold": threshold,
        "n_random": n_random,
        "quick": quick,
    }


def run_cell(
    variant: str,
    d_head: int,
    n: int,
    m: int,
    seed: int,
    params: dict[str, Any],
    progress: bool = False,
) -> xr.Dataset:
    """Train one model and analyse it; the result carries the grid dims (length 1 each)."""
    task = PayloadTask(rank_z1=n, rank_z2=m, variant=variant, seed=seed)  # type: ignore[arg-type]
    trained = train(
        task,
        d_head,
        seed=seed,
        max_steps=params["max_steps"],
        lr=params["lr"],
        progress=progress,
    )
    cell = analyze(
        trained.model,
        task,
        n_contrast_pairs=params["n_contrast_pairs"],
        threshold=params["threshold"],
        n_random=params["n_random"],
        pad_rank=max(params["ranks"]),
        seed=seed,
    )
    size = max(params["d_heads"])
    cell = cell.reindex(component=np.arange(size), dq=np.arange(size), dk=np.arange(size))
    cell["accuracy"] = trained.val_accuracy
    cell["steps"] = trained.steps
    return cell.expand_dims(variant=[variant], d_head=[d_head], N=[n], M=[m], seed=[seed])


@one_writer(STORE)
def run(
    out: Path | str,
    *,
    quick: bool = False,
    seed: int = 0,
    overwrite: bool = False,
    figures: bool = True,
    progress: bool = True,
    workers: int = 2,
    **overrides: Any,
) -> Path:
    """Run the toy study, write ``out/toy.zarr`` and its figures, print a summary.

    Parameters
    ----------
    out : path
        Output directory (created).
    quick : bool
        A one-seed run on N, M in {3, 5} (under a minute).
    seed : int
        First seed; a full run uses seed, seed + 1, seed + 2.
    overwrite : bool
        Replace an existing ``toy.zarr``.
    figures : bool
        Draw the PNG figures next to the store.
    progress : bool
        Show a progress bar, and print the summary table at the end.
    workers : int
        Processes that train models side by side (each single-threaded: the model is so small
        that one thread per model is fastest). 1 runs everything in this process. Results do
        not depend on it: every model seeds its own generators.
    **overrides
        Any parameter of `settings` (n_seeds, ranks, d_heads, variants, max_steps, lr,
        n_contrast_pairs, threshold, n_random).

    Returns
    -------
    Path
        The store ``out/toy.zarr``.
    """
    out = Path(out)
    path = out / STORE
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"{path} exists; pass overwrite=True (CLI: --overwrite) or another --out."
        )
    checks.integer("workers", workers, low=1, flag="--workers", example="2")
    params = settings(quick=quick, seed=seed, **overrides)
    cells = [
        (variant, d_head, n, m, s)
        for variant in params["variants"]
        for d_head in params["d_heads"]
        for n in params["ranks"]
        for m in params["ranks"]
        for s in params["seeds"]
    ]
    start = time.perf_counter()
    kept = Cells(out / CELLS, params, discard=overwrite)
    results = _run_cells(cells, params, kept, workers=workers, progress=progress)
    ds = xr.combine_by_coords(results, combine_attrs="drop")
    ds = ds.sel(variant=params["variants"], d_head=params["d_heads"]).transpose(*ORDER, ...)
    ds.attrs["seconds"] = round(time.perf_counter() - start, 1)
    ds.attrs["workers"] = workers
    ds.attrs["models_resumed"] = kept.n_resumed  # finished by an earlier, interrupted run
    store.save(
        ds, path, attrs=provenance("toy", params, study="toy", seed=seed), overwrite=overwrite
    )
    kept.remove()  # what they held is in the store now
    if figures:
        draw_figures(store.open(path), out)
    if progress:
        print(summary(store.open(path)))
    return path


Cell = tuple[str, int, int, int, int]


class Cells:
    """Finished models of a run, one store each in ``out/toy.cells/``, so an interrupted run
    keeps them and a rerun with the same parameters trains only the others."""

    def __init__(self, folder: Path, params: dict[str, Any], *, discard: bool = False) -> None:
        self.folder = folder
        stamp = folder / "params.json"
        wanted = json.dumps(provenance("toy", params)["params"], sort_keys=True)
        if folder.exists() and (discard or not stamp.is_file()):
            shutil.rmtree(folder)
        elif folder.exists():
            check_same_run(folder, json.loads(stamp.read_text()), json.loads(wanted),
                           what="the finished models")  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
        stamp.write_text(wanted)
        self.n_resumed = 0

    def path(self, cell: Cell) -> Path:
        return self.folder / ("cell-" + "-".join(map(str, cell)) + ".zarr")

    def load(self, cell: Cell) -> xr.Dataset | None:
        """The stored result of `cell`, or None if it has not finished."""
        path = self.path(cell)
        if not path.exists():
            return None
        self.n_resumed += 1
        return store.open(path, checksums=True).load()

    def keep(self, cell: Cell, result: xr.Dataset) -> None:
        store.save(result, self.path(cell), overwrite=True)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def _run_cells(
    cells: list[Cell],
    params: dict[str, Any],
    kept: Cells,
    *,
    workers: int,
    progress: bool,
) -> list[xr.Dataset]:
    """`run_cell` for every cell not kept yet, in this process or in `workers` processes.

    Each result is kept (`Cells`) as soon as it arrives. Ctrl-C (or any error) terminates the
    workers at once, so nothing is left running and the finished cells stay on disk.
    """
    done = {cell: kept.load(cell) for cell in cells}
    todo = [cell for cell in cells if done[cell] is None]
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="toy models",
               unit="model", disable=not progress)  # fmt: skip
    try:
        _train_cells(todo, params, kept, done, bar, workers=workers, progress=progress)
    finally:
        bar.close()  # before any error is printed
    return [cast(xr.Dataset, done[cell]) for cell in cells]  # every cell is done now


def _train_cells(
    todo: list[Cell],
    params: dict[str, Any],
    kept: Cells,
    done: dict[Cell, xr.Dataset | None],
    bar: Any,
    *,
    workers: int,
    progress: bool,
) -> None:
    """Train the cells of `todo`, keeping each result in `kept` and `done` as it comes."""
    if workers <= 1 or len(todo) <= 1:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for cell in todo:
                result = done[cell] = run_cell(*cell, params, progress=progress)
                with _sigint_after():
                    kept.keep(cell, result)
                bar.update(1)
        finally:
            torch.set_num_threads(threads)
    elif todo:

        def finished(cell: Cell, result: xr.Dataset) -> None:
            done[cell] = result
            kept.keep(cell, result)
            bar.update(1)

        _in_workers(todo, params, workers, finished)


def _in_workers(
    todo: list[Cell],
    params: dict[str, Any],
    workers: int,
    finished: Callable[[Cell, xr.Dataset], None],
) -> None:
    """`run_cell` for each cell in `workers` spawned single-threaded processes; `finished` is
    called here, in the main process, with each result as it arrives.

    Ctrl-C reaches every process of the terminal's group: the workers never see it (they start
    with SIGINT blocked), and the main process, which gets KeyboardInterrupt, kills them and
    waits for them, which takes a moment. A result being written when Ctrl-C comes is written
    whole first. One pipe per worker, no queues: nothing (no lock, no feeder thread, no
    semaphore) is left for a killed worker to hold. Plain processes
    rather than `multiprocessing.Pool`, whose terminate() can wait forever on a lock held by an
    idle worker. Spawned, not forked: no fork of a process running torch.
    """
    context = multiprocessing.get_context("spawn")
    pending = list(todo)
    workers_at: dict[Any, Any] = {}  # our end of each worker's pipe -> its process
    busy: dict[Any, Cell] = {}  # pipe -> the cell its worker is on
    try:
        # Started with SIGINT blocked, which they inherit: Ctrl-C never reaches them, not even
        # while they import torch. Here a SIGINT waits (pending) until the mask is lifted.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            for _ in range(min(workers, len(todo))):
                here, there = context.Pipe()
                process = context.Process(target=_worker, args=(there, params), daemon=True)
                process.start()
                there.close()
                workers_at[here] = process
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
        for pipe in workers_at:
            busy[pipe] = pending.pop(0)
            pipe.send(busy[pipe])
        while busy:
            for pipe in cast(list[Any], connection.wait(list(busy), timeout=1.0)):
                try:
                    status, cell, payload = pipe.recv()
                except EOFError:
                    code = workers_at[pipe].exitcode
                    raise RuntimeError(
                        f"a toy worker process died (exit code {code}; -9 is usually the "
                        "out-of-memory killer); rerun with --workers 1, or the same command to "
                        "resume from the finished models."
                    ) from None
                del busy[pipe]
                if status == "error":
                    raise RuntimeError(f"training the toy model {cell} failed: {payload}")
                with _sigint_after():  # a model being kept is kept whole
                    finished(cell, payload)
                if pending:
                    busy[pipe] = pending.pop(0)
                    pipe.send(busy[pipe])
    finally:
        for pipe, process in workers_at.items():
            pipe.close()  # an idle worker's recv() ends: it returns
            if busy or pending:  # stopped early: do not wait for any work in progress
                process.kill()
        for process in workers_at.values():
            process.join()


@contextmanager
def _sigint_after() -> Iterator[None]:
    """Hold back Ctrl-C (KeyboardInterrupt) until the block is done; in the main thread only."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda number, frame: caught.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _worker(pipe: Any, params: dict[str, Any]) -> None:
    """A worker's loop: train and analyse the cells sent on `pipe` until it is closed."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)
    # tqdm's default lock is a named multiprocessing semaphore; a killed worker could not
    # release it and Python's resource tracker would warn about it on stderr
    tqdm.set_lock(threading.RLock())
    while True:
        try:
            cell: Cell = pipe.recv()
        except EOFError:
            return
        try:
            pipe.send(("ok", cell, run_cell(*cell, params)))
        except Exception as err:  # reported, and raised, in the main process
            pipe.send(("error", cell, f"{type(err).__name__}: {err}"))


# ------------------------------------------------------------------------------------------
# figures, from the stored dataset


def _expected_rank(ds: xr.Dataset) -> xr.DataArray:
    return xr.concat([ds["N"], ds["M"]], dim=pd.Index(["z1", "z2"], name="latent"))


# the toy store's names before it took the language-model stores' vocabulary
RENAMED = {
    "recovered_rank": "rank",
    "target_attention": "mean_attention_target_after",
    "delta_p_target": "mean_delta_p_target",
    "random_target_attention": "random_mean_attention_target_after",
    "random_delta_p_target": "random_mean_delta_p_target",
    "pca_explained_variance": "pc_variance_ratio",
}


def current_names(ds: xr.Dataset) -> xr.Dataset:
    """A toy store with today's variable names, also when written before the renames."""
    return ds.rename({old: new for old, new in RENAMED.items() if old in ds.data_vars})


def draw_figures(ds: xr.Dataset, out: Path | str) -> list[Path]:
    """Draw the study's figures from a stored toy dataset into `out`; return their paths."""
    out = Path(out)
    ds = current_names(ds)
    ranks = ds["rank"].load()
    expected = _expected_rank(ds).broadcast_like(ranks)
    panel = {"panel": ("d_head", "latent")}
    metrics = ["flip_rate", "mean_delta_p_target", "mean_attention_target_after"]
    room = ds["N"] + ds["M"] < ds["d_head"]
    regimes = {
        "room": "N + M < d_head: room for both latents",
        "superposition": "N + M >= d_head: z1, z2 fill key space",
    }
    by_room = xr.concat(
        [ds[metrics].where(room), ds[metrics].where(~room)],
        dim=pd.Index(list(regimes), name="regime"),
    ).load()
    figs = {
        "rank_grid.png": plots.rank_heatmap(
            ranks.stack(panel),
            x="M",
            y="N",
            reference=expected.stack(panel),
            row="variant",
            col="panel",
            average=["seed"],
            title=(
                "Recovered ranks of z1 (true: N) and z2 (true: M), "
                + (f"mean over {ds.sizes['seed']} seeds" if ds.sizes["seed"] > 1 else "one seed")
                + "; colour: recovered - true rank. Expect equality where N + M < d_head."
            ),
        ),
        "pca.png": _pca_figure(ds),
        "intervention.png": plots.intervention_bars(
            by_room,
            metrics,
            hue="variant",
            row="regime",
            panel_title=lambda where: regimes[where["regime"]],
            labels={
                "flip_rate": "flip rate (argmax -> target)",
                "mean_delta_p_target": "Δ p(target | {orig, target})",
                "mean_attention_target_after": "attention on target",
            },
            title=(
                "Swap key coordinates between the attended and a target key; dots: cells x "
                "seeds (random: mean of 10 draws)"
            ),
        ),
        "interaction.png": _interaction_figure(ds),
    }
    paths = []
    for name, fig in figs.items():
        fig.savefig(out / name, dpi=110)
        paths.append(out / name)
    return paths


def _pca_figure(ds: xr.Dataset) -> Any:
    """Queries and keys on the recovered z1 subspace: smallest N, widest head, first seed."""
    d_head = int(ds["d_head"].max())
    n = int(ds["N"].min())
    with_room = [int(m) for m in ds["M"].values if n + m < d_head]
    m = max(with_room) if with_room else int(ds["M"].min())
    cell = ds.sel(d_head=d_head, N=n, M=m).isel(seed=0).load()
    corner = cell["pca_corner"]
    # points sorted by corner so that the legend lists the corners in order
    order = np.argsort(corner.sel(role="query").transpose("variant", "point").values, axis=-1)
    by_corner = xr.DataArray(order, dims=("variant", "point"))
    signs = np.array(["".join("-+"[c >> i & 1] for i in range(n)) for c in range(2**n)])
    corner = corner.isel(point=by_corner)
    return plots.pca_scatter(
        cell["pca"].isel(point=by_corner),
        hue=corner.copy(data=signs[corner.values]).rename("signs of z1"),
        style="role",
        row="variant",
        title=(
            f"Queries (o) and keys (x) on the recovered z1 subspace, PCA to 3-D (N={n}, M={m}, "
            f"d_head={d_head})\ncolour: the cube corner (discrete) or octant (continuous) of z1"
        ),
    )


def _interaction_figure(ds: xr.Dataset) -> Any:
    """G for the discrete variant, first seed, N = M, at each d_head; |G| scaled to its max."""
    diagonal = [r for r in ds["N"].values if r in ds["M"].values]
    g = ds["interaction"].sel(variant=ds["variant"].values[0]).isel(seed=0).load()
    panels = xr.concat(
        [g.sel(N=r, M=r, drop=True) for r in diagonal], dim=pd.Index(diagonal, name="N=M")
    )
    panels = panels / np.abs(panels).max(["query_latent", "key_latent"])
    dominance = ds["diagonal_fraction"].sel(variant=ds["variant"].values[0]).isel(seed=0).load()

    def title(where: dict[str, Any]) -> str:
        r = where["N=M"]
        value = float(dominance.sel(d_head=where["d_head"], N=r, M=r))
        return f"d_head={where['d_head']}, N=M={r}: diag {value:.2f}"

    return plots.heatmap_grid(
        panels,
        x="key_latent",
        y="query_latent",
        row="d_head",
        col="N=M",
        cmap="RdBu_r",
        center=0.0,
        vmin=-1.0,
        vmax=1.0,
        dropna=True,
        cbar_label="G / max|G|",
        panel_title=title,
        title=f"G = (W_Q B)^T (W_K A), {ds['variant'].values[0]} latents",
    )


# ------------------------------------------------------------------------------------------
# summary


def summary(ds: xr.Dataset) -> str:
    """A table per cell: accuracy, recovered ranks per seed, flip rates, G's diagonal mass."""
    ds = current_names(ds)
    rows = []
    for variant in ds["variant"].values:
        for d_head in ds["d_head"].values:
            for n in ds["N"].values:
                for m in ds["M"].values:
                    cell = ds.sel(variant=variant, d_head=d_head, N=n, M=m).load()
                    ranks = cell["rank"]
                    flips = cell["flip_rate"].mean("seed")
                    rows.append(
                        {
                            "variant": variant,
                            "d_head": int(d_head),
                            "N": int(n),
                            "M": int(m),
                            "accuracy": float(cell["accuracy"].mean()),
                            "rank z1": ",".join(str(int(v)) for v in ranks.sel(latent="z1").values),
                            "rank z2": ",".join(str(int(v)) for v in ranks.sel(latent="z2").values),
                            "flip z1": float(flips.sel(subspace="z1")),
                            "flip z2": float(flips.sel(subspace="z2")),
                            "flip both": float(flips.sel(subspace="both")),
                            "rand both": float(flips.sel(subspace="random_both")),
                            "dim both": float(cell["subspace_size"].sel(subspace="both").mean()),
                            "G diag": float(cell["diagonal_fraction"].mean()),
                            "G blocks": float(cell["block_fraction"].mean()),
                        }
                    )
    table = pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.2f}")
    seconds = ds.attrs.get("seconds")
    header = (
        f"toy study: {ds.sizes['seed']} seed(s); ranks listed per seed; flip = flip rate of "
        "the swap (rand = random subspaces of the same dim); G diag/blocks = share of |G|^2"
        + (f"; {seconds} s" if seconds else "")
    )
    return f"{header}\n{table}"
