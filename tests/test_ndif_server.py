"""qktrace's remote path (remote=True) against a real NDIF server on 127.0.0.1.

The session fixture starts NDIF 0.1.2 (`qktrace.ndif_local`: redis, an S3 store, Ray, NDIF's
controller and API, SmolLM2-135M-Instruct on CPU) and stops it after the last test. Selected
with ``-m ndif_server``; skipped when the server venv is not installed
(``python -m qktrace.ndif_local install``).

Tolerance: the server and this process run the same float32 CPU kernels on the same weights
(the same converted checkpoint, same torch and transformers), but in different processes with
different thread counts and batch layouts, so sums may be reordered: q, k and sums agree to
~1e-6 relative (capture measured 0.0 difference). The tests allow rtol 1e-5 and atol 1e-5:
logit differences (the answer effects) subtract logits of size ~20, whose float32 rounding
(~2e-6 each) is all they differ by (measured 5.7e-6). A wrong head, position, prompt or batch
is off by orders of magnitude more.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from qktrace.ndif_local import install, model_cache
from qktrace.ndif_local.server import LocalNDIF
from qktrace.store import io as store

pytestmark = pytest.mark.ndif_server

HUB_ID = model_cache.HUB_ID
HEADS = "17.3,18.6"
PROMPTS = [
    "The apple is in Box A, the pen is in Box B. Which box is the apple in? Box",
    "The cat is in Box C, the key is in Box D. Which box is the key in? Box",
    "The ship is in Box E, the cup is in Box F. Which box is the cup in? Box",
    "The hat is in Box G, the map is in Box H. Which box is the hat in? Box",
]
# The server's model actor runs torch on 1 CPU thread, the client on 2: float32 reductions round
# in another order, so values differ by float32 rounding of the largest values they are summed
# from (measured: at most 3e-6 of a variable's largest magnitude, ΔC and PCs of gender agreement)
RTOL, ATOL, ATOL_OF_SCALE = 1e-5, 1e-5, 1e-5


def interrupt(signum, frame):
    raise KeyboardInterrupt


@pytest.fixture(scope="session")
def ndif(tmp_path_factory):
    """A running local NDIF; the client pointed at it (NDIF_HOST) and at its offline cache."""
    if not install.installed():
        pytest.skip(
            f"no local NDIF server venv in {install.venv()}: run "
            "`python -m qktrace.ndif_local install` (as .ci/run does)"
        )
    import huggingface_hub.constants as hub

    # results over 4 KiB come back through the object store, as large models' results do
    server = LocalNDIF(run_dir=tmp_path_factory.mktemp("ndif-run"), inline_limit=4096)
    # a CI job cancelled with SIGTERM unwinds like Ctrl-C, through the teardown below
    previous = signal.signal(signal.SIGTERM, interrupt)
    host = server.start(log=lambda line: None)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NDIF_HOST", host)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_HUB_CACHE", str(model_cache.hub_cache(server.hf_home)))
        mp.setattr(hub, "HF_HUB_CACHE", str(model_cache.hub_cache(server.hf_home)))
        mp.setattr(hub, "HF_HUB_OFFLINE", True)
        try:
            yield server
        finally:
            server.stop()
            signal.signal(signal.SIGTERM, previous)
    assert server.pids() == [], "the server left processes running"


@pytest.fixture(scope="session")
def models(ndif):
    """SmolLM2 on the server (remote=True) and the same checkpoint here (remote=False)."""
    import qktrace

    return qktrace.load(HUB_ID, remote=True), qktrace.load(HUB_ID, remote=False)


def assert_close(remote: xr.Dataset, local: xr.Dataset) -> None:
    """Same variables, coordinates and (within the tolerance) values."""
    assert set(remote.data_vars) == set(local.data_vars)
    for name in local.data_vars:
        a, b = remote[name], local[name]
        assert a.dims == b.dims and a.shape == b.shape, name
        if np.issubdtype(b.dtype, np.number):
            scale = float(np.nanmax(np.abs(b.values), initial=0.0))
            atol = max(ATOL, ATOL_OF_SCALE * scale)
            np.testing.assert_allclose(a.values, b.values, rtol=RTOL, atol=atol, err_msg=name)
        else:
            np.testing.assert_array_equal(a.values, b.values, err_msg=name)
    for name in local.coords:
        np.testing.assert_array_equal(remote[name].values, local[name].values, err_msg=name)


def test_every_process_talks_to_loopback_only(ndif):
    """The server's processes listen on, and connect to, 127.0.0.1 only (`ss -tnpa`)."""
    import subprocess

    ours = {f"pid={pid}," for pid in ndif.pids()}
    table = subprocess.run(["ss", "-tnpa"], capture_output=True, text=True, check=True).stdout
    sockets = [line.split() for line in table.splitlines()[1:]]
    sockets = [s for s in sockets if len(s) >= 6 and any(p in s[5] for p in ours)]
    assert len(sockets) > 5  # redis, S3, Ray, the API ... were all found

    def host(address: str) -> str:
        return address.rsplit(":", 1)[0].strip("[]").removeprefix("::ffff:")

    for state, _, _, local, peer, process in sockets:
        assert host(local) == "127.0.0.1", f"bound beyond loopback: {state} {local} {process}"
        if state != "LISTEN":
            assert host(peer) == "127.0.0.1", f"talks beyond loopback: {local} -> {peer} {process}"


def test_load_names_the_model_without_the_hub(models):
    remote, _ = models
    assert remote.remote is True and remote.name == HUB_ID
    assert f'"repo_id": "{HUB_ID}"' in remote.lm.to_model_key()


def test_capture_equals_local(models):
    from qktrace.verbs.capture import capture

    remote, local = models
    assert_close(
        capture(remote, PROMPTS, HEADS, batch_size=2, progress=False),
        capture(local, PROMPTS, HEADS, batch_size=2, progress=False),
    )


@pytest.mark.parametrize("batches_per_request", [None, 2], ids=["trace", "session"])
@pytest.mark.parametrize("delta", [False, True], ids=["sums", "delta"])
def test_reduce_equals_local(models, batches_per_request, delta):
    from qktrace.verbs.reduce import reduce

    remote, local = models
    keys = [[5, 12]] * len(PROMPTS)
    labels = [[("box", "positive"), ("box", "negative")]] * len(PROMPTS)
    run = dict(keys=keys, batch_size=1, progress=False, delta=delta)
    got = reduce(remote, PROMPTS, HEADS, labels, batches_per_request=batches_per_request, **run)
    assert_close(got, reduce(local, PROMPTS, HEADS, labels, **run))


def test_find_heads_intervene_and_answers_equal_local(models):
    from qktrace.verbs.answers import intervene_answers
    from qktrace.verbs.find_heads import find_heads
    from qktrace.verbs.intervene import intervene

    remote, local = models
    keys = [[5, 12]] * len(PROMPTS)
    basis = np.eye(remote.d_head)[:, :4]
    box = [remote.tokenizer.encode(f" {c}", add_special_tokens=False)[0] for c in "AB"]
    runs = {
        "find_heads": lambda m: find_heads(
            m, PROMPTS, [5, 12, 12, 5], keys=keys, layers=[17, 18], top=None, progress=False
        ),
        "intervene": lambda m: intervene(
            m, PROMPTS, "17.3", basis, orig=[5] * 4, target=[12] * 4, n_random=1,
            progress=False,
        ),
        "intervene_answers": lambda m: intervene_answers(
            m, PROMPTS, {"17.3": basis}, candidates=[box] * 4, answer=[0] * 4,
            target_answer=[1] * 4, orig=[5] * 4, target=[12] * 4, n_random=1,
            progress=False,
        ),
    }  # fmt: skip
    for verb, run in runs.items():
        got, expected = run(remote), run(local)
        assert_close(got.drop_attrs(), expected.drop_attrs())
        assert got.sizes == expected.sizes, verb


def test_eval_equals_local(models):
    from qktrace.verbs.evaluate import evaluate

    remote, local = models
    run = dict(n=4, pairs=(2,), batch_size=4, progress=False)
    assert_close(evaluate(remote, **run), evaluate(local, **run))


# ---- a study end to end through the CLI, and faults in the middle of one -----------------------

STUDY = [
    "study", "order-id", "-m", HUB_ID, "--heads", "17.3", "--n-prompts", "8", "--n-test", "4",
    "--n-pairs", "3", "--n-random", "1", "--n-random-answers", "1", "--batch-size", "4",
    "--no-figures", "--quiet",
]  # fmt: skip


def run_cli(args: list[str]):
    from typer.testing import CliRunner

    from qktrace.cli import app

    return CliRunner().invoke(app, args)


def study_store(out: Path) -> xr.Dataset:
    ds = store.open(out / "order_id.zarr").load()
    ds.attrs.pop("date", None)
    return ds


@pytest.fixture(scope="session")
def one_batch_a_request():
    """Studies send one batch a request, so a study makes several requests to interrupt."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("qktrace.verbs.reduce.STUDY_REMOTE_BATCHES_PER_REQUEST", 1)
        yield


@pytest.fixture(scope="session")
def remote_study(ndif, one_batch_a_request, tmp_path_factory) -> xr.Dataset:
    """The study on the server, uninterrupted."""
    out = tmp_path_factory.mktemp("study-remote")
    result = run_cli([*STUDY, "--remote", "-o", str(out)])
    assert result.exit_code == 0, result.output
    return study_store(out)


def test_study_through_the_cli_equals_local(ndif, remote_study, tmp_path):
    result = run_cli([*STUDY, "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    local = study_store(tmp_path)
    # a remote study reduces its fresh pass and pairs in the trace (docs/guide/design.md):
    # it keeps no per-prompt q, k or qk_sum; everything else is the same
    assert set(local.data_vars) - set(remote_study.data_vars) == {"q", "k", "qk_sum"}
    assert_close(remote_study, local[list(remote_study.data_vars)])


# the other studies and the example study file, each through the CLI on the server and locally;
# small runs: the point is the remote path of each study's passes, not its findings
OTHER_STUDIES = {
    "filter_heads": ["filter-heads", "--n-prompts", "12", "--n-test", "6"],
    "lexical": ["lexical", "--n-prompts", "8", "--n-test", "4", "--n-pairs", "3"],
    "gender_agreement": [str(Path(__file__).parents[1] / "examples" / "gender_agreement.py"),
                         "--n-prompts", "8", "--n-test", "4"],
}  # fmt: skip
# what a remote study may leave out: the per-prompt q, k and q·k that it reduces in the trace
REDUCED_IN_TRACE = {"q", "k", "qk_sum"}


@pytest.mark.parametrize("name", list(OTHER_STUDIES))
def test_other_studies_and_the_example_equal_local(ndif, name, tmp_path):
    args = [
        "study", *OTHER_STUDIES[name], "-m", HUB_ID, "--heads", "17.3", "--n-random", "1",
        "--n-random-answers", "1", "--batch-size", "4", "--no-figures", "--quiet",
    ]  # fmt: skip
    stores = {}
    for where, flags in (("remote", ["--remote"]), ("local", [])):
        out = tmp_path / where
        result = run_cli([*args, *flags, "-o", str(out)])
        assert result.exit_code == 0, result.output
        stores[where] = store.open(out / f"{name}.zarr").load()
        stores[where].attrs.pop("date", None)
    remote, local = stores["remote"], stores["local"]
    assert set(local.data_vars) - set(remote.data_vars) <= REDUCED_IN_TRACE
    assert set(remote.data_vars) <= set(local.data_vars)
    # lexical's order sums: a remote run reduces them to ΔC in the trace, so its C+ and C- sums
    # (qk_sum) are NaN where the local run has them (studies/lexical.py); compare the rest
    for name in REDUCED_IN_TRACE & set(remote.data_vars):
        reduced = np.isnan(remote[name]) & ~np.isnan(local[name])
        if reduced.any():
            where = reduced.any([d for d in reduced.dims if d != "feature"])
            assert name == "qk_sum" and list(reduced["feature"][where].values) == ["order"]
        local[name] = local[name].where(~reduced)
    assert_close(remote, local[list(remote.data_vars)])


def kill_during_next_request(monkeypatch, after: int, fault) -> dict:
    """Run `fault()` 0.3 s into request number `after` (while it is in flight), once."""
    import threading

    import qktrace.run.batching as batching

    real = batching.with_retries
    state = {"requests": 0, "fired": False}

    def with_fault(run, *args, **kwargs):
        state["requests"] += 1
        if state["requests"] == after and not state["fired"]:
            state["fired"] = True
            threading.Timer(0.3, fault).start()
        return real(run, *args, **kwargs)

    monkeypatch.setattr(batching, "with_retries", with_fault)
    return state


def test_api_killed_mid_study_stops_clearly_and_the_rerun_resumes(
    ndif, remote_study, tmp_path, monkeypatch
):
    """The API dies during a request: bounded retries, then a clear error naming what was kept;
    after the API is back, the same command finishes with the uninterrupted run's store."""
    from qktrace.core.errors import RemoteFailed

    monkeypatch.setattr(
        "qktrace.model.remote.time.sleep", lambda s: None
    )  # retries meet a dead API
    state = kill_during_next_request(monkeypatch, 2, lambda: ndif.kill_service("api"))
    failed = run_cli([*STUDY, "--remote", "-o", str(tmp_path)])
    assert state["fired"]
    assert failed.exit_code == RemoteFailed.exit_code, failed.output
    assert "failed 4 times" in failed.output and "rerun" in failed.output
    monkeypatch.undo()
    ndif.restart_service("api")
    resumed = run_cli([*STUDY, "--remote", "-o", str(tmp_path)])
    assert resumed.exit_code == 0, resumed.output[-1500:]
    xr.testing.assert_identical(study_store(tmp_path), remote_study)


def model_actor_pid(ndif: LocalNDIF) -> int:
    for pid in ndif.pids():
        try:
            if Path(f"/proc/{pid}/cmdline").read_bytes().startswith(b"ray::CPUModelActor"):
                return pid
        except OSError:
            continue
    raise AssertionError("no model actor running")


def test_model_actor_killed_mid_request_is_retried_or_resumed(
    ndif, remote_study, tmp_path, monkeypatch
):
    """The model actor dies during a request: Ray restarts it; qktrace retries (bounded), and
    either finishes or stops clearly; a rerun then gives the uninterrupted run's store."""
    actor = model_actor_pid(ndif)
    state = kill_during_next_request(monkeypatch, 2, lambda: os.kill(actor, signal.SIGKILL))
    first = run_cli([*STUDY, "--remote", "-o", str(tmp_path)])
    assert state["fired"]
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:  # Ray restarts the actor (a new process)
        try:
            if model_actor_pid(ndif) != actor:
                break
        except AssertionError:
            pass
        time.sleep(1)
    assert model_actor_pid(ndif) != actor
    if first.exit_code != 0:
        assert "failed 4 times" in first.output and "rerun" in first.output, first.output
        monkeypatch.undo()
        rerun = run_cli([*STUDY, "--remote", "-o", str(tmp_path)])
        assert rerun.exit_code == 0, rerun.output
    xr.testing.assert_identical(study_store(tmp_path), remote_study)


def test_object_store_down_mid_study_stops_clearly_and_the_rerun_resumes(
    ndif, remote_study, tmp_path, monkeypatch
):
    """The object store (where results wait for download) dies: a clear error after bounded
    retries; with it back (empty), the same command finishes with the uninterrupted store."""
    monkeypatch.setattr("qktrace.model.remote.time.sleep", lambda s: None)
    state = kill_during_next_request(monkeypatch, 2, lambda: ndif.kill_service("s3"))
    failed = run_cli([*STUDY, "--remote", "-o", str(tmp_path)])
    assert state["fired"]
    assert failed.exit_code != 0 and "rerun" in failed.output, failed.output[-1500:]
    monkeypatch.undo()
    ndif.restart_service("s3")
    resumed = run_cli([*STUDY, "--remote", "-o", str(tmp_path)])
    assert resumed.exit_code == 0, resumed.output[-1500:]
    xr.testing.assert_identical(study_store(tmp_path), remote_study)


def test_a_server_that_is_not_up_fails_at_load_with_the_fix(monkeypatch):
    """NDIF_HOST pointing at nothing: load stops before any work and says how to start one."""
    import nnsight

    import qktrace
    from qktrace.core.errors import RemoteFailed
    from qktrace.ndif_local.server import free_ports

    # load sets nnsight's host from NDIF_HOST: put the server's back for the tests after this one
    monkeypatch.setattr(nnsight.CONFIG.API, "HOST", nnsight.CONFIG.API.HOST)
    monkeypatch.setenv("NDIF_HOST", f"http://127.0.0.1:{free_ports(1)[0]}")
    with pytest.raises(RemoteFailed, match=r"unreachable.*python -m qktrace.ndif_local start"):
        qktrace.load(HUB_ID, remote=True)


def test_two_studies_at_once_both_finish(ndif, remote_study, tmp_path):
    """Two study commands submitted together (two processes): the server queues their requests
    and both stores come out right."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-c", "from qktrace.cli import app; app()", *STUDY, "--remote"]
    runs = [
        subprocess.Popen([*command, "-o", str(tmp_path / name)], cwd=root, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for name in ("first", "second")
    ]  # fmt: skip
    for run in runs:
        output, _ = run.communicate(timeout=600)
        assert run.returncode == 0, output[-1500:]
    first, second = study_store(tmp_path / "first"), study_store(tmp_path / "second")
    xr.testing.assert_identical(first, second)
    assert_close(first.drop_attrs(), remote_study.drop_attrs())


# ---- requests the server refuses ---------------------------------------------------------------
# ndif 0.1.2 refuses a request for its run time only: its model actor races each request against
# the deployment's `execution_timeout_seconds` (none by default) and answers one that runs past
# it with ERROR "Your job exceeded the execution timeout of {T}s.". It has no cap on a request's
# bytes (its API reads any body; a cap is a TODO there), and hands a result back on the
# websocket up to redis's pubsub limit, a larger one through the object store; a request that
# needs more memory than a GPU replica's budget fails in torch (CUDA out of memory), which this
# CPU server cannot show (tests/test_remote.py covers qktrace's side of both).


def test_a_result_past_the_sockets_limit_comes_through_the_object_store(ndif, models, monkeypatch):
    """No refusal for size: a result over the socket's limit (4 KiB on this tier's server) is
    staged in the object store and downloaded (nnsight gets a url, not the bytes)."""
    from nnsight.intervention.backends.remote import RemoteBackend

    from qktrace.qk import capture

    arrived, real = [], RemoteBackend.download_result

    def download_result(self, url):
        arrived.append(url if isinstance(url, str) else len(url))
        return real(self, url)

    monkeypatch.setattr(RemoteBackend, "download_result", download_result)
    remote, local = models
    assert_close(
        capture(remote, PROMPTS, HEADS, batch_size=4, progress=False),
        capture(local, PROMPTS, HEADS, batch_size=4, progress=False),
    )
    store_url = f"http://127.0.0.1:{ndif.state.ports['s3']}/"
    assert len(arrived) == 1 and str(arrived[0]).startswith(store_url), arrived


def test_a_request_past_the_servers_time_limit_stops_at_once_and_the_rerun_resumes(
    ndif, remote_study, tmp_path, monkeypatch
):
    """The server's execution timeout stops the study's second request: qktrace sends it once
    (no retries: it would time out again), stops with `RequestRefused` naming the prompts and
    the fix, and keeps the first request's sums; with the limit lifted, the same command
    resumes from the second request and ends with the uninterrupted run's store."""
    import qktrace.batching as batching
    from qktrace.core.errors import RequestRefused

    real = batching.with_retries
    sent: list[tuple[str, int]] = []  # (what, attempts) per request

    def second_request_past_the_limit(run, *args, what, **kwargs):
        if len(sent) == 1:  # a limit no request meets (NDIF's own timeout, set at deploy)
            ndif.redeploy(execution_timeout=0.01)
        sent.append((what, 0))

        def attempt(*a):
            sent[-1] = (what, sent[-1][1] + 1)
            return run(*a)

        return real(attempt, *args, what=what, **kwargs)

    monkeypatch.setattr(batching, "with_retries", second_request_past_the_limit)
    try:
        failed = run_cli([*STUDY, "--remote", "-o", str(tmp_path)])
    finally:
        if len(sent) > 1:
            ndif.redeploy()  # no limit again, for the rerun and the tests after this one
    assert failed.exit_code == RequestRefused.exit_code, failed.output[-1500:]
    assert sent == [("prompts 0..3", 1), ("prompts 4..7", 1)]  # the refused one: sent once
    message = " ".join(failed.output.split())
    assert (
        "NDIF refused the request for prompts 4..7: it ran longer than the server allows one "
        "request (the server said: 'Your job exceeded the execution timeout of 0.01s.')"
    ) in message, message
    assert "not retried" in message and "smaller --batch-size" in message
    assert "prompts 0..3 are saved" in message and "rerun the same command" in message
    sent.clear()

    def recorded(run, *args, what, **kwargs):
        sent.append((what, 1))
        return real(run, *args, what=what, **kwargs)

    monkeypatch.setattr(batching, "with_retries", recorded)
    resumed = run_cli([*STUDY, "--remote", "-o", str(tmp_path)])
    assert resumed.exit_code == 0, resumed.output[-1500:]
    assert sent[0] == ("prompts 4..7", 1)  # the saved sums were not asked for again
    xr.testing.assert_identical(study_store(tmp_path), remote_study)
