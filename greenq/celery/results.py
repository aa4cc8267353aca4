"""Celery's result record, as Celery's result backends store it (pure, no I/O).

A record is kombu JSON (``greenq.celery.protocol.json_dumps``) of::

    {"status": "SUCCESS" | "FAILURE" | "RETRY" | "REVOKED" | "STARTED",
     "result": <value> | <exception> | null,
     "traceback": <text> | null, "children": [], "date_done": <ISO 8601> | null,
     "task_id": <id>, ["parent_id": <id>], ["group_id": <id>]}

An exception is ``{"exc_type": <qualified name>, "exc_message": <its args>,
"exc_module": <module>}``, which Celery's client rebuilds into the
exception's own class when it can import it (and into a class of that name
when it cannot).  ``date_done`` is set for the ready states only.  On Redis
the key is ``celery-task-meta-<id>``, written with SETEX (``result_expires``)
and PUBLISHed on the same name, which Celery's ``AsyncResult.get()`` listens
on (greenq/transports/redis/celery_results.py).
"""
from __future__ import annotations

import datetime as _dt
from typing import Any, Dict, Optional, Tuple

from .protocol import json_dumps

READY = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
KEY_PREFIX = "celery-task-meta-"


def key(task_id: str) -> str:
    """Where Celery's key-value backends keep the record of ``task_id``."""
    return KEY_PREFIX + task_id


def exception_record(exc: BaseException) -> Dict[str, Any]:
    kind = type(exc)
    args = list(exc.args)
    try:
        json_dumps(args)
    except (TypeError, ValueError):
        args = [repr(a) for a in args]
    return {"exc_type": getattr(kind, "__qualname__", kind.__name__), "exc_message": args,
            "exc_module": kind.__module__}


def meta(task_id: str, state: str, result: Any = None, exc: Optional[BaseException] = None,
         traceback: Optional[str] = None, parent_id: Optional[str] = None,
         group_id: Optional[str] = None) -> Dict[str, Any]:
    record: Dict[str, Any] = {
        "status": state,
        "result": exception_record(exc) if exc is not None else result,
        "traceback": traceback,
        "children": [],
        "date_done": _dt.datetime.now(_dt.timezone.utc).isoformat() if state in READY else None,
        "task_id": task_id,
    }
    if group_id:
        record["group_id"] = group_id
    if parent_id:
        record["parent_id"] = parent_id
    return record


def encode(record: Dict[str, Any]) -> bytes:
    """The record as JSON; a result JSON cannot carry is stored as a FAILURE
    saying so (Celery's client raises it), never an error here."""
    try:
        return json_dumps(record).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as exc:
        failed = meta(record["task_id"], "FAILURE",
                      exc=TypeError(f"result not serializable with json: {type(exc).__name__}: {exc}"[:300]),
                      parent_id=record.get("parent_id"), group_id=record.get("group_id"))
        return json_dumps(failed).encode("utf-8")


#: the worker's outcomes (greenq/worker/jobs.py) and Celery's state of each
_STATES = {"success": "SUCCESS", "failure": "FAILURE", "retry": "RETRY", "revoked": "REVOKED"}


def worker_record(msg: Any, outcome: str, value: Any, exc: Optional[BaseException], tb: Optional[str],
                  reason: Optional[str]) -> Optional[Tuple[str, bytes]]:
    """(task id, encoded record) of a settled task of a Celery message, or
    None for an outcome Celery keeps no record of."""
    state = _STATES.get(outcome)
    if state is None:
        return None
    if state == "RETRY":
        exc = getattr(exc, "exc", None) or exc
    elif state == "REVOKED":
        from ..exceptions import TaskRevokedError
        exc = TaskRevokedError(reason or "revoked")
    record = meta(msg.id, state, result=value if state == "SUCCESS" else None,
                  exc=exc if state != "SUCCESS" else None, traceback=tb if state == "FAILURE" else None,
                  parent_id=msg.parent_id, group_id=msg.group_id)
    return msg.id, encode(record)
