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
from typing import Any, Dict, List, Optional, Sequence, Tuple

from .protocol import json_dumps, json_loads

READY = frozenset({"SUCCESS", "FAILURE", "REVOKED"})
#: the states in which a chord member stops its chord (Celery's PROPAGATE_STATES)
PROPAGATE = frozenset({"FAILURE", "REVOKED"})
KEY_PREFIX = "celery-task-meta-"
GROUP_PREFIX = "celery-taskset-meta-"


def key(task_id: str) -> str:
    """Where Celery's key-value backends keep the record of ``task_id``."""
    return KEY_PREFIX + task_id


def group_key(group_id: str, suffix: str = "") -> str:
    """Where Celery's key-value backends keep group ``group_id``'s record
    (no suffix) and, on Redis, its chord's counting keys: ``.s`` the chord's
    size (set by the client that sends the chord), ``.t`` how many members
    were added to it later, ``.j`` the members' results (a sorted set scored
    by ``group_index``), ``.d`` the members counted, ``.c`` the claim of the
    member that sends the body (then ``done``)."""
    return GROUP_PREFIX + group_id + suffix


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


# -- groups and chords -------------------------------------------------------------
def group_record(group_id: str, member_ids: Sequence[str]) -> bytes:
    """``celery-taskset-meta-<group id>`` as Celery's ``GroupResult.save()``
    writes it: ``{"result": [[group id, null], [[[member id, null], null], ...]]}``
    (``GroupResult.as_tuple()``: each member with no parent)."""
    return json_dumps({"result": [[group_id, None], [[[m, None], None] for m in member_ids]]}).encode("utf-8")


def group_members(data: Any) -> Optional[List[str]]:
    """The member ids of a ``celery-taskset-meta-<id>`` record (nested
    groups flattened), or None when it is not one."""
    try:
        record = json_loads(data)
        members = record["result"][1]
    except Exception:
        return None
    out: List[str] = []

    def walk(items: Any) -> None:
        for item in items:
            head, rest = item[0], item[1]
            if isinstance(rest, list):          # a nested group: [[id, parent], [members]]
                walk(rest)
            else:
                out.append(head[0] if isinstance(head, list) else head)
    try:
        walk(members)
    except Exception:
        return None
    return out if all(isinstance(m, str) for m in out) else None


def chord_part(task_id: str, state: str, value: Any = None, exc: Optional[BaseException] = None) -> bytes:
    """A chord member's entry in the chord's ``.j`` sorted set, as Celery's
    Redis backend writes it: ``[1, task id, state, result]`` (an exception as
    in a task's record)."""
    result = exception_record(exc) if exc is not None else value
    try:
        return json_dumps([1, task_id, state, result]).encode("utf-8")
    except (TypeError, ValueError, RecursionError) as error:
        failed = TypeError(f"result not serializable with json: {type(error).__name__}: {error}"[:300])
        return json_dumps([1, task_id, "FAILURE", exception_record(failed)]).encode("utf-8")


def chord_results(entries: Sequence[Any]) -> Tuple[List[Any], Optional[str]]:
    """The members' values in the chord's order, from its ``.j`` entries, or
    (values so far, the ChordError message naming the first member that
    failed or was revoked, as Celery words it)."""
    values: List[Any] = []
    for raw in entries:
        try:
            _, task_id, state, result = json_loads(raw)
        except Exception as exc:
            return values, f"Dependency entry unreadable: {type(exc).__name__}: {exc}"[:500]
        if state in PROPAGATE:
            if isinstance(result, dict) and "exc_type" in result:
                args = result.get("exc_message")
                args = args if isinstance(args, list) else [args]
                shown = f"{result['exc_type']}({', '.join(repr(a) for a in args)})"
            else:
                shown = repr(result)
            return values, f"Dependency {task_id} raised {shown}"
        values.append(result)
    return values, None


def chord_error(body_id: str, message: str, parent_id: Optional[str] = None,
                group_id: Optional[str] = None) -> bytes:
    """The FAILURE stored for a chord's body when a member failed: Celery's
    ``celery.exceptions.ChordError``, which its client rebuilds as such."""
    record = meta(body_id, "FAILURE", parent_id=parent_id, group_id=group_id)
    record["result"] = {"exc_type": "ChordError", "exc_message": [message], "exc_module": "celery.exceptions"}
    return encode(record)


def started(task_id: str, pid: int, hostname: str, parent_id: Optional[str] = None,
            group_id: Optional[str] = None) -> bytes:
    """STARTED as Celery's worker stores it for a ``track_started`` task:
    the result is ``{"pid": ..., "hostname": ...}``."""
    return encode(meta(task_id, "STARTED", result={"pid": pid, "hostname": hostname},
                       parent_id=parent_id, group_id=group_id))


# -- reading Celery's records (greenq's AsyncResult) ------------------------------------
def to_greenq_meta(data: Any, task_id: str) -> Optional[Dict[str, Any]]:
    """A ``celery-task-meta-<id>`` record as greenq's result meta
    (greenq.result.make_meta's keys): ``exc`` in greenq's form, rebuilt by
    greenq's AsyncResult (``exc_module`` + ``exc_type``); None when it is not
    a Celery record."""
    try:
        record = json_loads(data)
    except Exception:
        return None
    return record_to_greenq_meta(record, task_id)


def record_to_greenq_meta(record: Any, task_id: str) -> Optional[Dict[str, Any]]:
    """``to_greenq_meta`` of a record already decoded (e.g. the body of a
    Celery worker's ``rpc://`` reply, in whatever serializer it came)."""
    if not isinstance(record, dict) or not isinstance(record.get("status"), str):
        return None
    state, result = record["status"], record.get("result")
    out: Dict[str, Any] = {"id": task_id, "state": state, "result": result, "celery": True}
    if isinstance(result, dict) and "exc_type" in result and state in ("FAILURE", "RETRY", "REVOKED"):
        module = result.get("exc_module") or "builtins"
        args = result.get("exc_message")
        args = args if isinstance(args, list) else [args]
        message = str(args[0]) if len(args) == 1 else ", ".join(str(a) for a in args)
        out["result"] = None
        out["exc"] = {"type": f"{module}.{result['exc_type']}", "args": args, "message": message}
        if state == "REVOKED":
            out["reason"] = message or "revoked"
    if record.get("traceback"):
        out["traceback"] = record["traceback"]
    for key in ("parent_id", "group_id"):
        if record.get(key) is not None:
            out[key] = record[key]
    return out
