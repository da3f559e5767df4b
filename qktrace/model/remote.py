"""Running on NDIF: the API key, a pre-flight check, and retries of failed requests.

Each batch qktrace runs is one nnsight trace, which on NDIF is one request. A request can fail
for reasons that have nothing to do with the request (a dropped connection, a timed-out job, a
busy server): `with_retries` retries those a bounded number of times with exponential backoff,
then stops with a message that says which prompts failed and how to resume (every completed
batch is already on disk when the caller passed `out=`). Errors in the request itself (a bad
position, a shape error) are not retried, nor is a request NDIF refuses with an HTTP 4xx status
(a rejected key, a malformed request) other than 408 and 429.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import nnsight

from qktrace.core.errors import RemoteFailed

T = TypeVar("T")

NDIF_SIGNUP = "https://login.ndif.us"


def transient_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean "the request did not get through", worth a retry.

    Connection and timeout errors (httpx's transport errors, a dropped or timed-out websocket,
    a failed DNS look-up) and nnsight's `RemoteError` (a job the server reports as failed or
    timed out, or a request it could not take); see `is_transient` for the exceptions.
    """
    import socket

    import httpx
    from nnsight.intervention.backends.remote import RemoteError

    types: list[type[BaseException]] = [
        ConnectionError,
        TimeoutError,
        socket.gaierror,
        RemoteError,
        httpx.TransportError,
    ]
    try:
        import websocket

        types.append(websocket.WebSocketException)
    except ImportError:  # only needed for real NDIF requests
        pass
    return tuple(types)


# HTTP statuses that say the request itself is wrong (a rejected key, a bad request): retrying
# cannot help. 408 (request timeout) and 429 (too many requests) are worth a retry.
_PERMANENT_HTTP = set(range(400, 500)) - {408, 429}


def is_transient(error: BaseException) -> bool:
    """Whether `error` is worth a retry: a transient type, not caused by a 4xx HTTP answer
    (nnsight's `RemoteError` from an `httpx.HTTPStatusError`, or a websocket handshake refused
    with a status)."""
    if not isinstance(error, transient_errors()):
        return False
    status = getattr(error, "status_code", None)  # websocket.WebSocketBadStatusException
    if status is None:
        response = getattr(error.__cause__, "response", None)
        status = getattr(response, "status_code", None)
    return status not in _PERMANENT_HTTP


PUBLIC_HOST = "https://api.ndif.us"


def ndif_host() -> str:
    """The NDIF server to use: $NDIF_HOST (nnsight's own variable, read again here so that
    setting it after import works), else nnsight's configured host (the public NDIF)."""
    host = os.environ.get("NDIF_HOST") or nnsight.CONFIG.API.HOST
    nnsight.CONFIG.API.HOST = host.rstrip("/")
    return nnsight.CONFIG.API.HOST


def is_public(host: str) -> bool:
    """Whether `host` is the public NDIF service (which needs an API key)."""
    return host.rstrip("/") == PUBLIC_HOST


def check_ndif_key() -> str:
    """The NDIF API key from NDIF_API_KEY (or nnsight's saved config); a clear error if none.

    Only the public NDIF needs one: a server of your own (NDIF_HOST, e.g.
    `python -m qktrace.ndif_local start`) runs without auth unless you set it up with some.
    """
    key = os.environ.get("NDIF_API_KEY") or nnsight.CONFIG.API.APIKEY
    if not key and is_public(ndif_host()):
        raise RemoteFailed(
            "remote=True runs on NDIF and needs an API key, but NDIF_API_KEY is not set. "
            f"Get a key at {NDIF_SIGNUP}, then `export NDIF_API_KEY=...` (or call "
            "nnsight.CONFIG.set_default_api_key(key)). To test the remote code path without a "
            "server, use remote='local' (--remote-local on the CLI), or run your own NDIF "
            "(`python -m qktrace.ndif_local start`, then export the NDIF_HOST it prints)."
        )
    nnsight.CONFIG.API.APIKEY = key or ""
    return key or ""


def preflight(model_id: str) -> None:
    """Before any work: is NDIF reachable, and does it accept the key? Clear errors if not.

    Set QKTRACE_SKIP_NDIF_CHECK=1 to skip (e.g. a private server without /whoami).
    """
    host = ndif_host()
    check_ndif_key()
    if os.environ.get("QKTRACE_SKIP_NDIF_CHECK"):
        return
    from nnsight import ndif

    try:
        identity = ndif.whoami()
    except Exception as error:  # any failure to reach the service
        status = getattr(getattr(error, "response", None), "status_code", None)
        if status in (401, 403):
            raise RemoteFailed(
                f"NDIF rejected the API key in NDIF_API_KEY (HTTP {status}, for {model_id}). "
                f"Check the key at {NDIF_SIGNUP} and export it again; no work was started."
            ) from error
        if not is_public(host):
            raise RemoteFailed(
                f"The NDIF server at {host} (NDIF_HOST) is unreachable ({error}); no work was "
                "started. Start it (`python -m qktrace.ndif_local start` for your own on this "
                "machine; `... status` says whether it is up), or unset NDIF_HOST for the "
                "public NDIF."
            ) from error
        raise RemoteFailed(
            f"NDIF at {host} is unreachable ({error}). Check your network and "
            "https://nnsight.net/status, or run locally (drop --remote) or offline "
            "(--remote-local)."
        ) from error
    if not identity.get("email") and is_public(host):
        raise RemoteFailed(
            f"NDIF did not accept the API key in NDIF_API_KEY (for {model_id}). Check the key at "
            f"{NDIF_SIGNUP}; set QKTRACE_SKIP_NDIF_CHECK=1 if your server does not validate keys."
        )


def with_retries(
    run: Callable[..., T],
    *args: Any,
    what: str,
    attempts: int = 4,
    backoff: float = 2.0,
    resume_hint: str = "",
    sleep: Callable[[float], None] | None = None,
) -> T:
    """Call `run(*args)`; retry transient remote failures with exponential backoff, then fail clearly.

    `what` names the work (e.g. "prompts 64..79"); `resume_hint` says how to resume. Waits
    1, backoff, backoff^2, ... seconds between attempts (`sleep`, default `time.sleep`, looked
    up at call time so tests can patch it). Errors that are not transient (`is_transient`)
    propagate at once.
    """
    sleep = sleep or time.sleep
    for attempt in range(1, attempts + 1):
        try:
            return run(*args)
        except Exception as error:
            if not is_transient(error):
                raise
            if attempt == attempts:
                raise RemoteFailed(
                    f"The request for {what} failed {attempts} times; last error: {error}. "
                    + (
                        resume_hint
                        or "Pass out=PATH so completed batches are kept (a study keeps its "
                        "covariance sums in its --out: rerun the same command to go on)."
                    )
                ) from error
            sleep(backoff ** (attempt - 1))
    raise AssertionError("unreachable")


def name_model_offline(repo_id: str) -> None:
    """Let nnsight name `repo_id` for the server without asking the hub, when it is offline.

    nnsight names a remote model by its canonical hub id, which it fetches once from the hub
    (`HfApi().model_info(repo_id).id`, memoized in `nnsight.modeling.huggingface._ID_CACHE`).
    With HF_HUB_OFFLINE=1 that call fails; the id as written is then the name (write it as the
    server knows it, e.g. "HuggingFaceTB/SmolLM2-135M-Instruct"). Online, nnsight asks as usual.
    """
    from huggingface_hub import constants
    from nnsight.modeling import huggingface

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in (
        "1", "ON", "YES", "TRUE",
    )  # fmt: skip
    if offline:
        huggingface._ID_CACHE.setdefault(repo_id, repo_id)
