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
import qktrace.sums as sums_module
import qktrace.testing as testing
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
