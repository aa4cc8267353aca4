"""Every exception greenq raises; re-exported from :mod:`greenq`."""
import builtins
from typing import Any, Optional


class GreenQError(Exception):
    """Base class of every greenq error."""


class ConfigError(GreenQError):
    """Invalid configuration: the message names the file, section, key and value."""


class TimeoutError(GreenQError, builtins.TimeoutError):
    """A wait (``AsyncResult.get``) ran out of time."""


class BrokerError(GreenQError):
    """The broker or result backend failed or could not be reached."""


class MessageError(GreenQError):
    """A message could not be decoded, was too large, or failed its signature."""


class TaskError(GreenQError):
    """A task failed with an exception that cannot be rebuilt on this side.

    ``type_name`` is the remote exception's qualified type name, ``message``
    its text and ``remote_traceback`` the traceback printed in the worker.
    """

    def __init__(self, type_name: str, message: str, remote_traceback: Optional[str] = None):
        super().__init__(f"{type_name}: {message}")
        self.type_name = type_name
        self.message = message
        self.remote_traceback = remote_traceback


class SoftTimeLimitExceeded(GreenQError):
    """Raised inside a task when its soft time limit passes; the task may catch it."""


class TimeLimitExceeded(GreenQError):
    """A task was killed by its hard time limit."""


class Retry(GreenQError):
    """Raised by ``self.retry()``: the task is published again with a delay."""

    def __init__(self, message: str = "", exc: Optional[BaseException] = None,
                 when: Optional[float] = None):
        super().__init__(message or "retry requested")
        self.exc = exc
        self.when = when


class Reject(GreenQError):
    """Raise inside a task to refuse its message: it goes to the dead-letter store
    (``requeue=False``, the default) or back to the queue (``requeue=True``)."""

    def __init__(self, reason: Any = "", requeue: bool = False):
        super().__init__(str(reason))
        self.reason = str(reason)
        self.requeue = requeue


class MaxRetriesExceededError(GreenQError):
    """A task asked to retry once more than ``max_retries`` allows."""


class WorkerLostError(GreenQError):
    """Stored for a task whose worker was terminated while running it."""


class ChordError(GreenQError):
    """Stored as a chord's result when one of its members failed or was
    revoked: the message names the member (its index, task name and id)."""


class TaskRevokedError(GreenQError):
    """Raised by ``get()`` for a task that was revoked or expired."""


def describe(exc: Optional[BaseException]) -> str:
    """``Type: message`` of an exception, for a log line or an error text.

    The one way greenq shows an exception it caught (docs/glossary.md): it never
    raises, even for an exception whose ``str()`` does (a task's exception is
    anyone's code); it keeps at most 300 characters of the message; an empty
    message shows the type alone, and a message that already starts with its
    type (amqp's ``<AccessRefused: unknown error>``) is not prefixed twice.
    Not in ``__all__``: a helper of greenq's, not part of its API."""
    name = type(exc).__name__
    try:
        text = str(exc)[:300]
    except Exception:
        text = "(its message cannot be shown)"
    if not text:
        return name
    return text if text.startswith((name, "<" + name)) else f"{name}: {text}"


__all__ = [
    "GreenQError", "ConfigError", "TimeoutError", "BrokerError", "MessageError",
    "TaskError", "SoftTimeLimitExceeded", "TimeLimitExceeded", "Retry", "Reject",
    "WorkerLostError", "TaskRevokedError", "MaxRetriesExceededError",
    "ChordError",
]
