"""greenq: a task queue built for green threads.

Importing this package loads nothing but this file: the public names are
resolved on first use (PEP 562), so a legacy app imports greenq unpatched and
the worker launcher patches before any of greenq's internals, gevent,
eventlet, ssl, redis or amqp is loaded.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "GreenQ": "greenq.app",
    "AsyncResult": "greenq.result", "Task": "greenq.task",
    **{name: "greenq.canvas" for name in ("Signature", "chain", "group", "chord", "GroupResult")},
    **{state: "greenq.result" for state in
       ("PENDING", "RECEIVED", "STARTED", "RETRY", "SUCCESS", "FAILURE", "REVOKED")},
    **{exc: "greenq.exceptions" for exc in
       ("GreenQError", "ConfigError", "TimeoutError", "TaskError", "SoftTimeLimitExceeded",
        "TimeLimitExceeded", "Retry", "Reject", "MessageError", "BrokerError",
        "MaxRetriesExceededError", "TaskRevokedError", "WorkerLostError", "ChordError")},
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'greenq' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list:
    return sorted(list(globals()) + __all__)
