"""An interrupted study, rerun with the same call, resumes from what it saved and ends identical.

Order-ID on a tiny Llama checkpoint: the run is interrupted (KeyboardInterrupt, as Ctrl-C raises)
either in the in-trace covariance sums (batch 2 of 2) or later, in the interventions; the rerun
must skip the saved batches and write the same store as a run that was never interrupted.
"""

from __future__ import annotations

import pytest
import xarray as xr

import qktrace.interventions as interventions_module
import qktrace.sums as sums_module
import qktrace.testing as testing
from qktrace import store
from studies import order_id

# heads out of layer order on purpose; 6 prompts in 2 reduce batches of 3
RUN = dict(
    heads="1.0,0.2", n_prompts=6, n_test=2, n_pairs=3, n_random=1, batch_size=3,
    figures=False, progress=False,
)  # fmt: skip


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    checkpoint = testing.save_checkpoint(tmp / "tiny-llama", "llama")
    path = order_id.run(checkpoint, out=tmp / "whole", **RUN)
    return checkpoint, store.open(path).load()


def counting(monkeypatch, module, name, fail_at=None):
    """Wrap module.name: count its calls; raise KeyboardInterrupt at call `fail_at` (1-based)."""
    real = getattr(module, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


@pytest.mark.parametrize(
    "where, module, name, saved_prompts, reduce_calls_after",
    [
        ("sums batch 2", sums_module, "_reduce_batch", 3, 1),
        ("interventions", interventions_module, "_intervene_batch", 6, 0),
    ],
    ids=["in-sums", "in-interventions"],
)
def test_interrupted_study_resumes_and_equals_uninterrupted(
    uninterrupted, tmp_path, monkeypatch, where, module, name, saved_prompts, reduce_calls_after
):
    checkpoint, whole = uninterrupted
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        counting(m, module, name, fail_at=2 if module is sums_module else 1)
        with pytest.raises(KeyboardInterrupt):
            order_id.run(checkpoint, out=out, **RUN)
    assert not (out / "order_id.zarr").exists()
    sums = store.open(out / "order_id.sums.zarr")  # what the interrupted run kept
    assert sums.attrs["n_prompts"] == saved_prompts

    reduce_calls = counting(monkeypatch, sums_module, "_reduce_batch")
    path = order_id.run(checkpoint, out=out, **RUN)  # the same call again
    assert len(reduce_calls) == reduce_calls_after  # saved batches are not recomputed
    resumed = store.open(path).load()

    expected = whole.copy()
    expected.attrs = {k: v for k, v in whole.attrs.items() if k != "date"}
    assert resumed.attrs.pop("date")  # the only attr that may differ
    xr.testing.assert_identical(resumed, expected)
    assert sorted(p.name for p in out.glob("*.zarr")) == ["order_id.zarr"]  # checkpoint removed
