"""Remote faults: transient failures are retried with backoff, then fail with a resume hint.

The injected failing backend is nnsight's own NDIF simulation (`remote="local"`,
`LocalSimulationBackend`) made to raise `RemoteError` (a job the server reports failed or timed
out) for a chosen set of requests. Every verb that sends requests (capture, reduce, intervene,
find_heads) and a whole study are run through it.
"""

import importlib.abc
import sys

import httpx
import nnsight
import numpy as np
import pytest
import torch
import websocket
import xarray as xr
from nnsight.intervention.backends.local import LocalSimulationBackend
from nnsight.intervention.backends.remote import RemoteError

import qktrace.model.loading as models_module
import qktrace.model.remote as remote_module
import qktrace.model.testing as testing
from qktrace.model.loading import load
from qktrace.store import io as store
from qktrace.studies import order_id
from qktrace.verbs.answers import intervene_answers
from qktrace.verbs.capture import capture
from qktrace.verbs.find_heads import find_heads
from qktrace.verbs.intervene import intervene
from qktrace.verbs.reduce import reduce
from tests.conftest import tiny

PROMPTS = ["The apple is in Box A", "Which box is the cat in? Box", "the ship is in Box C"]


@pytest.fixture
def flaky_backend(monkeypatch):
    """Make the simulated NDIF backend fail its first `n` requests."""
    state = {"fail": 0, "calls": 0, "ok_first": None, "waits": []}
    real = LocalSimulationBackend.__call__

    def call(self, tracer):
        state["calls"] += 1
        if state["ok_first"] is not None:  # the first `ok_first` requests succeed, no others
            if state["calls"] > state["ok_first"]:
                raise RemoteError("simulated: job timed out on the server")
        elif state["fail"] > 0:
            state["fail"] -= 1
            raise RemoteError("simulated: job timed out on the server")
        return real(self, tracer)

    monkeypatch.setattr(LocalSimulationBackend, "__call__", call)
    monkeypatch.setattr(remote_module.time, "sleep", state["waits"].append)
    return state


def test_transient_failures_are_retried(flaky_backend):
    net, tok = tiny("llama")
    m = load(net, tokenizer=tok, remote="local")
    clean = capture(m, PROMPTS, "1.0", progress=False)
    flaky_backend["fail"] = 2
    flaky_backend["calls"] = 0
    retried = capture(m, PROMPTS, "1.0", progress=False)
    assert flaky_backend["calls"] == 3  # one batch: two failures, then success
    assert flaky_backend["waits"] == [1.0, 2.0]  # exponential backoff between the attempts
    np.testing.assert_array_equal(retried.q.values, clean.q.values)


def test_intervene_and_find_heads_retry_then_stop_clearly(flaky_backend):
    net, tok = tiny("llama")
    m = load(net, tokenizer=tok, remote="local")
    kw = dict(orig=[1, 2, 1], target=[2, 3, 3], n_random=1, seed=0, progress=False)
    basis = np.eye(16)[:, :4]
    clean = intervene(m, PROMPTS, "1.1", basis, **kw)
    flaky_backend.update(fail=1, calls=0)
    retried = intervene(m, PROMPTS, "1.1", basis, **kw)
    assert flaky_backend["calls"] == 2
    xr.testing.assert_identical(retried.drop_attrs(), clean.drop_attrs())

    keys = [[1, 2], [2, 3], [1, 3]]
    clean = find_heads(m, PROMPTS, [2, 3, 3], keys=keys, top=None, progress=False)
    flaky_backend.update(fail=3, calls=0)
    retried = find_heads(m, PROMPTS, [2, 3, 3], keys=keys, top=None, progress=False)
    assert flaky_backend["calls"] == 4
    xr.testing.assert_identical(retried.drop_attrs(), clean.drop_attrs())

    flaky_backend.update(fail=10**6, calls=0)
    with pytest.raises(RuntimeError, match=r"prompts 0\.\.2 failed 4 times.*intervene keeps no"):
        intervene(m, PROMPTS, "1.1", basis, **kw)
    assert flaky_backend["calls"] == 4  # bounded
    with pytest.raises(RuntimeError, match=r"failed 4 times.*find_heads keeps no.*--heads"):
        find_heads(m, PROMPTS, [2, 3, 3], keys=keys, progress=False)


def test_study_stops_after_saved_batches_and_resumes(flaky_backend, tmp_path, monkeypatch):
    """A --remote-local study whose requests fail from batch 2 on: it stops with batch 1 saved,
    says how to resume, and the rerun equals a run that never failed."""
    monkeypatch.setattr(
        "qktrace.verbs.reduce.STUDY_REMOTE_BATCHES_PER_REQUEST", 1
    )  # one batch a request
    checkpoint = testing.save_checkpoint(tmp_path / "tiny-llama", "llama")
    run = dict(
        heads="1.0", n_prompts=6, n_test=2, n_pairs=3, n_random=1, batch_size=3,
        figures=False, progress=False, remote="local",
    )  # fmt: skip
    whole = store.open(order_id.run(checkpoint, out=tmp_path / "whole", **run)).load()
    flaky_backend.update(ok_first=1, calls=0)  # the first reduce batch gets through
    with pytest.raises(
        RuntimeError, match=r"prompts 3\.\.5 failed 4 times.*saved in .*order_id\.sums\.zarr.*rerun"
    ):
        order_id.run(checkpoint, out=tmp_path / "run", **run)
    assert flaky_backend["calls"] == 5  # 1 good request, then 4 attempts: bounded
    assert store.open(tmp_path / "run" / "order_id.sums.zarr").attrs["n_prompts"] == 3
    flaky_backend.update(ok_first=None, calls=0)
    resumed = store.open(order_id.run(checkpoint, out=tmp_path / "run", **run)).load()
    assert resumed.attrs.pop("date") and whole.attrs.pop("date")
    xr.testing.assert_identical(resumed, whole)


def test_persistent_failure_stops_with_saved_batches_and_resume_hint(flaky_backend, tmp_path):
    net, tok = tiny("llama")
    m = load(net, tokenizer=tok, remote="local")
    keys = [[1, 2]] * 3
    labels = [[("a", "positive"), ("a", "negative")]] * 3
    out = tmp_path / "sums.zarr"
    one = {"batch_size": 1, "batches_per_request": 1, "progress": False}
    whole = reduce(m, PROMPTS, "1.0", labels, keys=keys, **one)

    flaky_backend["fail"] = 10**6
    real = remote_module.with_retries

    def first_batch_gets_through(run, *args, **kwargs):
        if kwargs["what"] == "prompts 0..0":
            flaky_backend["fail"] = 0
        else:
            flaky_backend["fail"] = 10**6
        return real(run, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        import qktrace.run.batching as batching_module  # the verbs' one loop retries

        mp.setattr(batching_module, "with_retries", first_batch_gets_through)
        with pytest.raises(RuntimeError, match=r"prompts 1\.\.1 failed 4 times.*saved in .*rerun"):
            reduce(m, PROMPTS, "1.0", labels, keys=keys, out=out, **one)
    flaky_backend["fail"] = 0
    resumed = reduce(m, PROMPTS, "1.0", labels, keys=keys, out=out, **one)
    np.testing.assert_allclose(resumed.qk_sum.values, whole.qk_sum.values, rtol=1e-12)


def test_errors_in_the_request_are_not_retried(flaky_backend, monkeypatch):
    calls = {"n": 0}

    def broken():
        calls["n"] += 1
        raise ValueError("bad position")

    with pytest.raises(ValueError, match="bad position"):
        remote_module.with_retries(broken, what="prompts 0..1")
    assert calls["n"] == 1


def http_error(status: int) -> RemoteError:
    """The RemoteError nnsight raises when NDIF answers a request with HTTP `status`."""
    request = httpx.Request("POST", "https://ndif.example/request")
    response = httpx.Response(status, request=request)
    cause = httpx.HTTPStatusError(f"{status}", request=request, response=response)
    try:
        raise RemoteError(f"Failed to send request: {status}") from cause
    except RemoteError as error:
        return error


@pytest.mark.parametrize(
    "error, retried",
    [
        (websocket.WebSocketConnectionClosedException("socket dropped"), True),
        (websocket.WebSocketTimeoutException("read timed out"), True),
        (httpx.ReadTimeout("read timed out"), True),
        (TimeoutError("timed out"), True),
        (RemoteError("job timed out on the server"), True),
        (http_error(503), True),
        (http_error(429), True),
        (websocket.WebSocketBadStatusException("Handshake status %d %s", 503, "Busy"), True),
        (websocket.WebSocketBadStatusException("Handshake status %d %s", 401, "No"), False),
        (http_error(401), False),  # a rejected key: retrying cannot help
        (http_error(400), False),
    ],
    ids=["ws-closed", "ws-timeout", "http-timeout", "timeout", "job-failed", "503", "429",
         "ws-503", "ws-401", "401", "400"],
)  # fmt: skip
def test_which_failures_are_retried(error, retried):
    calls = []

    def fails():
        calls.append(1)
        raise error

    with pytest.raises(RuntimeError if retried else type(error)):
        remote_module.with_retries(fails, what="x", attempts=3, sleep=lambda s: None)
    assert len(calls) == (3 if retried else 1)


# NDIF's answers to a request it would refuse again as it is (ndif 0.1.2's model actor: its
# execution timeout's message, and the last line of the traceback of a request that ran out of
# the replica's memory, on a GPU or on CPU), and a proxy's HTTP 413
OOM_TRACEBACK = (
    'Traceback (most recent call last):\n  File "<nnsight>", line 3, in <module>\n'
    "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total "
    "capacity of 79.15 GiB of which 1.2 GiB is free."
)
CPU_OOM = (
    "RuntimeError: [enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't "
    "allocate memory: you tried to allocate 1099511627776 bytes. Error code 12"
)


@pytest.mark.parametrize(
    "error, why",
    [
        (RemoteError("Your job exceeded the execution timeout of 30.0s."),
         "ran longer than the server allows one request"),
        (RemoteError(OOM_TRACEBACK), "was too large for the server"),
        (RemoteError(CPU_OOM), "was too large for the server"),
        (http_error(413), "was too large for the server"),
    ],
    ids=["timeout", "cuda-oom", "cpu-oom", "413"],
)  # fmt: skip
def test_refused_requests_stop_at_once_with_the_fix(error, why):
    """A request NDIF would refuse again (too large, past its time limit) is not retried: one
    attempt, then `RequestRefused` (a `RemoteFailed`) naming the prompts, why and the fix."""
    from qktrace.core.errors import RemoteFailed, RequestRefused

    calls = []

    def fails():
        calls.append(1)
        raise error

    hint = "Batches before prompt 4 are saved in out: rerun the same call to resume."
    with pytest.raises(RequestRefused) as info:
        remote_module.with_retries(
            fails, what="prompts 4..7", resume_hint=hint, sleep=lambda s: pytest.fail("retried")
        )
    assert len(calls) == 1 and not remote_module.is_transient(error)
    message = str(info.value)
    assert message.startswith(f"NDIF refused the request for prompts 4..7: it {why}")
    assert "not retried" in message and "smaller --batch-size" in message
    assert message.endswith(hint) and isinstance(info.value, RemoteFailed)
    assert info.value.__cause__ is error
    if why.startswith("ran longer"):
        assert "the server said: 'Your job exceeded the execution timeout of 30.0s.'" in message
    elif "torch.OutOfMemoryError" in str(error):  # a traceback: its last line, not all of it
        assert "the server said: 'torch.OutOfMemoryError: CUDA out of memory." in message
        assert "Traceback" not in message


@pytest.fixture
def ndif_key_set(monkeypatch):
    """A key in the environment, NDIF's /whoami stubbed, and loading any model forbidden."""
    monkeypatch.setenv("NDIF_API_KEY", "not-a-real-key")
    monkeypatch.setattr(nnsight.CONFIG.API, "APIKEY", None)
    monkeypatch.delenv("QKTRACE_SKIP_NDIF_CHECK", raising=False)

    def no_work(*args, **kwargs):
        raise AssertionError("a model was loaded before the key was checked")

    monkeypatch.setattr(models_module.nnsight, "TransformersModel", no_work)
    import transformers

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", no_work)


def whoami_raises(status: int):
    def whoami(*args, **kwargs):
        request = httpx.Request("GET", "https://ndif.example/whoami")
        response = httpx.Response(status, request=request)
        raise httpx.HTTPStatusError(f"{status}", request=request, response=response)

    return whoami


def whoami_unreachable(*args, **kwargs):
    raise httpx.ConnectError("name or service not known")


@pytest.mark.parametrize(
    "whoami, message",
    [
        (lambda *a, **k: {"email": None, "tags": []},
         r"NDIF did not accept the API key in NDIF_API_KEY \(for meta-llama/Llama-3\.1-8B-Instruct"
         r"\)\. Check the key at https://login\.ndif\.us"),
        (whoami_raises(401), r"NDIF rejected the API key in NDIF_API_KEY \(HTTP 401, .*Check the"
         r" key at https://login\.ndif\.us and export it again; no work was started"),
        (whoami_raises(403), r"rejected the API key .*HTTP 403"),
        (whoami_unreachable, r"NDIF at \S+ is unreachable \(name or service not known\)\. Check "
         r"your network .*--remote-local"),
    ],
    ids=["unknown-key", "401", "403", "unreachable"],
)  # fmt: skip
def test_rejected_key_or_no_service_errors_before_any_work(
    ndif_key_set, monkeypatch, whoami, message
):
    from nnsight import ndif

    monkeypatch.setattr(ndif, "whoami", whoami)
    with pytest.raises(RuntimeError, match=message):
        load("meta-llama/Llama-3.1-8B-Instruct", remote=True)


def test_accepted_key_goes_on_to_load(ndif_key_set, monkeypatch):
    from nnsight import ndif

    monkeypatch.setattr(ndif, "whoami", lambda *a, **k: {"email": "me@example.org"})
    with pytest.raises(AssertionError, match="a model was loaded"):  # past the check: loading
        load("meta-llama/Llama-3.1-8B-Instruct", remote=True)
    assert nnsight.CONFIG.API.APIKEY == "not-a-real-key"


def test_backoff_grows(monkeypatch):
    waits = []

    def always_down():
        raise ConnectionError("down")

    with pytest.raises(RuntimeError, match="failed 3 times"):
        remote_module.with_retries(
            always_down, what="x", attempts=3, backoff=2.0, sleep=waits.append
        )
    assert waits == [1.0, 2.0]


def assert_attention_recomputes(m, ds, atol):
    """The reported attention of the last query = softmax of its q against every captured k."""
    layer = int(ds["layer"].values[0])
    q = ds.q.values[0, 0, 0].astype(np.float64)
    k = ds.k.values[0, 0].astype(np.float64)  # [tokens, d_head]: keys="all", one prompt
    logits = k @ q * m.scaling(layer)
    e = np.exp(logits - logits.max())
    np.testing.assert_allclose(ds.attention.values[0, 0, 0], e / e.sum(), atol=atol)


def test_the_ndif_check_runs_offline_on_the_simulated_request():
    net, tok = tiny("llama")
    m = load(net, tokenizer=tok, remote="local")
    ds = capture(m, ["The cat sat on the mat."], "1.3", keys="all", progress=False)
    assert int(ds.kv_head.values[0]) == 1
    assert_attention_recomputes(m, ds, atol=1e-5)


@pytest.mark.ndif
@pytest.mark.skipif(
    not __import__("os").environ.get("NDIF_API_KEY"), reason="needs NDIF_API_KEY and network"
)
def test_real_ndif_capture_matches_shapes():
    m = load("meta-llama/Llama-3.1-8B-Instruct", remote=True)
    assert (m.n_layers, m.n_heads, m.n_kv_heads, m.d_head) == (32, 32, 8, 128)
    ds = capture(m, ["The cat sat on the mat."], "16.19", keys="all", progress=False)
    assert ds.q.shape == (1, 1, 1, 128) and ds.k.shape[-1] == 128
    assert int(ds.kv_head.values[0]) == 19 // 4  # GQA: 4 query heads per key head
    assert_attention_recomputes(m, ds, atol=1e-3)  # the server may run in bfloat16


class _NoQktrace(importlib.abc.MetaPathFinder):
    """Refuses to import qktrace: what an NDIF server, which does not have it, would do."""

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] == "qktrace":
            raise ModuleNotFoundError(f"No module named {name!r} (not on the server)")
        return None


@pytest.fixture
def server_without_qktrace(monkeypatch):
    """`remote="local"` with qktrace hidden while the request is deserialized, as on NDIF.

    nnsight's simulation hides modules outside site-packages, but an installed (or editable)
    qktrace is found again on import; here it is not. So a trace body that holds a qktrace
    object other than `qktrace.core.ops` (shipped by value) fails here as it would on the server.
    """
    blocker = _NoQktrace()
    real_hide, real_restore = (
        LocalSimulationBackend._hide_local_modules,
        LocalSimulationBackend._restore,
    )

    def hide(self):
        hidden = real_hide(self)
        for name in [n for n in sys.modules if n.split(".")[0] == "qktrace"]:
            hidden["modules"][name] = sys.modules.pop(name)
        sys.meta_path.insert(0, blocker)
        return hidden

    def restore(self, hidden):
        sys.meta_path.remove(blocker)
        real_restore(self, hidden)

    monkeypatch.setattr(LocalSimulationBackend, "_hide_local_modules", hide)
    monkeypatch.setattr(LocalSimulationBackend, "_restore", restore)


def test_every_verb_runs_on_a_server_without_qktrace(server_without_qktrace):
    """Trace bodies hold only torch, nnsight envoys and `qktrace.core.ops` objects (NDIF-safe)."""
    net, tok = tiny("llama")
    m = load(net, tokenizer=tok, remote="local")
    local = load(net, tokenizer=tok)
    with pytest.raises(ModuleNotFoundError, match="not on the server"):  # the fixture bites
        with torch.inference_mode(), m.trace("The cat"):
            nnsight.save(m.attention(0).output)  # `m` is a qktrace object
    keys = [[1, 2], [2, 3], [1, 3]]
    labels = [[("a", "positive"), ("a", "negative")]] * 3
    basis = np.eye(16)[:, :4]
    runs = {
        "capture": lambda mm: capture(mm, PROMPTS, "1.0,0.2", progress=False),
        "reduce": lambda mm: reduce(
            mm, PROMPTS, "1.0", labels, keys=keys, batch_size=1, batches_per_request=2,
            progress=False,
        ),
        "find_heads": lambda mm: find_heads(mm, PROMPTS, [2, 3, 3], keys=keys, top=None,
                                            progress=False),
        "intervene": lambda mm: intervene(mm, PROMPTS, "1.1", basis, orig=[1, 2, 1],
                                          target=[2, 3, 3], n_random=1, progress=False),
        "intervene_answers": lambda mm: intervene_answers(
            mm, PROMPTS, {"1.1": basis}, candidates=[[5, 6]] * 3, answer=[0] * 3,
            target_answer=[1] * 3, orig=[1, 2, 1], target=[2, 3, 3], n_random=1,
            progress=False,
        ),
    }  # fmt: skip
    for verb, run in runs.items():
        remote_ds, local_ds = run(m), run(local)
        for name in local_ds.data_vars:
            np.testing.assert_allclose(
                remote_ds[name].values, local_ds[name].values, rtol=1e-5, err_msg=verb
            )
