"""greenq: a task queue built for green threads.

Importing this package loads nothing but this file: the public names are
resolved on first use (PEP 562), so a legacy app imports greenq unpatched and
the worker launcher patches before any of greenq's internals, gevent,
eventlet, ssl, redis or amqp is loaded.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, List

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

if TYPE_CHECKING:
    # What a type checker reads instead of the lazy __getattr__ below (which
    # can only say Any): the same names, each from its module.
    # tests/unit/test_types.py checks this list against _EXPORTS.
    from greenq.app import GreenQ as GreenQ
    from greenq.canvas import GroupResult as GroupResult, Signature as Signature, chain as chain, \
        chord as chord, group as group
    from greenq.exceptions import BrokerError as BrokerError, ChordError as ChordError, \
        ConfigError as ConfigError, GreenQError as GreenQError, \
        MaxRetriesExceededError as MaxRetriesExceededError, MessageError as MessageError, \
        Reject as Reject, Retry as Retry, SoftTimeLimitExceeded as SoftTimeLimitExceeded, \
        TaskError as TaskError, TaskRevokedError as TaskRevokedError, \
        TimeLimitExceeded as TimeLimitExceeded, TimeoutError as TimeoutError, \
        WorkerLostError as WorkerLostError
    from greenq.result import FAILURE as FAILURE, PENDING as PENDING, RECEIVED as RECEIVED, \
        RETRY as RETRY, REVOKED as REVOKED, STARTED as STARTED, SUCCESS as SUCCESS, \
        AsyncResult as AsyncResult
    from greenq.task import Task as Task


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'greenq' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> List[str]:
    return sorted(list(globals()) + __all__)
