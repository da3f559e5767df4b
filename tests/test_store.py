"""qktrace.store: round trips, lazy open, atomic save, crash-safe batch append and resume."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
from collections.abc import Callable
from pathlib import Path

import dask.array as da
import numpy as np
import pytest
import xarray as xr

import qktrace
from qktrace.store import BatchWriter, arrays, provenance, save, writer
from qktrace.store import io as store
from qktrace.store.files import MANIFEST
from qktrace.store.identity import PROVENANCE_KEYS
from qktrace.store.manifest import Manifest

PARAMS = {"layers": (3, 5), "n_prompts": 11, "out": Path("run.zarr")}
ATTRS = {"study": "unit", "model": "tiny-llama"}
N_BATCHES = 5
SIZES = {"token": 5}  # the longest batch's tokens: the plan's width


def make_batch(i: int) -> xr.Dataset:
    """Batch i: 2 or 3 prompts with global ids, a token dim padded to this batch's longest prompt."""
    rng = np.random.default_rng(i)
    n_prompt = 2 + i % 2
    n_token = 3 + i % 3
    start = sum(2 + j % 2 for j in range(i))
    tokens = np.array([[f"t{i}.{p}.{t}" for t in range(n_token)] for p in range(n_prompt)])
    return xr.Dataset(
        {
            "q": (
                ("prompt", "head", "token", "dq"),
                rng.standard_normal((n_prompt, 2, n_token, 4)),
            ),
            "ids": (("prompt", "token"), rng.integers(0, 100, (n_prompt, n_token))),
            "length": ("prompt", np.full(n_prompt, n_token)),
        },
        coords={
            "prompt": np.arange(start, start + n_prompt),
            "head": [3, 7],
            "category": ("prompt", np.array(["fruit", "tool", "animal"][:n_prompt], dtype=object)),
            "token_str": (("prompt", "token"), tokens),
        },
    )


def make_batches() -> list[xr.Dataset]:
    return [make_batch(i) for i in range(N_BATCHES)]


def run(
    path: Path,
    batches: list[xr.Dataset],
    *,
    fail_at: int | None = None,
    sizes: dict[str, int] = SIZES,
    every: float = 0.0,
) -> BatchWriter:
    """The study loop: skip stored batches, produce and append the rest; fail at `fail_at`.

    With `every` > 0 the writer holds batches and writes them when the loop ends or fails."""
    with BatchWriter(path, params=PARAMS, attrs=ATTRS, sizes=sizes, write_every_s=every) as w:
        for i, batch in enumerate(batches):
            if i < w.n_done:
                continue
            if i == fail_at:
                raise RuntimeError("producer died")
            w.append(batch)
    return w


def crash_during_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the next to_zarr write metadata but no data (a partial store), then fail."""
    real = xr.Dataset.to_zarr

    def partial(self, store, **kwargs):
        real(self, store, compute=False, **kwargs)
        raise OSError("disk full")

    monkeypatch.setattr(xr.Dataset, "to_zarr", partial)


def assert_holds_batches(ds: xr.Dataset, batches: list[xr.Dataset]) -> None:
    """Each batch is in `ds` exactly once, in order, padded only beyond its own sizes."""
    expected_prompts = np.concatenate([b.prompt.values for b in batches])
    np.testing.assert_array_equal(ds.prompt.values, expected_prompts)
    for b in batches:
        part = ds.sel(prompt=b.prompt).isel(token=slice(0, b.sizes["token"]))
        for name in ["q", "ids", "length", "category", "token_str"]:
            np.testing.assert_array_equal(part[name].values, b[name].values, err_msg=name)
        pad = ds.sel(prompt=b.prompt).isel(token=slice(b.sizes["token"], None))
        assert np.isnan(pad.q.values).all() and np.isnan(pad.ids.values).all()
        assert (pad.token_str.values == "").all()


@pytest.fixture
def labeled() -> xr.Dataset:
    ds = make_batch(0)
    ds = ds.assign_coords(feature=["fruit", "tool"])
    ds["delta_c"] = (("feature", "dq"), np.arange(8.0).reshape(2, 4))
    ds["delta_c"].attrs["note"] = np.float32(0.5)
    return ds


# ---------------------------------------------------------------------------------- provenance


def test_provenance_records_versions_params_and_mode():
    params = {
        "layers": (3, np.int64(5)),
        "out": Path("a/b.zarr"),
        "nested": {"scale": np.float32(0.5), "heads": np.array([1, 2]), "flag": np.bool_(True)},
    }
    p = provenance("study", params, study="filter_heads", model="m", revision="abc", remote=True,
                   seed=np.int64(1))  # fmt: skip
    assert tuple(p) == PROVENANCE_KEYS
    assert p["qktrace_version"] == qktrace.__version__
    assert {"nnsight_version", "torch_version", "transformers_version"} <= set(p)
    assert p["params"] == {
        "layers": [3, 5],
        "out": "a/b.zarr",
        "nested": {"scale": 0.5, "heads": [1, 2], "flag": True},
    }
    assert type(p["params"]["layers"][1]) is int and type(p["params"]["nested"]["flag"]) is bool
    assert (p["verb"], p["study"], p["model"], p["revision"], p["remote"], p["seed"]) == (
        "study",
        "filter_heads",
        "m",
        "abc",
        "ndif",
        1,
    )
    date = dt.datetime.fromisoformat(p["date"])
    assert date.utcoffset() == dt.timedelta(0)


@pytest.mark.parametrize(
    ("remote", "mode"), [(False, "local"), ("local", "remote-local"), (True, "ndif")]
)
def test_provenance_remote_modes(remote, mode):
    assert provenance("s", {}, remote=remote)["remote"] == mode


def test_provenance_rejects_unknown_remote():
    with pytest.raises(ValueError, match="remote='cloud'.*True"):
        provenance("s", {}, remote="cloud")


# ---------------------------------------------------------------------------------- save / open


def test_save_round_trip_keeps_labels_strings_and_provenance(tmp_path, labeled):
    attrs = provenance("unit", PARAMS, model="tiny", seed=0)
    path = save(labeled, tmp_path / "r.zarr", attrs=attrs)
    assert path == tmp_path / "r.zarr"
    back = store.open(path).load()
    expected = labeled.copy()
    expected.attrs = attrs
    expected["delta_c"].attrs["note"] = 0.5
    xr.testing.assert_identical(back, expected)
    assert list(back.feature.values) == ["fruit", "tool"]
    assert back.token_str.values[1, 2] == "t0.1.2"
    assert back.attrs["params"]["layers"] == [3, 5]


def test_open_is_lazy(tmp_path, labeled):
    save(labeled, tmp_path / "r.zarr")
    ds = store.open(tmp_path / "r.zarr")
    for name in ["q", "ids", "delta_c", "token_str"]:
        assert isinstance(ds[name].data, da.Array), name


def test_save_refuses_to_overwrite(tmp_path, labeled):
    path = save(labeled, tmp_path / "r.zarr")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save(labeled.isel(prompt=[0]), path)
    xr.testing.assert_identical(store.open(path).load(), labeled)
    save(labeled.isel(prompt=[0]), path, overwrite=True)
    xr.testing.assert_identical(store.open(path).load(), labeled.isel(prompt=[0]))


def test_save_never_replaces_something_that_is_not_a_store(tmp_path, labeled):
    precious = tmp_path / "notes"
    precious.mkdir()
    (precious / "a.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a zarr or qktrace store"):
        save(labeled, precious, overwrite=True)
    assert (precious / "a.txt").read_text() == "keep me"
    (tmp_path / "empty.zarr").mkdir()  # an empty directory made beforehand is fine
    xr.testing.assert_identical(store.open(save(labeled, tmp_path / "empty.zarr")).load(), labeled)


@pytest.mark.parametrize("existing", [True, False])
def test_save_crash_leaves_old_store_and_no_partial_one(tmp_path, labeled, monkeypatch, existing):
    path = tmp_path / "r.zarr"
    if existing:
        save(labeled, path)
    crash_during_write(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        save(labeled.isel(prompt=[1]), path, overwrite=True)
    monkeypatch.undo()
    if existing:
        xr.testing.assert_identical(store.open(path).load(), labeled)
    else:
        assert not path.exists()
    assert [p.name for p in tmp_path.iterdir()] == (["r.zarr"] if existing else [])


def test_save_evens_out_uneven_dask_chunks(tmp_path):
    run(tmp_path / "run.zarr", make_batches())
    merged = save(store.open(tmp_path / "run.zarr"), tmp_path / "merged.zarr")
    xr.testing.assert_identical(store.open(merged).load(), store.open(tmp_path / "run.zarr").load())


def test_open_missing_path_names_it(tmp_path):
    with pytest.raises(
        FileNotFoundError, match=r"no qktrace store at .*nope\.zarr: check the path"
    ):
        store.open(tmp_path / "nope.zarr")


@pytest.mark.parametrize("what", ["dir", "file"])
def test_open_non_store_says_what_it_is(tmp_path, what):
    path = tmp_path / "thing"
    path.mkdir() if what == "dir" else path.write_text("x")
    with pytest.raises(ValueError, match=r"thing is a .*not a qktrace store.*pass the path"):
        store.open(path)


def test_open_batch_store_without_batches(tmp_path):
    BatchWriter(tmp_path / "run.zarr", params=PARAMS)
    with pytest.raises(ValueError, match="no complete batch yet"):
        store.open(tmp_path / "run.zarr")


# ---------------------------------------------------------------------------------- batches


def test_batches_open_lazily_concatenated_and_padded(tmp_path):
    batches = make_batches()
    w = run(tmp_path / "run.zarr", batches)
    assert w.n_done == N_BATCHES
    ds = store.open(tmp_path / "run.zarr")
    assert isinstance(ds.q.data, da.Array) and isinstance(ds.token_str.data, da.Array)
    assert dict(ds.sizes) == {"prompt": 12, "head": 2, "token": 5, "dq": 4}
    assert ds.ids.dtype.kind == "f"  # padded with NaN, as xarray.concat would
    assert ds.attrs["params"] == {"layers": [3, 5], "n_prompts": 11, "out": "run.zarr"}
    assert ds.attrs["model"] == "tiny-llama" and ds.attrs["batch_dim"] == "prompt"
    assert_holds_batches(ds.load(), batches)


@pytest.mark.parametrize("every", [0.0, 1e9], ids=["each", "held"])
@pytest.mark.parametrize("k", [0, 1, 3])
def test_resume_after_producer_crash_is_identical_to_uninterrupted_run(tmp_path, k, every):
    """Held batches are written when the producer fails too (the writer's exit), then resumed."""
    batches = make_batches()
    run(tmp_path / "ref.zarr", batches)
    with pytest.raises(RuntimeError, match="producer died"):
        run(tmp_path / "run.zarr", batches, fail_at=k, every=every)
    assert BatchWriter(tmp_path / "run.zarr", params=PARAMS, attrs=ATTRS).n_done == k
    assert run(tmp_path / "run.zarr", batches, every=every).n_done == N_BATCHES
    resumed = store.open(tmp_path / "run.zarr").load()
    xr.testing.assert_identical(resumed, store.open(tmp_path / "ref.zarr").load())
    assert_holds_batches(resumed, batches)


@pytest.mark.parametrize("k", [0, 2])
def test_crash_inside_append_then_resume_is_identical(tmp_path, monkeypatch, k):
    batches = make_batches()
    run(tmp_path / "ref.zarr", batches)
    run(tmp_path / "run.zarr", batches[:k])
    w = BatchWriter(tmp_path / "run.zarr", params=PARAMS, attrs=ATTRS)
    crash_during_write(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        w.append(batches[k])
    monkeypatch.undo()
    assert w.n_done == k
    assert BatchWriter(tmp_path / "run.zarr", params=PARAMS, attrs=ATTRS).n_done == k
    run(tmp_path / "run.zarr", batches)
    resumed = store.open(tmp_path / "run.zarr").load()
    xr.testing.assert_identical(resumed, store.open(tmp_path / "ref.zarr").load())
    assert_holds_batches(resumed, batches)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def kill_after_growing() -> None:
    """The arrays grew (batch 2 does not fit them), no data written yet."""
    real = arrays.resize_arrays
    arrays.resize_arrays = lambda *args: (real(*args), die())


def kill_mid_data() -> None:
    """One variable's rows of the batch written, the others not."""
    real = xr.Dataset.to_zarr

    def dying(self, path, **kwargs):
        if "region" in kwargs:
            real(self[["q"]], path, **kwargs)
            die()
        return real(self, path, **kwargs)

    xr.Dataset.to_zarr = dying


def kill_before_commit(batch: int = 2) -> None:
    """Every row of `batch` on disk, the manifest not yet replaced."""
    real = Manifest.commit

    def dying(self, **changes):
        if changes.get("n_batches", 0) > batch:  # the commit that would count `batch`
            die()
        real(self, **changes)

    Manifest.commit = dying


def kill_holding(batch: int = 4) -> None:
    """SIGKILL when `batch` is appended: with held batches, those before it are not written."""
    real = BatchWriter.append

    def dying(self, ds):
        if self.n_done + self.n_held == batch:
            die()
        real(self, ds)

    BatchWriter.append = dying


def killed_while_appending(
    path: Path, kill: Callable[[], None], sizes: dict[str, int], done: int = 2, every: float = 0.0
) -> None:
    """Write `done` batches, then SIGKILL a forked child (nothing of it runs on) in the next.

    With `every` > 0 the child holds its batches and writes them together at its end."""
    run(path, make_batches()[:done], sizes=sizes)
    child = os.fork()
    if child == 0:  # pragma: no cover (the child never returns)
        try:
            kill()
            run(path, make_batches(), sizes=sizes, every=every)
        finally:
            os._exit(1)
    _, status = os.waitpid(child, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status


def kill_case(kill: Callable[[], None], planned: bool, every: float) -> object:
    name = (
        f"{kill.__name__}-{'planned-rows' if planned else 'growing'}-{'held' if every else 'each'}"
    )
    return pytest.param(kill, planned, every, id=name)


@pytest.mark.parametrize(
    ("kill", "planned", "every"),
    [kill_case(kill_after_growing, False, 0.0), kill_case(kill_mid_data, False, 0.0),
     kill_case(kill_before_commit, False, 0.0), kill_case(kill_mid_data, True, 0.0),
     kill_case(kill_before_commit, True, 0.0), kill_case(kill_after_growing, False, 1e9),
     kill_case(kill_mid_data, True, 1e9), kill_case(kill_before_commit, True, 1e9),
     kill_case(kill_holding, True, 1e9)],
)  # fmt: skip
def test_process_killed_inside_append_then_resume_is_identical(tmp_path, kill, planned, every):
    """SIGKILL while batch 2 is written (held: while batches 2-4 are written together, or while
    2-3 are held): the store reopens at 2 batches, a rerun completes it."""
    sizes = {**SIZES, "prompt": 12} if planned else SIZES
    batches = make_batches()
    run(tmp_path / "ref.zarr", batches, sizes=sizes)
    reference = store.open(tmp_path / "ref.zarr").load()
    path = tmp_path / "run.zarr"
    killed_while_appending(path, kill, sizes, every=every)
    # the last complete batch, checked whole, without resuming
    two = store.open(path, checksums=True).load()
    xr.testing.assert_identical(two, reference.isel(prompt=slice(0, 5)))
    assert BatchWriter(path, params=PARAMS, attrs=ATTRS, sizes=sizes).n_done == 2
    run(path, batches, sizes=sizes)
    resumed = store.open(path, checksums=True).load()
    xr.testing.assert_identical(resumed, reference)
    assert_holds_batches(resumed, batches)
    assert not list(path.glob("**/*.partial")) and not list(path.glob(".*.tmp-*"))


def test_process_killed_in_the_first_batch_then_resume_is_identical(tmp_path):
    """Arrays created, manifest not replaced: no batch counts, and the rerun starts over."""
    batches = make_batches()
    run(tmp_path / "ref.zarr", batches)
    path = tmp_path / "run.zarr"
    killed_while_appending(path, lambda: kill_before_commit(batch=0), SIZES, done=0)
    assert (path / "q").is_dir()  # the first batch's arrays, uncommitted
    with pytest.raises(ValueError, match="no complete batch yet"):
        store.open(path)
    run(path, batches)
    resumed = store.open(path, checksums=True).load()
    xr.testing.assert_identical(resumed, store.open(tmp_path / "ref.zarr").load())


def test_held_batches_are_written_together_into_the_same_store(tmp_path, monkeypatch):
    """write_every_s holds batches and writes them in one zarr write and one manifest commit;
    the store is the one a write per batch makes, chunked by the first batch as well."""
    batches = make_batches()
    run(tmp_path / "ref.zarr", batches, sizes={**SIZES, "prompt": 12})
    writes, commits = [], []
    real_write, real_commit = xr.Dataset.to_zarr, Manifest.commit
    monkeypatch.setattr(
        xr.Dataset, "to_zarr", lambda *a, **k: writes.append(1) or real_write(*a, **k)
    )
    monkeypatch.setattr(
        Manifest, "commit", lambda *a, **k: commits.append(1) or real_commit(*a, **k)
    )
    w = run(tmp_path / "run.zarr", batches, sizes={**SIZES, "prompt": 12}, every=1e9)
    assert (len(writes), len(commits)) == (1, 1) and (w.n_done, w.n_held) == (N_BATCHES, 0)
    xr.testing.assert_identical(
        store.open(tmp_path / "run.zarr", checksums=True).load(),
        store.open(tmp_path / "ref.zarr").load(),
    )
    chunks = [
        json.loads((tmp_path / r / "q" / ".zarray").read_text())["chunks"]
        for r in ("ref.zarr", "run.zarr")
    ]
    assert chunks[0] == chunks[1] and chunks[0][0] == 2  # one chunk per first batch's 2 prompts


def test_held_batches_are_written_when_due_or_over_the_memory_cap(tmp_path, monkeypatch):
    """A write is due `write_every_s` after the last one, or as soon as held batches exceed
    `max_buffer_mib`; until then `n_done` counts only what is on disk."""
    clock = [0.0]
    monkeypatch.setattr(writer.time, "monotonic", lambda: clock[0])
    batches = make_batches()
    w = BatchWriter(
        tmp_path / "run.zarr", params=PARAMS, attrs=ATTRS, sizes=SIZES, write_every_s=10
    )
    counts = []
    for t, batch in zip([1, 5, 12, 13, 30], batches, strict=True):
        clock[0] = t
        w.append(batch)
        counts.append((w.n_done, w.n_held))
    assert counts == [(0, 1), (0, 2), (3, 0), (3, 1), (5, 0)]  # written at t=12 and t=30
    # batches of 4 texts of 100,000 characters (~0.4 MB, of which `nbytes` sees 32 bytes of
    # pointers): with a 0.5 MiB cap any two are over it, so they are written in pairs
    texts = [
        xr.Dataset(
            {"text": ("prompt", np.array([chr(65 + i) * 100_000] * 4, dtype=object))},
            coords={"prompt": np.arange(4 * i, 4 * i + 4)},
        )
        for i in range(5)
    ]
    capped = BatchWriter(
        tmp_path / "capped.zarr", params=PARAMS, write_every_s=1e9, max_buffer_mib=0.5
    )
    counts = []
    for batch in texts:
        capped.append(batch)
        counts.append(capped.n_done)
    assert counts == [0, 2, 2, 4, 4]
    capped.flush()
    assert capped.n_done == 5 and capped.n_held == 0
    stored = store.open(tmp_path / "capped.zarr").text.values
    assert list(stored) == [t for batch in texts for t in batch.text.values]


def test_open_reads_one_zarr_group_however_many_batches(tmp_path, monkeypatch):
    """Opening costs one zarr group and a fixed set of metadata files, not one per batch."""
    opened = []
    real = xr.open_zarr
    monkeypatch.setattr(xr, "open_zarr", lambda p, **kw: opened.append(p) or real(p, **kw))
    metadata = {}
    for n in (3, 30):
        path = tmp_path / f"run{n}.zarr"
        w = BatchWriter(path, params={"n": n}, sizes={"prompt": 2 * n})
        for i in range(n):
            w.append(
                xr.Dataset({"x": ("prompt", [i, i + 0.5])}, coords={"prompt": [2 * i, 2 * i + 1]})
            )
        opened.clear()
        ds = store.open(path)
        assert [Path(str(getattr(p, "root", p))) for p in opened] == [path]
        assert ds.sizes["prompt"] == 2 * n
        assert float(ds.x.sum()) == sum(2 * i + 0.5 for i in range(n))
        metadata[n] = sorted(p.relative_to(path).as_posix() for p in path.rglob(".z*"))
        assert [p.name for p in path.rglob(".zgroup")] == [".zgroup"]  # one group, at the top
    assert metadata[3] == metadata[30]
    assert metadata[3] == [
        ".zattrs", ".zgroup", ".zmetadata", "prompt/.zarray", "prompt/.zattrs", "x/.zarray", "x/.zattrs"
    ]  # fmt: skip


def test_the_store_reads_back_without_qktrace_once_finalized(tmp_path):
    """Grown by doubling, the arrays are cut to the complete rows by finalize."""
    batches = make_batches()
    w = run(tmp_path / "run.zarr", batches)
    assert xr.open_zarr(tmp_path / "run.zarr").sizes["prompt"] > 12  # grown beyond the rows
    w.finalize()
    plain = xr.open_zarr(tmp_path / "run.zarr").load()
    assert plain.sizes["prompt"] == 12 and plain.attrs["model"] == "tiny-llama"
    assert_holds_batches(plain, batches)
    xr.testing.assert_identical(
        store.open(tmp_path / "run.zarr", checksums=True).load(),
        plain.assign_attrs(batch_dim="prompt"),
    )


def write_per_batch_layout(path: Path, batches: list[xr.Dataset]) -> None:
    """A store as qktrace wrote it before the one-store layout: one zarr store per batch."""
    for i, batch in enumerate(batches):
        save(batch, path / f"batch-{i:06d}.zarr")
    manifest = {"format": "qktrace-batches", "version": 1, "dim": "prompt", "params": PARAMS,
                "attrs": {**ATTRS, "params": PARAMS}, "finalized": False}  # fmt: skip
    (path / MANIFEST).write_text(json.dumps(manifest, default=str))


def test_a_store_of_the_per_batch_layout_still_opens(tmp_path):
    path = tmp_path / "old.zarr"
    batches = make_batches()
    write_per_batch_layout(path, batches)
    ds = store.open(path, checksums=True)
    assert ds.attrs["model"] == "tiny-llama" and ds.attrs["batch_dim"] == "prompt"
    assert_holds_batches(ds.load(), batches)
    with pytest.raises(ValueError, match=r"older qktrace, one zarr store per batch.*new path"):
        BatchWriter(path, params=PARAMS, attrs=ATTRS)


def test_reopen_with_different_params_names_each_key(tmp_path):
    path = tmp_path / "run.zarr"
    run(path, make_batches()[:1])
    changed = {**PARAMS, "layers": (3, 6), "extra": 1}
    with pytest.raises(ValueError) as err:
        BatchWriter(path, params=changed, attrs=ATTRS)
    msg = str(err.value)
    assert "different parameters (layers, extra):\n" in msg
    assert "  layers: stored [3, 5], now [3, 6]" in msg
    assert "  extra: stored '<missing>', now 1" in msg
    assert "n_prompts" not in msg
    assert "a new --out" in msg and "--overwrite" in msg and f"delete {path}" in msg
    with pytest.raises(ValueError, match=r"\(model\):\n  model: stored 'tiny-llama', now 'other'"):
        BatchWriter(path, params=PARAMS, attrs={"model": "other"})
    with pytest.raises(ValueError, match=r"dim: stored 'prompt', now 'item'"):
        BatchWriter(path, params=PARAMS, dim="item")
    with pytest.raises(
        ValueError, match=r"\(sizes\['token'\]\):\n  sizes\['token'\]: stored 5, now 6"
    ):
        BatchWriter(path, params=PARAMS, attrs=ATTRS, sizes={"token": 6})  # another plan's width
    # the same parameters in other Python types (tuple vs list, Path vs str) are the same run
    same = {"layers": [3, 5], "n_prompts": np.int64(11), "out": "run.zarr"}
    assert BatchWriter(path, params=same).n_done == 1


def test_append_checks_batch_dim_and_schema(tmp_path):
    w = BatchWriter(tmp_path / "run.zarr", params=PARAMS, sizes=SIZES)
    with pytest.raises(ValueError, match="no 'prompt' dim.*expand_dims"):
        w.append(make_batch(0).isel(prompt=0))
    w.append(make_batch(0))
    w = BatchWriter(tmp_path / "run.zarr", params=PARAMS)
    with pytest.raises(ValueError, match="variable 'ids'.*this batch '<missing>'"):
        w.append(make_batch(1).drop_vars("ids"))
    assert w.n_done == 1


def test_writer_refuses_paths_it_does_not_own(tmp_path, labeled):
    save(labeled, tmp_path / "single.zarr")
    with pytest.raises(FileExistsError, match="written by save"):
        BatchWriter(tmp_path / "single.zarr", params=PARAMS)
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x").write_text("x")
    with pytest.raises(FileExistsError, match="not a qktrace store"):
        BatchWriter(tmp_path / "dir", params=PARAMS)


def test_finalize_writes_reduced_results(tmp_path):
    path = tmp_path / "run.zarr"
    w = run(path, make_batches())
    sums = store.open(path).q.sum("prompt").rename("q_sum").to_dataset().compute()
    assert w.finalize(sums) == path / "final.zarr"
    final = store.open(path, final=True)
    assert isinstance(final.q_sum.data, da.Array)
    xr.testing.assert_allclose(final.q_sum.load(), sums.q_sum)
    assert final.attrs["n_batches"] == N_BATCHES and final.attrs["model"] == "tiny-llama"
    with pytest.raises(ValueError, match="finalized after 5 batches"):
        w.append(make_batch(5))
    # a rerun of the whole script skips every batch and finalizes again
    again = run(path, make_batches())
    again.finalize(sums)
    assert again.n_done == N_BATCHES


def test_open_final_missing(tmp_path, labeled):
    run(tmp_path / "run.zarr", make_batches()[:1])
    with pytest.raises(FileNotFoundError, match="finalize"):
        store.open(tmp_path / "run.zarr", final=True)
    save(labeled, tmp_path / "single.zarr")
    with pytest.raises(ValueError, match="without final=True"):
        store.open(tmp_path / "single.zarr", final=True)


def test_append_refuses_a_batch_larger_than_planned(tmp_path):
    w = BatchWriter(tmp_path / "run.zarr", params=PARAMS)
    w.append(make_batch(0))  # 3 tokens: without sizes=, the first batch fixes the width
    with pytest.raises(ValueError, match=r"batch 1 has 4 along 'token'.*sizes=\{'token'"):
        w.append(make_batch(1))
    wider = make_batch(2).assign_coords(head=[3, 8])
    with pytest.raises(ValueError, match=r"'head' labels \[3, 8\].*\[3, 7\]"):
        w.append(wider.isel(token=slice(0, 3)))
    assert w.n_done == 1


def test_gap_in_per_batch_layout_is_reported(tmp_path):
    path = tmp_path / "run.zarr"
    write_per_batch_layout(path, make_batches()[:3])
    os.rename(path / "batch-000001.zarr", tmp_path / "moved.zarr")
    with pytest.raises(ValueError, match="batch 1 is missing"):
        store.open(path)
