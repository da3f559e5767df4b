"""qktrace's errors: one base class to catch, one subclass per kind of mistake.

Every error qktrace raises on purpose is a `QktraceError`; its subclass says whose fix it is
(an argument, a study declaration, a store on disk, the NDIF server), and the CLI maps each
subclass to one exit status (`exit_code`), so the same mistake gets the same error and status
from every verb and every command. Each also subclasses the builtin error it used to be
(ValueError, TypeError, RuntimeError), so older ``except ValueError`` code keeps working.
"""

from __future__ import annotations


class QktraceError(Exception):
    """Base class of every error qktrace raises on purpose; the message names the fix."""

    exit_code = 1


class BadArgument(QktraceError, ValueError):
    """An argument has a wrong value; the message names it, what was given and what to pass."""

    exit_code = 2


class BadArgumentType(BadArgument, TypeError):
    """An argument has a wrong type; the message names it, what was given and what to pass."""


class StudyError(QktraceError, ValueError):
    """A study's declaration or prompts cannot be run; the message names the study and the fix."""

    exit_code = 2


class StoreError(QktraceError, ValueError):
    """A store on disk cannot be read or written as asked (damaged, another run's, busy)."""


class RemoteFailed(QktraceError, RuntimeError):
    """The NDIF server could not be reached or kept failing; completed batches are kept."""


class RequestRefused(RemoteFailed):
    """NDIF refused a request that it would refuse again as it is (too large for the server's
    memory, or longer than its time limit for one request): not retried; the message names
    the request and the fix (less work per request, or a server with a higher limit)."""


class MissingVariable(BadArgument, KeyError):
    """A Dataset argument lacks a variable or label the verb needs (a KeyError too)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
