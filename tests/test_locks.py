"""One writer per output: a second run on the same output stops at once; a killed run's lock
does not stay in the way (the operating system releases it when the process dies)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

import qktrace.model.testing as testing
from qktrace.cli import app
from qktrace.store.locks import OutputBusy, lock_path, writing

# qktrace/store/locks.py loaded with the core modules alone (it needs only filelock): no torch,
# xarray or zarr import, a fast start
HOLD = """
import importlib.util, sys, time, types
for name in ("qktrace", "qktrace.core", "qktrace.store"):  # empty parents: the real ones import more
    package = types.ModuleType(name)
    package.__path__ = [name.replace(".", "/")]
    sys.modules[name] = package
for name in ("core.errors", "core.checks", "store.locks"):
    spec = importlib.util.spec_from_file_location(f"qktrace.{name}", f"qktrace/{name.replace('.', '/')}.py")
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
locks = sys.modules["qktrace.store.locks"]
with locks.writing(sys.argv[1]):
    print("holding", flush=True)
    time.sleep(600)
"""


def hold_lock(path: Path) -> subprocess.Popen:
    """Another process that takes the lock on `path` and keeps it until killed."""
    root = Path(__file__).parents[1]
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(path)], cwd=root, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "holding"
    return proc


def test_a_second_writer_stops_at_once_and_a_killed_writer_frees_the_output(tmp_path):
    path = tmp_path / "out" / "order_id.zarr"
    holder = hold_lock(path)
    try:
        start = time.monotonic()
        with pytest.raises(OutputBusy, match=rf"another run is writing .*order_id\.zarr "
                                             rf"\(process {holder.pid} holds"):  # fmt: skip
            with writing(path):
                pass
        assert time.monotonic() - start < 5  # at once, no waiting for the other run
    finally:
        holder.send_signal(signal.SIGKILL)  # killed: no chance to release anything itself
        holder.wait()
    assert holder.returncode == -signal.SIGKILL
    with writing(path):  # the dead holder's lock is gone with it
        assert lock_path(path).exists()
    assert not lock_path(path).exists()  # removed when the run ends


ORDER_ID = ["--heads", "1.0", "--n-prompts", "4", "--n-test", "2", "--n-pairs", "2"]
ORDER_ID += ["--n-random", "1", "--batch-size", "2", "--no-figures", "--quiet"]


def test_the_cli_refuses_a_second_run_on_the_same_output(tmp_path):
    checkpoint = testing.save_checkpoint(tmp_path / "tiny-llama", "llama")
    out = tmp_path / "out"
    holder = hold_lock(out / "order_id.zarr")  # a run on this --out is under way
    try:
        args = ["study", "order-id", "-m", checkpoint, "-o", out, "--seed", "1", *ORDER_ID]
        result = CliRunner().invoke(app, [str(a) for a in args])
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 1, result.output
    assert "wrote" not in result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "another run is writing" in errors[0], result.stderr
    assert not (out / "order_id.zarr").exists() and not (out / "order_id.sums.zarr").exists()
    # the holder died: the same command now runs
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.stdout
    assert "figures in" not in result.stdout  # --no-figures: no figures to speak of


def test_other_outputs_are_not_locked(tmp_path):
    holder = hold_lock(tmp_path / "a" / "order_id.zarr")
    try:
        with writing(tmp_path / "a" / "lexical.zarr"), writing(tmp_path / "b" / "order_id.zarr"):
            pass
    finally:
        holder.kill()
        holder.wait()
    assert os.path.isdir(tmp_path / "a")
