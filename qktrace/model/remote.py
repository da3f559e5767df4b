"""Running on NDIF: the API key, a pre-flight check, and retries of failed requests.

Each batch qktrace runs is one nnsight trace, which on NDIF is one request. A request can fail
for reasons that have nothing to do with the request (a dropped connection, a busy server, a
restarted model): `with_retries` retries those a bounded number of times with exponential
backoff, then stops with a message that says which prompts failed and how to resume (every
completed batch is already on disk when the caller passed `out=`). Errors in the request itself
(a bad position, a shape error) are not retried, nor is a request NDIF refuses with an HTTP 4xx
status (a rejected key, a malformed request) other than 408 and 429, nor one it refuses for its
size or run time (`refusal`): those stop at once with `RequestRefused`, naming the fix.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import nnsight

from qktrace.core.errors import RemoteFailed, RequestRefused

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


# How NDIF refuses a request that it would refuse again as it is (ndif 0.1.2's model actor,
# ndif/services/ray/deployments/modeling/base.py, `run`): a request that runs past the
# deployment's `execution_timeout_seconds` is answered ERROR "Your job exceeded the execution
# timeout of {T}s."; one that needs more memory than the replica's budget fails in torch (on a
# GPU `torch.OutOfMemoryError: CUDA out of memory`, the replica capped by
# torch.cuda.set_per_process_memory_fraction; on CPU torch's "can't allocate memory") and comes
# back as that traceback. ndif 0.1.2 has no cap on a request's bytes (its API's TODO) and sends
# a large result through its object store; a proxy in front of a server may answer HTTP 413.
_TIMED_OUT = ("exceeded the execution timeout",)
_TOO_LARGE = ("OutOfMemoryError", "CUDA out of memory", "can't allocate memory")


def _http_status(error: BaseException) -> int | None:
    status = getattr(error, "status_code", None)  # websocket.WebSocketBadStatusException
    if status is None:
        response = getattr(error.__cause__, "response", None)
        status = getattr(response, "status_code", None)
    return status


def refusal(error: BaseException) -> str | None:
    """Whether NDIF refused the request in a way that recurs if it is sent again as it is (see
    above): "timeout", "too large", or None."""
    from nnsight.intervention.backends.remote import RemoteError

    if not isinstance(error, RemoteError):
        return None
    text = str(error)
    if any(marker in text for marker in _TIMED_OUT):
        return "timeout"
    if _http_status(error) == 413 or any(marker in text for marker in _TOO_LARGE):
        return "too large"
    return None


def refused(kind: str, what: str, error: BaseException, resume_hint: str = "") -> RequestRefused:
    """The error for a request NDIF refused (`refusal`): what, why, and the fix."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    said = (lines[-1] if lines else type(error).__name__)[:300]  # a traceback's last line
    if kind == "timeout":
        why = "ran longer than the server allows one request"
        higher = "a server with a longer limit (your own NDIF: `execution_timeout_seconds` in "
        higher += "the model's deploy spec, or NDIF_DEFAULT_EXECUTION_TIMEOUT_SECONDS)"
    else:
        why = "was too large for the server"
        higher = "a deployment with more memory"
    return RequestRefused(
        f"NDIF refused the request for {what}: it {why} (the server said: {said!r}). It would "
        "be refused again as it is, so it was not retried. Send less work per request: a "
        "smaller --batch-size (Python: batch_size=; for reduce also a smaller "
        "batches_per_request=), in a new run (a new --out; a run resumes only with its own "
        f"batch size), or use {higher} and rerun the same command. "
        + (resume_hint or "Pass out=PATH so that completed batches are kept.")
    )


def is_transient(error: BaseException) -> bool:
    """Whether `error` is worth a retry: a transient type, not caused by a 4xx HTTP answer
    (nnsight's `RemoteError` from an `httpx.HTTPStatusError`, or a websocket handshake refused
    with a status), and not a refusal that recurs (`refusal`: too large, timed out)."""
    if not isinstance(error, transient_errors()) or refusal(error) is not None:
        return False
    return _http_status(error) not in _PERMANENT_HTTP


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
    up at call time so tests can patch it). A request NDIF refuses for its size or run time
    (`refusal`) stops at once with `RequestRefused`; other errors that are not transient
    (`is_transient`) propagate at once.
    """
    sleep = sleep or time.sleep
    for attempt in range(1, attempts + 1):
        try:
            return run(*args)
        except Exception as error:
            kind = refusal(error)
            if kind is not None:
                raise refused(kind, what, error, resume_hint) from error
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
