"""A partial sums checkpoint says exactly what it holds: the counts and prompts it summed.

Before, an interrupted `reduce(out=)` saved the sums of the first prompts with the pair counts
and `n_prompts` of all of them, so `decompose` on the checkpoint gave singular values several
times too small. Now its `pair_count` and `n_prompts` are those of the prompts summed, so it
decomposes to exactly what a run on those prompts alone gives.
"""

from __future__ import annotations

import re
import signal

import numpy as np
import pytest
from typer.testing import CliRunner

import qktrace
import qktrace.model.testing as testing
import qktrace.verbs.reduce as sums_module
from qktrace.cli import app
from tests.test_sums import KEYS, LABELS, PROMPTS


def interrupt_at_batch(monkeypatch, k: int) -> None:
    """A real SIGINT in the k-th reduce batch (1-based)."""
    real, calls = sums_module._reduce_batch, []

    def dies(*args, **kwargs):
        calls.append(1)
        if len(calls) == k:
            signal.raise_signal(signal.SIGINT)
        return real(*args, **kwargs)

    monkeypatch.setattr(sums_module, "_reduce_batch", dies)


@pytest.mark.parametrize("delta", [False, True], ids=["sums", "delta"])
def test_a_partial_checkpoint_counts_only_what_it_summed(llama, tmp_path, monkeypatch, delta):
    out = tmp_path / "sums.zarr"
    interrupt_at_batch(monkeypatch, 3)  # batches of 2: prompts 0..3 are summed
    with pytest.raises(KeyboardInterrupt):
        qktrace.reduce(llama, PROMPTS, "1.0", LABELS, keys=KEYS, batch_size=2, out=out,
                       progress=False, delta=delta)  # fmt: skip
    monkeypatch.undo()
    partial = qktrace.open(out).load()
    assert partial.attrs["n_prompts"] == 4 and partial.attrs["params"]["n_prompts"] == 5
    assert partial.attrs["partial"].startswith("partial (4 of 5 prompts)")
    first = qktrace.reduce(llama, PROMPTS[:4], "1.0", LABELS[:4], keys=KEYS[:4], batch_size=2,
                           progress=False)  # fmt: skip
    np.testing.assert_array_equal(partial["pair_count"].values, first["pair_count"].values)
    if delta:  # ΔC weighted by the full run's counts cannot be decomposed before the end
        with pytest.raises(ValueError, match=r"partial \(4 of 5 prompts\).*finish the run"):
            qktrace.decompose(partial)
    else:  # the checkpoint decomposes to exactly what the first 4 prompts give
        np.testing.assert_allclose(
            qktrace.decompose(partial)["singular_values"].values,
            qktrace.decompose(first)["singular_values"].values,
            rtol=1e-12,
        )
    whole = qktrace.reduce(llama, PROMPTS, "1.0", LABELS, keys=KEYS, batch_size=2, out=out,
                           progress=False, delta=delta)  # fmt: skip
    assert whole.attrs["n_prompts"] == 5 and "partial" not in whole.attrs
    assert "partial" not in qktrace.open(out).attrs


def test_show_says_partial_and_how_to_resume(llama, tmp_path, monkeypatch):
    out = tmp_path / "sums.zarr"
    interrupt_at_batch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        qktrace.reduce(llama, PROMPTS, "1.0", LABELS, keys=KEYS, batch_size=2, out=out,
                       progress=False)  # fmt: skip
    result = CliRunner().invoke(app, ["show", str(out)])
    assert result.exit_code == 0, result.output
    assert re.search(r"partial \(2 of 5 prompts\).*rerun the same call .* to resume", result.output)


ORDER_ID = ["--heads", "1.0", "--n-prompts", "4", "--n-test", "2", "--n-pairs", "2"]
ORDER_ID += ["--n-random", "1", "--batch-size", "2", "--no-figures", "--quiet"]


def test_leftover_copies_are_cleaned_by_the_next_successful_run(tmp_path):
    checkpoint = testing.save_checkpoint(tmp_path / "tiny-llama", "llama")
    out = tmp_path / "out"
    out.mkdir()
    leftovers = [out / ".order_id.sums.zarr.old-1a2b3c4d", out / ".order_id.zarr.tmp-0f0f0f0f"]
    for leftover in leftovers:  # as a killed checkpoint write leaves them
        (leftover / "qk_sum").mkdir(parents=True)
    keep = out / ".lexical.sums.zarr.old-1a2b3c4d"  # another study's: not this run's to delete
    keep.mkdir()
    args = ["study", "order-id", "-m", checkpoint, "-o", out, *ORDER_ID]
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert not any(p.exists() for p in leftovers)
    assert keep.exists()
    assert {p.name for p in out.iterdir()} == {"order_id.zarr", keep.name}


# A run killed where no Python code runs after it (SIGKILL, a power cut), in its 3rd batch of 2.
HARD_KILL = """
import json, os, signal, sys
import qktrace, qktrace.verbs.reduce as sums, qktrace.model.testing as testing
from qktrace.model.loading import load
out, every, prompts, keys, labels = json.loads(sys.argv[1])
sums.CHECKPOINT_EVERY_S = every
real, calls = sums._reduce_batch, []
def dies(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
sums._reduce_batch = dies
net, tok = testing.model("llama")
labels = [[tuple(x) if x else None for x in row] for row in labels]
qktrace.reduce(load(net, tokenizer=tok), prompts, "1.0", labels, keys=keys, batch_size=2,
               out=out, progress=False)
"""


@pytest.mark.parametrize(
    "every, saved_prompts", [(0.0, 4), (1e9, 0)], ids=["every-batch", "not-yet"]
)
def test_a_hard_kill_loses_at_most_the_batches_since_the_last_checkpoint(
    llama, tmp_path, monkeypatch, every, saved_prompts
):
    """The running sums are written every `CHECKPOINT_EVERY_S` seconds, not every batch: a kill
    that Python never sees loses the batches summed since the last write, and no more. With
    writes due every batch, batches 1-2 (4 prompts) survive; with none due yet, nothing does,
    and the rerun sums everything again. (A Ctrl-C or an error is saved on the way out: above.)"""
    import json
    import subprocess
    import sys

    out = tmp_path / "sums.zarr"
    args = json.dumps([str(out), every, PROMPTS, KEYS, LABELS])
    killed = subprocess.run([sys.executable, "-c", HARD_KILL, args], capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()[-2000:]
    if saved_prompts:
        assert qktrace.open(out).attrs["n_prompts"] == saved_prompts
    else:
        assert not out.exists()
    real, calls = sums_module._reduce_batch, []
    monkeypatch.setattr(
        sums_module, "_reduce_batch", lambda *a, **k: calls.append(1) or real(*a, **k)
    )
    resumed = qktrace.reduce(llama, PROMPTS, "1.0", LABELS, keys=KEYS, batch_size=2, out=out,
                             progress=False)  # fmt: skip
    assert len(calls) == (1 if saved_prompts else 3)  # the lost batches, and only they, rerun
    whole = qktrace.reduce(llama, PROMPTS, "1.0", LABELS, keys=KEYS, batch_size=2, progress=False)
    np.testing.assert_allclose(resumed["qk_sum"].values, whole["qk_sum"].values, rtol=1e-12)
