"""qktrace's remote path (remote=True) against a real NDIF server on 127.0.0.1.

The session fixture starts NDIF 0.1.2 (`qktrace.ndif_local`: redis, an S3 store, Ray, NDIF's
controller and API, SmolLM2-135M-Instruct on CPU) and stops it after the last test. Selected
with ``-m ndif_server``; skipped when the server venv is not installed
(``python -m qktrace.ndif_local install``).

Tolerance: the server and this process run the same float32 CPU kernels on the same weights
(the same converted checkpoint, same torch and transformers), but in different processes, with
different thread counts, so sums can be reordered: results agree to ~1e-6 relative. The tests
allow rtol 1e-5 (and atol 1e-6 for values near zero); a wrong head, position, prompt or batch
is off by far more.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from qktrace import store
from qktrace.ndif_local import install, model_cache
from qktrace.ndif_local.server import LocalNDIF

pytestmark = pytest.mark.ndif_server

HUB_ID = model_cache.HUB_ID
HEADS = "17.3,18.6"
PROMPTS = [
    "The apple is in Box A, the pen is in Box B. Which box is the apple in? Box",
    "The cat is in Box C, the key is in Box D. Which box is the key in? Box",
    "The ship is in Box E, the cup is in Box F. Which box is the cup in? Box",
    "The hat is in Box G, the map is in Box H. Which box is the hat in? Box",
]
RTOL, ATOL = 1e-5, 1e-6


@pytest.fixture(scope="session")
def ndif(tmp_path_factory):
    """A running local NDIF; the client pointed at it (NDIF_HOST) and at its offline cache."""
    if not install.installed():
        pytest.skip(
            f"no local NDIF server venv in {install.venv()}: run "
            "`python -m qktrace.ndif_local install` (as .ci/run does)"
        )
    import huggingface_hub.constants as hub

    server = LocalNDIF(run_dir=tmp_path_factory.mktemp("ndif-run"))
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
            np.testing.assert_allclose(a.values, b.values, rtol=RTOL, atol=ATOL, err_msg=name)
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
    from qktrace.qk import capture

    remote, local = models
    assert_close(
        capture(remote, PROMPTS, HEADS, batch_size=2, progress=False),
        capture(local, PROMPTS, HEADS, batch_size=2, progress=False),
    )


@pytest.mark.parametrize("batches_per_request", [None, 2], ids=["trace", "session"])
@pytest.mark.parametrize("delta", [False, True], ids=["sums", "delta"])
def test_reduce_equals_local(models, batches_per_request, delta):
    from qktrace.sums import reduce

    remote, local = models
    keys = [[5, 12]] * len(PROMPTS)
    labels = [[("box", "positive"), ("box", "negative")]] * len(PROMPTS)
    run = dict(keys=keys, batch_size=1, progress=False, delta=delta)
    got = reduce(remote, PROMPTS, HEADS, labels, batches_per_request=batches_per_request, **run)
    assert_close(got, reduce(local, PROMPTS, HEADS, labels, **run))
