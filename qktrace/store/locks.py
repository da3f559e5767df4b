"""One writer per output: a run holds an operating-system lock on its store while it writes.

Two runs writing the same store would overwrite each other's checkpoints and results (both
printing "wrote"), so a run first takes ``.<store>.lock`` beside its store with `filelock`
(``fcntl.flock`` on POSIX) and a second run on the same output stops at once with
`OutputBusy`. The lock belongs to the open file, so the operating system releases it when the
holding process dies, however it dies (``kill -9`` included): a lock left by a killed run is
never in the way, and there is nothing stale to clean up by hand. The lock file holds the
holder's process id, which the error quotes, and is removed when the run ends.

Limits: flock is advisory and local; on some network file systems (older NFS) it may not be
enforced across machines.
"""

from __future__ import annotations

import functools
import inspect
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock, Timeout

from qktrace.core.errors import StoreError

__all__ = ["OutputBusy", "writing", "one_writer"]

F = TypeVar("F", bound=Callable[..., Any])


class OutputBusy(StoreError, RuntimeError):
    """Another live process is writing the same output."""


def lock_path(path: Path) -> Path:
    """The lock file of the store `path`: ``.<name>.lock`` beside it."""
    return path.parent / f".{path.name}.lock"


@contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Hold the lock on the store `path` for the block; raise OutputBusy if another run holds it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    where = lock_path(path)

    def record_pid(fd: int) -> None:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())

    lock = FileLock(where, timeout=0, thread_local=False, on_acquired=record_pid)
    try:
        lock.acquire()
    except Timeout:
        try:
            holder = f"process {int(where.read_text().split()[0])}"
        except (OSError, ValueError, IndexError):
            holder = "another process"
        raise OutputBusy(
            f"another run is writing {path} ({holder} holds {where.name}); wait for it to "
            "finish, or pass another output folder (--out). Two runs on one output would "
            "overwrite each other's results."
        ) from None
    try:
        yield
    finally:
        # removed while still held: a run that opened the old file finds, once it gets the
        # lock, that the path no longer names it, and filelock makes it try again
        where.unlink(missing_ok=True)
        lock.release()


def one_writer(
    store: str | Callable[[dict[str, Any]], str] | None = None,
) -> Callable[[F], F]:
    """Decorate a function with an ``out`` argument: it holds the lock on its output throughout.

    The output is ``out/<store>`` for a study's ``run`` (``out`` is a folder; `store` may be a
    function of the call's arguments by name), else ``out`` itself (a store path, as for
    `qktrace.reduce`); nothing is locked while ``out`` is None.
    """

    def decorate(function: F) -> F:
        signature = inspect.signature(function)

        @functools.wraps(function)
        def locked(*args: Any, **kwargs: Any) -> Any:
            arguments = signature.bind(*args, **kwargs).arguments
            out = arguments.get("out")
            if out is None:
                return function(*args, **kwargs)
            from qktrace.core import checks

            checks.path("out", out)
            name = store(arguments) if callable(store) else store
            with writing(Path(out) / name if name else Path(out)):
                return function(*args, **kwargs)

        return locked  # type: ignore[return-value]

    return decorate
