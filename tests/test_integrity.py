"""A damaged store is refused with one error naming the store, the variable and the fix.

zarr reads a missing chunk as its fill value, so before qktrace recorded what a finished store
holds, `rm -rf OUT/order_id.zarr/rank` made `qktrace show` print rank 0 for every head and a
deleted `delta_c` chunk read back as NaN. Each test damages a real study store one way.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import xarray as xr
from typer.testing import CliRunner

import qktrace
import qktrace.model.testing as testing
from qktrace.cli import app
from qktrace.store import BatchWriter, StoreDamagedError
from qktrace.store import io as store
from qktrace.store.files import INTEGRITY, MANIFEST

ORDER_ID = ["--heads", "1.0", "--n-prompts", "4", "--n-test", "2", "--n-pairs", "2"]
ORDER_ID += ["--n-random", "1", "--batch-size", "2", "--no-figures", "--quiet"]


def cli(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> tuple[Path, Path]:
    """(tiny checkpoint, an order-id output folder written by the CLI)."""
    tmp = tmp_path_factory.mktemp("integrity")
    checkpoint = testing.save_checkpoint(tmp / "tiny-llama", "llama")
    code, out, err = cli("study", "order-id", "-m", checkpoint, "-o", tmp / "out", *ORDER_ID)
    assert code == 0, out + err
    return checkpoint, tmp / "out"


@pytest.fixture
def copy(study, tmp_path) -> Path:
    """A fresh copy of the order-id output folder, to damage."""
    shutil.copytree(study[1], tmp_path / "out")
    return tmp_path / "out" / "order_id.zarr"


def first_chunk(path: Path, variable: str) -> Path:
    return sorted(p for p in (path / variable).iterdir() if not p.name.startswith("."))[0]


def damage(path: Path, how: str) -> str:
    """Damage `path` one way; return the variable damaged."""
    if how == "variable-folder-deleted":
        shutil.rmtree(path / "rank")
        return "rank"
    chunk = first_chunk(path, "delta_c")
    if how == "chunk-deleted":
        chunk.unlink()
    elif how == "chunk-empty":
        chunk.write_bytes(b"")
    elif how == "chunk-truncated":
        chunk.write_bytes(chunk.read_bytes()[:-7])
    return "delta_c"


HOW = ["variable-folder-deleted", "chunk-deleted", "chunk-empty", "chunk-truncated"]


@pytest.mark.parametrize("how", HOW)
def test_open_refuses_a_damaged_store(copy, how):
    variable = damage(copy, how)
    with pytest.raises(StoreDamagedError) as err:
        qktrace.open(copy)
    message = str(err.value)
    assert str(copy) in message and f"variable {variable!r}" in message
    # the command that wrote it, to rewrite it
    assert "Rewrite it with: qktrace study order-id" in message and "--overwrite" in message
    assert "--n-prompts 4" in message


@pytest.mark.parametrize("how", HOW)
def test_show_says_one_line_naming_store_variable_and_command(copy, how):
    variable = damage(copy, how)
    code, out, err = cli("show", copy)
    assert code == 1, out + err
    assert "Traceback" not in out + err
    errors = [line for line in err.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and len(err.strip().splitlines()) == 1, err
    assert f"variable {variable!r}" in errors[0] and "order_id.zarr is damaged" in errors[0]
    assert "qktrace study order-id" in errors[0]


def test_show_catches_a_changed_chunk_of_the_same_size(copy):
    chunk = first_chunk(copy, "delta_c")
    data = bytearray(chunk.read_bytes())
    data[-1] ^= 0xFF
    chunk.write_bytes(bytes(data))
    qktrace.open(copy)  # sizes agree: the lazy open does not read the data
    with pytest.raises(StoreDamagedError, match=r"variable 'delta_c': file .* changed"):
        qktrace.open(copy, checksums=True)
    code, _, err = cli("show", copy)
    assert code == 1 and "CRC-32 differs" in err


def test_lexical_refuses_to_reuse_a_damaged_order_id_store(study, copy):
    checkpoint, _ = study
    shutil.rmtree(copy / "key_basis")
    args = ["study", "lexical", "-m", checkpoint, "-o", copy.parent, *ORDER_ID]
    code, out, err = cli(*args)
    assert code == 1, out + err
    assert "order_id.zarr is damaged: variable 'key_basis'" in err
    assert not (copy.parent / "lexical.zarr").exists()


def test_a_damaged_batch_is_refused_on_open_and_on_resume(tmp_path):
    path = tmp_path / "run.zarr"
    writer = BatchWriter(path, params={"n": 2}, sizes={"prompt": 6})
    for i in range(2):
        writer.append(xr.Dataset({"x": ("prompt", np.arange(3.0) + i)}))
    record = json.loads((path / MANIFEST).read_text())["files"]
    assert {"x/0", "x/1", "x/.zarray", ".zmetadata"} <= set(record)  # every batch's chunks
    (path / "x" / "1").write_bytes(b"")  # batch 1's rows
    with pytest.raises(StoreDamagedError, match=r"run\.zarr is damaged: variable 'x': file 1 is"):
        store.open(path)
    with pytest.raises(StoreDamagedError, match=r"run\.zarr is damaged: variable 'x'"):
        BatchWriter(path, params={"n": 2})
    shutil.rmtree(path / "x")
    with pytest.raises(StoreDamagedError, match="variable 'x': its folder is missing"):
        store.open(path)


def test_a_resumed_sums_checkpoint_is_checked(tmp_path, llama):
    prompts = ["The apple is in Box A, the cat is in Box B", "Which box is the cat in? Box"]
    labels = [[("fruit", "positive"), ("fruit", "negative")]] * 2
    out = tmp_path / "sums.zarr"
    qktrace.reduce(llama, prompts, "1.0", labels, keys=[[1, 2], [2, 3]], out=out, progress=False)
    shutil.rmtree(out / "pair_count")
    with pytest.raises(StoreDamagedError, match=r"sums\.zarr is damaged: variable 'pair_count'"):
        qktrace.reduce(llama, prompts, "1.0", labels, keys=[[1, 2], [2, 3]], out=out)


def test_the_record_lists_variables_shapes_and_chunks(study):
    path = study[1] / "order_id.zarr"
    record = json.loads((path / INTEGRITY).read_text())
    ds = qktrace.open(path)
    assert set(ds.variables) == set(record["variables"])
    for name, entry in record["variables"].items():
        chunks = [f for f in (path / name).iterdir() if not f.name.startswith(".")]
        assert entry["shape"] == list(ds[name].shape) and entry["chunks"] == len(chunks)
    assert sum(e["chunks"] for e in record["variables"].values()) > 0
    assert record["command"].startswith("qktrace study order-id ")


def test_a_store_without_a_record_still_opens(tmp_path):
    """Stores written before the record (or by other tools) open unchecked."""
    xr.Dataset({"x": ("i", np.arange(3.0))}).to_zarr(tmp_path / "plain.zarr", zarr_format=2)
    assert float(qktrace.open(tmp_path / "plain.zarr").x.sum()) == 3.0
