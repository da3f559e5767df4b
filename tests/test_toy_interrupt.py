"""Ctrl-C on `qktrace toy` (two worker processes): it stops within seconds, leaves no process
behind, says "interrupted", keeps the finished models, and the same command resumes.

A real SIGINT is sent to the whole process group of a real `qktrace toy` process, as a terminal
does on Ctrl-C. The grid is shrunk (one variant, d_head 8, N = M = 3, three seeds, fewer pairs)
by a wrapper that changes only the defaults of `studies.toy.settings`, so the command line, the
pool and the signal handling are exactly those a user runs.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import qktrace

ROOT = Path(__file__).parents[1]
# SIGINT handled as in a terminal's foreground job even when this test runs where it is ignored
# (a background job of a non-interactive shell passes SIG_IGN on, and Python then keeps it)
TINY_GRID = """
import functools, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
from qktrace.studies import toy
toy.settings = functools.partial(toy.settings, ranks=(3,), d_heads=(8,), variants=("discrete",),
                                 n_contrast_pairs=1000, n_random=1)
from qktrace.cli import app
app(sys.argv[1:], prog_name="qktrace")
"""


def toy(out: Path) -> subprocess.Popen:
    args = ["toy", "-o", str(out), "--n-seeds", "3", "--max-steps", "60", "--workers", "2"]
    args += ["--no-figures"]
    return subprocess.Popen(
        [sys.executable, "-c", TINY_GRID, *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
        env={**os.environ, "MPLBACKEND": "Agg"},
    )


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.e2e
def test_ctrl_c_stops_at_once_keeps_finished_models_and_resumes(tmp_path):
    cells = tmp_path / "toy.cells"
    run = toy(tmp_path)
    try:
        deadline = time.monotonic() + 240
        while not list(cells.glob("cell-*.zarr")):  # wait for a first finished model
            assert run.poll() is None, run.communicate()
            assert time.monotonic() < deadline, "no model finished in 240 s"
            time.sleep(0.2)
        os.killpg(run.pid, signal.SIGINT)  # Ctrl-C: the whole group, workers included
        stopped = time.monotonic()
        _, err = run.communicate(timeout=60)
        took = time.monotonic() - stopped
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    assert run.returncode == 130, err
    assert took < 30, f"took {took:.0f} s to stop"
    kept = len(list(cells.glob("cell-*.zarr")))
    assert f"Error: interrupted. {kept} finished model" in err and "Traceback" not in err
    assert 1 <= kept < 3
    for _ in range(50):  # the workers and multiprocessing's helper are gone with it
        if not group_alive(run.pid):
            break
        time.sleep(0.1)
    assert not group_alive(run.pid), "processes of the interrupted run are still alive"
    assert not (tmp_path / "toy.zarr").exists()

    rerun = toy(tmp_path)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert "wrote" in out
    ds = qktrace.open(tmp_path / "toy.zarr")
    assert ds.sizes["seed"] == 3 and ds.attrs["models_resumed"] >= kept
    assert not cells.exists()


def test_a_kept_model_of_other_parameters_is_refused(tmp_path):
    from qktrace.studies import toy as toy_study

    small = dict(ranks=(3,), d_heads=(8,), variants=("discrete",), n_contrast_pairs=500, n_random=1)
    kept = toy_study.Cells(tmp_path / "toy.cells", toy_study.settings(max_steps=5, **small))
    kept.keep(("discrete", 8, 3, 3, 0), __import__("xarray").Dataset())
    with pytest.raises(
        ValueError,
        match=r"holds the finished models of a run with different "
        r"parameters \(max_steps\):\n  max_steps: stored 5, now 6\n.*--overwrite",
    ):
        toy_study.run(tmp_path, max_steps=6, figures=False, progress=False,
                      **small)  # fmt: skip
