"""An interrupted run, rerun with the same call, resumes from what it saved and ends identical.

Order-ID on a tiny Llama checkpoint: the run is interrupted (a real SIGINT, a KeyboardInterrupt as
Ctrl-C raises, or any other error) either in the in-trace covariance sums (batch 2 of 2) or
later, in the answer-level swaps (the last forward passes); the rerun must skip the saved batches and write the same store as a
run that was never interrupted. The same holds for `capture(out=)` and `reduce(out=)` killed
after batch k: the store on disk equals the store of an uninterrupted run.
"""

from __future__ import annotations

import signal

import pytest
import xarray as xr

import qktrace
import qktrace.model.testing as testing
import qktrace.verbs.answers as answers_module
import qktrace.verbs.capture as qk_module
import qktrace.verbs.reduce as sums_module
from qktrace.store import io as store
from qktrace.studies import order_id
from tests.test_sums import KEYS, PROMPTS  # the same five prompts and key positions

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


def sigint() -> None:
    """Deliver a real SIGINT to this process (Python's handler raises KeyboardInterrupt)."""
    signal.raise_signal(signal.SIGINT)
    raise AssertionError("SIGINT did not interrupt the run")


def crash() -> None:
    raise RuntimeError("simulated crash in this batch")


def ctrl_c() -> None:
    raise KeyboardInterrupt


def counting(monkeypatch, module, name, fail_at=None, fail=ctrl_c):
    """Wrap module.name: count its calls; call `fail` (which raises) at call `fail_at` (1-based)."""
    real = getattr(module, name)
    calls = []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if len(calls) == fail_at:
            fail()
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)
    return calls


@pytest.mark.parametrize(
    "module, name, fail, error, saved_prompts, reduce_calls_after",
    [
        (sums_module, "_reduce_batch", sigint, KeyboardInterrupt, 3, 1),
        (sums_module, "_reduce_batch", crash, RuntimeError, 3, 1),
        (answers_module, "_answers_batch", ctrl_c, KeyboardInterrupt, 6, 0),
    ],
    ids=["sigint-in-sums", "error-in-sums", "ctrl-c-in-answer-swaps"],
)
def test_interrupted_study_resumes_and_equals_uninterrupted(
    uninterrupted, tmp_path, monkeypatch, module, name, fail, error, saved_prompts,
    reduce_calls_after,
):  # fmt: skip
    checkpoint, whole = uninterrupted
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        counting(m, module, name, fail_at=2 if module is sums_module else 1, fail=fail)
        with pytest.raises(error):
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


LABELS = [[("f", "positive"), ("f", "negative"), ("g", "positive")]] * 5


def run_verb(model, verb: str, out):
    """capture or reduce of PROMPTS in 3 batches (2, 2, 1), written to `out`."""
    if verb == "capture":
        return qktrace.capture(
            model, PROMPTS, "1.0,0.3", keys=KEYS, batch_size=2, out=out, progress=False
        )
    return qktrace.reduce(
        model, PROMPTS, "1.0,0.3", LABELS, keys=KEYS, batch_size=2, out=out, progress=False
    )


def without_date(ds: xr.Dataset) -> xr.Dataset:
    ds = ds.copy()
    ds.attrs = {k: v for k, v in ds.attrs.items() if k != "date"}
    return ds


@pytest.mark.parametrize("verb", ["capture", "reduce"])
@pytest.mark.parametrize("fail", [sigint, crash], ids=["sigint", "error"])
def test_killed_after_batch_k_resumes_to_the_uninterrupted_store(
    llama, tmp_path, monkeypatch, verb, fail
):
    """Killed in batch 3 (after batches 1-2 completed), resumed: the store is the same store."""
    module, name = (
        (qk_module, "_capture_batch") if verb == "capture" else (sums_module, "_reduce_batch")
    )
    run_verb(llama, verb, tmp_path / "whole.zarr")
    with monkeypatch.context() as m:
        counting(m, module, name, fail_at=3, fail=fail)
        with pytest.raises(KeyboardInterrupt if fail is sigint else RuntimeError):
            run_verb(llama, verb, tmp_path / "run.zarr")
    calls = counting(monkeypatch, module, name)
    run_verb(llama, verb, tmp_path / "run.zarr")
    assert len(calls) == 1  # only batch 3 ran again: nothing lost, nothing recomputed twice
    resumed = store.open(tmp_path / "run.zarr").load()
    whole = store.open(tmp_path / "whole.zarr").load()
    xr.testing.assert_identical(without_date(resumed), without_date(whole))
