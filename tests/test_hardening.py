"""Issue 20: nothing lost, nothing forged, one clear error.

Each test here failed on the code before the fix it names: a run deleting folders it did not
write, a reader seeing a store torn by a writer replacing it, an overwrite through a symlink,
malformed records, absurd shapes, escape sequences from a store's attrs, huge sizes, eval's
output.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from qktrace.core.errors import StoreError
from qktrace.store import BatchWriter, StoreDamagedError, provenance
from qktrace.store import io as store
from qktrace.store.files import INTEGRITY, MANIFEST
from qktrace.store.integrity import StoreIntegrityWarning
from qktrace.study.tools import check_out, checkpoint, write

# --------------------------------------------------------------------------------------------
# bug 1: a run deletes only what it wrote, by exact name


def _folder(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "mine.txt").write_text("a user's own data")
    return path


def _store(path: Path) -> Path:
    return store.save(xr.Dataset({"x": ("prompt", np.arange(3.0))}), path)


def test_overwrite_removes_only_the_runs_own_checkpoints(tmp_path):
    path = tmp_path / "order_id.zarr"
    _store(path)
    theirs = [
        _folder(tmp_path / "order_id.mine.zarr"),  # matched the old glob <study>.*.zarr
        _store(tmp_path / "order_id.backup.zarr"),  # a store of the user's, same pattern
        _folder(tmp_path / ".order_id.mine.zarr.tmp-0123abcd"),  # another store's copy
    ]
    ours = _store(checkpoint(path, "sums"))
    left = _folder(tmp_path / ".order_id.zarr.old-0123abcd")
    check_out(path, overwrite=True)
    assert all(p.exists() for p in theirs)
    assert not ours.exists() and not left.exists()


def test_writing_the_store_removes_only_the_runs_own_checkpoints(tmp_path):
    path = tmp_path / "lexical.zarr"
    theirs = _folder(tmp_path / "lexical.notes.zarr")
    ours = _store(checkpoint(path, "counterfactual"))
    ds = xr.Dataset({"x": ("prompt", np.arange(3.0))})
    write(ds, path, study="lexical", params={}, model="m", seed=0, overwrite=False)
    assert theirs.exists() and not ours.exists()


# --------------------------------------------------------------------------------------------
# bug 3: --overwrite of a store whose path is a symbolic link


def test_overwrite_through_a_symlink_replaces_the_linked_store(tmp_path):
    real = _store(tmp_path / "disk" / "order_id.zarr")
    link = tmp_path / "out" / "order_id.zarr"
    link.parent.mkdir()
    link.symlink_to(real, target_is_directory=True)
    sums = _store(checkpoint(link, "sums"))
    new = xr.Dataset({"x": ("prompt", np.arange(5.0))})
    write(new, link, study="order_id", params={}, model="m", seed=0, overwrite=True)
    assert link.is_symlink() and store.open(link).sizes["prompt"] == 5
    assert store.open(real).sizes["prompt"] == 5
    assert not sums.exists()
    assert sorted(p.name for p in real.parent.iterdir()) == ["order_id.zarr"]


# --------------------------------------------------------------------------------------------
# bug 2: a reader never sees a store torn by a writer replacing it


def _generation(i: int) -> xr.Dataset:
    """Store number `i`: every value is i, and its attrs say so."""
    x = np.full((8, 64), float(i))
    return xr.Dataset({"x": (("prompt", "d"), x)}, attrs={"generation": i}).chunk(prompt=1)


def test_a_reader_sees_the_old_store_whole_or_a_clear_error(tmp_path):
    """Readers open the store, then read it, while a writer replaces it again and again."""
    import threading

    path = store.save(_generation(0), tmp_path / "s.zarr")
    done = threading.Event()

    def writer() -> None:
        for i in range(1, 60):
            if done.is_set():
                return
            store.save(_generation(i), path, overwrite=True)

    thread = threading.Thread(target=writer)
    thread.start()
    torn, refused, whole = [], 0, 0
    try:
        while thread.is_alive() and len(torn) < 3:
            try:
                ds = store.open(path)
                values = ds["x"].values
            except StoreError:
                refused += 1  # the clear error: read again
                continue
            if not (values == ds.attrs["generation"]).all():
                torn.append((ds.attrs["generation"], np.unique(values)))
            else:
                whole += 1
    finally:
        done.set()
        thread.join()
    assert not torn, f"{len(torn)} torn reads (attrs generation, values seen): {torn}"
    assert whole > 0


# --------------------------------------------------------------------------------------------
# bug 4: `qktrace show` of malformed integrity records and manifests: one clear error


def _show(path: Path) -> tuple[int, str]:
    from typer.testing import CliRunner

    from qktrace.cli import app

    result = CliRunner().invoke(app, ["show", str(path)])
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    return result.exit_code, errors[0]


def _batch_store(path: Path) -> Path:
    with BatchWriter(path, params={"n": 2}) as w:
        w.append(xr.Dataset({"x": ("prompt", np.arange(2.0))}))
    return path


def _edit(path: Path, change) -> Path:
    record = json.loads(path.read_text())
    change(record)
    path.write_text(json.dumps(record))
    return path


def _first_file(record: dict, value) -> None:
    record["files"][next(iter(record["files"]))] = value


MALFORMED = {
    "integrity-null-entry": (INTEGRITY, lambda r: _first_file(r, None)),
    "integrity-string-entry": (INTEGRITY, lambda r: _first_file(r, "12")),
    "integrity-files-null": (INTEGRITY, lambda r: r.update(files=None)),
    "integrity-version-string": (INTEGRITY, lambda r: r.update(version="1")),
    "integrity-record-a-list": (INTEGRITY, lambda r: r.clear() or r.update(x=[1])),
    "manifest-null-entry": (MANIFEST, lambda r: _first_file(r, None)),
    "manifest-rows-null": (MANIFEST, lambda r: r.update(rows=None)),
    "manifest-dim-number": (MANIFEST, lambda r: r.update(dim=5)),
    "manifest-attrs-string": (MANIFEST, lambda r: r.update(attrs="x")),
}


@pytest.mark.parametrize("case", MALFORMED, ids=list(MALFORMED))
def test_show_of_a_malformed_record_names_the_store_and_the_file(case, tmp_path):
    name, change = MALFORMED[case]
    path = tmp_path / "s.zarr"
    _store(path) if name == INTEGRITY else _batch_store(path)
    _edit(path / name, change)
    code, error = _show(path)
    assert code == 1
    assert str(path) in error and name in error and "layout version" in error, error


@pytest.mark.parametrize("name", [INTEGRITY, MANIFEST])
def test_show_of_a_newer_layout_names_the_version(name, tmp_path):
    path = tmp_path / "s.zarr"
    _store(path) if name == INTEGRITY else _batch_store(path)
    _edit(path / name, lambda r: r.update(version=7))
    code, error = _show(path)
    assert code == 1
    assert str(path) in error and name in error and "layout version 7" in error, error
    assert "newer qktrace" in error and "Upgrade qktrace" in error


# --------------------------------------------------------------------------------------------
# bug 5: a tiny store whose metadata declares an absurd shape is refused at once


def _absurd_store(path: Path, name: str, shape: list[int], chunks: list[int]) -> Path:
    """A few hundred bytes of zarr metadata declaring one array of `shape` (no chunk files)."""
    array = {"zarr_format": 2, "shape": shape, "chunks": chunks, "dtype": "<f8",
             "compressor": None, "fill_value": "NaN", "filters": None, "order": "C"}  # fmt: skip
    attrs = {"_ARRAY_DIMENSIONS": ["prompt"]}
    metadata = {".zgroup": {"zarr_format": 2}, ".zattrs": {},
                f"{name}/.zarray": array, f"{name}/.zattrs": attrs}  # fmt: skip
    (path / name).mkdir(parents=True)
    for key, value in metadata.items():
        (path / key).write_text(json.dumps(value))
    (path / ".zmetadata").write_text(
        json.dumps({"zarr_consolidated_format": 1, "metadata": metadata})
    )
    return path


ABSURD = {
    "index-coordinate": ("prompt", [10**10], [10**5]),  # xarray reads an index whole at open
    "summarized-variable": ("rank", [10**9], [10**9]),  # show reads ranks whole
}


@pytest.mark.parametrize("case", ABSURD, ids=list(ABSURD))
def test_show_refuses_a_store_declaring_an_absurd_shape_at_once(case, tmp_path):
    import resource
    import subprocess
    import sys

    path = _absurd_store(tmp_path / "absurd.zarr", *ABSURD[case])
    assert sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) < 2000

    def two_gib() -> None:  # a fix that reads what the store declares fails here, not the machine
        resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30 + 2**29,) * 2)

    result = subprocess.run(
        [sys.executable, "-c", "from qktrace.cli import app; app()", "show", str(path)],
        capture_output=True, text=True, timeout=120, preexec_fn=two_gib,
        cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
    assert "declares what no store holds" in result.stderr, result.stderr[-2000:]


# --------------------------------------------------------------------------------------------
# bug 6: text from a store's attrs never reaches the terminal as escape sequences


def test_show_escapes_control_characters_and_cuts_long_values(tmp_path):
    from typer.testing import CliRunner

    from qktrace.cli import app

    forged = "order_id\x1b[2J\x1b[H\nstudy filter_heads | model trusted\u202e"
    ds = xr.Dataset(
        {"rank": (("head", "feature"), [[1, 2]])},
        coords={"head": ["1.0"], "feature": ["fruit\x1b[31m", "animal\r\nforged label"]},
        attrs={"study": forged, "model": "m" * 10_000, "params": {"note": "\x07\x1b]0;title\x07"}},
    )
    path = store.save(ds, tmp_path / "attrs.zarr")
    result = CliRunner().invoke(app, ["show", str(path)])
    assert result.exit_code == 0, result.output
    out = result.output
    for bad in ("\x1b", "\x07", "\r", "\u202e"):
        assert bad not in out
    assert not any(line.startswith(("study filter_heads", "forged")) for line in out.splitlines())
    assert "m" * 600 not in out and "m" * 400 in out  # cut, and the start still shown
    assert "\\x1b[2J" in out  # shown escaped, so a reader sees what the store holds


# --------------------------------------------------------------------------------------------
# bug 7: a huge size argument is refused before any work (before the model loads)


@pytest.mark.parametrize("flag", ["--n-random", "--n-test", "--n-prompts", "--n-random-answers"])
def test_a_huge_size_is_refused_before_the_model_loads(flag, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import qktrace.study.tools as study_tools
    from qktrace.cli import app

    loaded = []
    monkeypatch.setattr(study_tools, "load", lambda *a, **k: loaded.append(a) or 1 / 0)
    args = ["study", "order-id", "-o", str(tmp_path / "out"), "--no-figures", "--quiet"]
    result = CliRunner().invoke(app, [*args, flag, str(10**13)])
    assert not loaded, "the model was loaded before the size was checked"
    assert result.exit_code == 2, result.output
    assert f"(CLI {flag}) is too large: the run would allocate about" in result.stderr
    assert "Traceback" not in result.output


# --------------------------------------------------------------------------------------------
# bug 8: `qktrace eval -o` gets the checks and the lock of a study, before any work


def _eval(tmp_path: Path, monkeypatch, *args: str):
    """`qktrace eval` on a model that must not load; (result, whether it loaded)."""
    from typer.testing import CliRunner

    import qktrace.model.loading
    from qktrace.cli import app

    loaded = []
    monkeypatch.setattr(qktrace.model.loading, "load", lambda *a, **k: loaded.append(a) or 1 / 0)
    result = CliRunner().invoke(app, ["eval", "--n", "1", "--pairs", "2", "-q", *args])
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.output
    return result, errors[0], loaded


def test_eval_out_a_file_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    result, error, loaded = _eval(tmp_path, monkeypatch, "-o", str(tmp_path / "afile"))
    assert result.exit_code == 2 and not loaded
    assert "afile is a file; pass a directory" in error


def test_eval_out_a_read_only_folder_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    readonly = Path("/sys/kernel")  # not writable even by root
    result, error, loaded = _eval(tmp_path, monkeypatch, "-o", str(readonly))
    assert result.exit_code == 2 and not loaded
    assert "--out /sys/kernel cannot be written (" in error


def test_eval_out_busy_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    from qktrace.store.locks import writing

    with writing(tmp_path / "out" / "eval.zarr"):  # another run writing the same output
        result, error, loaded = _eval(tmp_path, monkeypatch, "-o", str(tmp_path / "out"))
    assert result.exit_code == 1 and not loaded
    assert "another run is writing" in error and "eval.zarr" in error


@pytest.mark.parametrize(
    "pairs, message",
    [("9-2", "is a reversed range; write 2-9"), ("2-40", "asks for 27 pairs"),
     ("2,,3", "write a range like"), ("3, 3", "more than once")],
)  # fmt: skip
def test_eval_pairs_are_parsed_as_typed_and_checked_first(pairs, message, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    import qktrace.model.loading
    from qktrace.cli import _parse_pairs, app

    assert _parse_pairs(" 2 - 4 ") == [2, 3, 4] and _parse_pairs("2, 5") == [2, 5]
    monkeypatch.setattr(qktrace.model.loading, "load", lambda *a, **k: 1 / 0)
    result = CliRunner().invoke(app, ["eval", "--pairs", pairs])
    assert result.exit_code == 2 and message in result.stderr, result.output


# --------------------------------------------------------------------------------------------
# SIGTERM is handled like Ctrl-C; an --out that fails mid-run exits 2 saying what is kept

TINY_STUDY = ["--heads", "1.0", "--n-prompts", "4", "--n-test", "2", "--n-pairs", "2",
              "--n-random", "1", "--batch-size", "2", "--no-figures", "--quiet"]  # fmt: skip


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory) -> Path:
    import qktrace.model.testing as testing

    return testing.save_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-llama", "llama")


def _study(checkpoint_path: Path, out: Path):
    from typer.testing import CliRunner

    from qktrace.cli import app

    args = ["study", "order-id", "-m", str(checkpoint_path), "-o", str(out), *TINY_STUDY]
    result = CliRunner().invoke(app, args)
    assert "Traceback" not in result.output
    return result


def test_sigterm_keeps_the_checkpoint_and_exits_143(tiny_checkpoint, tmp_path, monkeypatch):
    import signal

    import qktrace.verbs.reduce as sums_module

    real, calls = sums_module._reduce_batch, []

    def terminated(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            signal.raise_signal(signal.SIGTERM)  # what `timeout` or a scheduler sends
        return real(*args, **kwargs)

    monkeypatch.setattr(sums_module, "_reduce_batch", terminated)
    result = _study(tiny_checkpoint, tmp_path)
    assert result.exit_code == 143, result.output
    assert "Error: terminated (SIGTERM). Completed batches are kept next to" in result.stderr
    assert store.open(tmp_path / "order_id.sums.zarr").sizes  # the first batch's sums are kept
    monkeypatch.setattr(sums_module, "_reduce_batch", real)
    assert _study(tiny_checkpoint, tmp_path).exit_code == 0  # and the same command resumes


def test_a_full_disk_exits_2_and_says_what_is_kept(tiny_checkpoint, tmp_path, monkeypatch):
    import errno
    import os

    real = store.save

    def full(ds, path, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(store, "save", full)
    result = _study(tiny_checkpoint, tmp_path)
    assert result.exit_code == 2, result.output
    error = result.stderr.split("Error: ", 1)[1]
    assert "cannot write to --out" in error and "no space left on device, ENOSPC" in error
    assert "Completed batches are kept next to" in error and "rerun the same command" in error
    monkeypatch.setattr(store, "save", real)


# --------------------------------------------------------------------------------------------
# a failure while drawing figures keeps the complete store; `qktrace plot` finishes them


def test_a_figure_failure_keeps_the_store_and_qktrace_plot_draws_them(
    tiny_checkpoint, tmp_path, monkeypatch
):
    from typer.testing import CliRunner

    import qktrace.study.pipeline as pipeline
    from qktrace.cli import app

    real = pipeline.pca_figure
    monkeypatch.setattr(pipeline, "pca_figure", lambda *a, **k: 1 / 0)
    args = ["study", "order-id", "-m", str(tiny_checkpoint), "-o", str(tmp_path), "--figures"]
    result = CliRunner().invoke(app, [*args, *[a for a in TINY_STUDY if a != "--no-figures"]])
    assert result.exit_code == 2, result.output
    error = result.stderr.split("Error: ", 1)[1]
    assert "drawing the figures failed (ZeroDivisionError" in error
    assert f"qktrace plot {tmp_path / 'order_id.zarr'}" in error
    assert store.open(tmp_path / "order_id.zarr", checksums=True).sizes
    assert not (tmp_path / "order_id.sums.zarr").exists()
    monkeypatch.setattr(pipeline, "pca_figure", real)
    result = CliRunner().invoke(app, ["plot", str(tmp_path / "order_id.zarr")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "order_id_pca_key_label.png").is_file()


# --------------------------------------------------------------------------------------------
# open checks the metadata's CRC-32 every time; a qktrace store without its record is refused


def _provenance_store(path: Path) -> Path:
    ds = xr.Dataset({"x": ("prompt", np.arange(3.0))})
    return store.save(ds, path, attrs=provenance("demo", {"n": 3}))


def test_open_checks_the_metadata_checksum_every_time(tmp_path):
    path = _provenance_store(tmp_path / "s.zarr")
    zattrs = path / "x" / ".zattrs"
    text = zattrs.read_text()
    zattrs.write_text(text.replace("prompt", "prumpt"))  # same size: only a checksum sees it
    with pytest.raises(StoreDamagedError, match=r"x/\.zattrs|file \.zattrs changed"):
        store.open(path)


def test_a_qktrace_store_without_its_integrity_record_is_refused(tmp_path):
    path = _provenance_store(tmp_path / "s.zarr")
    (path / INTEGRITY).unlink()
    with pytest.raises(StoreDamagedError, match=r"has no qktrace_integrity\.json.*deleted"):
        store.open(path)


def test_an_older_qktrace_store_without_a_record_opens_with_a_warning(tmp_path):
    ds = xr.Dataset({"x": ("prompt", np.arange(3.0))})
    attrs = {**provenance("demo", {}), "date": "2026-01-02T00:00:00+00:00"}
    path = store.save(ds, tmp_path / "old.zarr", attrs=attrs)
    (path / INTEGRITY).unlink()
    with pytest.warns(StoreIntegrityWarning, match="opens unchecked"):
        assert float(store.open(path)["x"].sum()) == 3.0


# --------------------------------------------------------------------------------------------
# study declarations that could not be stored fail before any forward pass


def _names_study(meta, **changes):
    from qktrace.core.prompts import PromptBuilder
    from qktrace.study import Study

    def prompts(n, seed):
        built = []
        for i in range(n):
            b = PromptBuilder().add("Mary", "name").add(" and ").add("John", "name")
            built.append(b.add(" then she").build(meta=meta(i)))
        return built

    labels = lambda p: [("gender", "positive"), ("gender", "negative")]  # noqa: E731
    return Study(name="names", prompts=prompts, keys="name", labels=labels, n_prompts=4,
                 n_test=2, **changes)  # fmt: skip


def _run_tiny(study, tmp_path, monkeypatch, **settings):
    import qktrace.model.testing as testing
    from qktrace.model.loading import load
    from qktrace.study.pipeline import run_study

    net, tok = testing.model("llama"), testing.tokenizer("bpe")
    lm = load(net[0], tokenizer=tok)
    if settings.pop("forbid_forward", True):
        monkeypatch.setattr(lm, "trace", lambda *a, **k: pytest.fail("a forward pass ran"))
    return run_study(study, lm, out=tmp_path, heads="1.3", progress=False, **settings)


DECLARATIONS = {
    "meta key clashing with a variable": (
        _names_study(lambda i: {"rank": i}),
        ["Study 'names', prompt 0", "meta key 'rank', the name of a variable of the study's store"],
    ),
    "coords clashing with a variable": (
        _names_study(lambda i: {}, coords=lambda p: {"q": 1.0}),
        ["coords(prompt) key 'q', the name of a variable", "rename it (e.g. 'q_label')"],
    ),
    "meta of mixed types": (
        _names_study(lambda i: {"level": i if i % 2 == 0 else "high"}),
        ["prompt 1", "meta 'level' = 'high' (str), but earlier prompts have 0 (int)"],
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(DECLARATIONS))
def test_a_declaration_that_cannot_be_stored_fails_before_any_forward_pass(
    case, tmp_path, monkeypatch
):
    from qktrace.study.pipeline import StudyError

    study, expected = DECLARATIONS[case]
    with pytest.raises(StudyError) as err:
        _run_tiny(study, tmp_path, monkeypatch)
    for text in expected:
        assert text in str(err.value), str(err.value)


def test_an_error_in_a_studys_figures_is_named_as_the_studys(tmp_path, monkeypatch):
    from qktrace.study.pipeline import StudyError

    study = _names_study(lambda i: {}, figures=lambda ds: {"mine": 1 / 0})
    with pytest.raises(StudyError) as err:
        _run_tiny(study, tmp_path, monkeypatch, forbid_forward=False, n_random=1)
    message = str(err.value)
    assert "Study 'names': drawing its figures(dataset) failed (ZeroDivisionError" in message
    assert store.open(tmp_path / "names.zarr").sizes and "qktrace plot" in message


# --------------------------------------------------------------------------------------------
# the paper studies' options, parsed as users type them, checked before the model loads


def _filter_heads(tmp_path, monkeypatch, categories: str):
    from typer.testing import CliRunner

    import qktrace.study.tools as study_tools
    from qktrace.cli import app

    def load(*args, **kwargs):
        raise RuntimeError("the model would load now")

    monkeypatch.setattr(study_tools, "load", load)
    args = ["study", "filter-heads", "-o", str(tmp_path), "--categories", categories, "-q"]
    return CliRunner().invoke(app, args)


def test_categories_with_spaces_after_commas_are_read_as_meant(tmp_path, monkeypatch):
    result = _filter_heads(tmp_path, monkeypatch, "fruit, animal , vehicle")
    assert "the model would load now" in result.stderr, result.output  # parsed and accepted


@pytest.mark.parametrize(
    "categories, message",
    [("fruit,animl", "has 'animl', which is not a category (did you mean 'animal'?)"),
     ("fruit,,animal", "has an empty entry"), ("fruit", "give at least two")],
)  # fmt: skip
def test_bad_categories_are_refused_before_the_model_loads(
    categories, message, tmp_path, monkeypatch
):
    result = _filter_heads(tmp_path, monkeypatch, categories)
    assert result.exit_code == 2, result.output
    assert message in result.stderr and "would load" not in result.stderr


def test_a_lock_path_that_is_a_folder_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    (tmp_path / ".eval.zarr.lock").mkdir()
    result, error, loaded = _eval(tmp_path, monkeypatch, "-o", str(tmp_path))
    assert result.exit_code == 2 and not loaded
    assert "the lock file" in error and ".eval.zarr.lock of eval.zarr is a folder" in error


def test_every_issue_20_row_names_a_test():
    import re

    docs = (Path(__file__).parents[1] / "docs" / "errors.md").read_text()
    section = docs.split("## Third hardening round (issue 20)", 1)[1]
    named = re.findall(r"\| `(test_\w+)` \|$", section, re.M)
    here = (Path(__file__).parent / "test_hardening.py").read_text()
    assert len(named) >= 20
    assert [n for n in named if f"def {n}(" not in here] == []
