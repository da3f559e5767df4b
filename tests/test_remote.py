"""Remote faults: transient failures are retried with backoff, then fail with a resume hint."""

import numpy as np
import pytest
from nnsight.intervention.backends.local import LocalSimulationBackend
from nnsight.intervention.backends.remote import RemoteError

import qktrace.remote as remote_module
from qktrace.models import load
from qktrace.qk import capture
from qktrace.sums import reduce
from tests.conftest import tiny

PROMPTS = ["The apple is in Box A", "Which box is the cat in? Box", "the ship is in Box C"]


@pytest.fixture
def flaky_backend(monkeypatch):
    """Make the simulated NDIF backend fail its first `n` requests."""
    state = {"fail": 0, "calls": 0}
    real = LocalSimulationBackend.__call__

    def call(self, tracer):
        state["calls"] += 1
        if state["fail"] > 0:
            state["fail"] -= 1
            raise RemoteError("simulated: job timed out on the server")
        return real(self, tracer)

    monkeypatch.setattr(LocalSimulationBackend, "__call__", call)
    monkeypatch.setattr(remote_module.time, "sleep", lambda s: None)
    return state


def test_transient_failures_are_retried(flaky_backend):
    net, tok = tiny("llama")
    m = load(net, tokenizer=tok, remote="local")
    clean = capture(m, PROMPTS, "1.0", progress=False)
    flaky_backend["fail"] = 2
    flaky_backend["calls"] = 0
    retried = capture(m, PROMPTS, "1.0", progress=False)
    assert flaky_backend["calls"] == 3  # one batch: two failures, then success
    np.testing.assert_array_equal(retried.q.values, clean.q.values)


def test_persistent_failure_stops_with_saved_batches_and_resume_hint(flaky_backend, tmp_path):
    net, tok = tiny("llama")
    m = load(net, tokenizer=tok, remote="local")
    keys = [[1, 2]] * 3
    labels = [[("a", "positive"), ("a", "negative")]] * 3
    out = tmp_path / "sums.zarr"
    whole = reduce(m, PROMPTS, "1.0", labels, keys=keys, batch_size=1, progress=False)

    flaky_backend["fail"] = 10**6
    real = remote_module.with_retries

    def first_batch_gets_through(run, *args, **kwargs):
        if kwargs["what"] == "prompts 0..0":
            flaky_backend["fail"] = 0
        else:
            flaky_backend["fail"] = 10**6
        return real(run, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        import qktrace.sums as reduce_module

        mp.setattr(reduce_module, "with_retries", first_batch_gets_through)
        with pytest.raises(RuntimeError, match=r"prompts 1\.\.1 failed 4 times.*saved in .*rerun"):
            reduce(m, PROMPTS, "1.0", labels, keys=keys, batch_size=1, out=out, progress=False)
    flaky_backend["fail"] = 0
    resumed = reduce(m, PROMPTS, "1.0", labels, keys=keys, batch_size=1, out=out, progress=False)
    np.testing.assert_allclose(resumed.qk_sum.values, whole.qk_sum.values, rtol=1e-12)


def test_errors_in_the_request_are_not_retried(flaky_backend, monkeypatch):
    calls = {"n": 0}

    def broken():
        calls["n"] += 1
        raise ValueError("bad position")

    with pytest.raises(ValueError, match="bad position"):
        remote_module.with_retries(broken, what="prompts 0..1")
    assert calls["n"] == 1


def test_backoff_grows(monkeypatch):
    waits = []

    def always_down():
        raise ConnectionError("down")

    with pytest.raises(RuntimeError, match="failed 3 times"):
        remote_module.with_retries(
            always_down, what="x", attempts=3, backoff=2.0, sleep=waits.append
        )
    assert waits == [1.0, 2.0]


@pytest.mark.ndif
@pytest.mark.skipif(
    not __import__("os").environ.get("NDIF_API_KEY"), reason="needs NDIF_API_KEY and network"
)
def test_real_ndif_capture_matches_shapes():
    m = load("meta-llama/Llama-3.1-8B-Instruct", remote=True)
    ds = capture(m, ["The cat sat on the mat."], "16.19", progress=False)
    assert ds.q.shape == (1, 1, 1, 128)
