"""Task events (``-E`` / ``[worker] events = true``), as subscribers of the
worker's hooks.

=================  ==========================================================
type               fields beside ``type``, ``uuid``, ``name``, ``worker``, ``timestamp``
=================  ==========================================================
task-received      ``queue``, ``sent`` (epoch the client sent it), ``args``,
                   ``kwargs`` (reprs, cut at 200 characters), ``retries``,
                   ``eta``; each left out when empty or at its default
task-started       ``queue_wait`` (seconds from sent, or eta, to start)
task-succeeded     ``runtime``
task-failed        ``runtime``, ``exception``, ``traceback``
task-retried       ``runtime``, ``reason``
task-revoked       ``reason`` (revoked, expired, terminated by revoke)
task-dead-lettered ``reason`` (the message could not run; ``name`` may be None)
task-sent          ``queue``, ``args``, ``kwargs``, ``retries``, ``eta``, ``expires``,
                   ``parent_id``, ``root_id`` (left out when empty); ``worker`` is the
                   sender: a worker with ``-E`` for the tasks it sends, or a client with
                   ``[greenq] task_send_sent_event = true`` (greenq/control/sent.py)
=================  ==========================================================

Worker events (``worker-online``, ``worker-heartbeat``, ``worker-offline``)
are made by the control plane itself (greenq/control/agent.py).

**What a task pays.**  The subscribers keep, per task, one row in the batch
being filled: the task's id and name, then each of its events as ``code,
timestamp, *fields`` (``code`` the index of the type in ``TASK_EVENTS``, the
fields in the order of ``ROW_FIELDS``).  A task that is received, started and
done within one batching period (half a second) is one row, its id and name
written once; a longer one gets a row in each batch its events fall in.  The
control greenlet takes the batch (``take``) and publishes it, one broker call
per ``BATCH_MAX`` rows, with one call to the C JSON encoder and no Python work
per event.  A task pays for a list and a dict entry, never for a round trip.
Under the threads driver the subscribers and ``take`` hold a lock; under a
green driver nothing can run between their steps, so they need none.

**On the wire** (version 2), a batch is one JSON document::

    {"v": 2, "w": WORKER, "e": [ROW, ...]}

where ROW is a task's row, ``[uuid, name, code, timestamp, *fields, code,
timestamp, *fields, ...]``, or a worker event's object.  Times
(``MICROSECOND_FIELDS``) travel as whole microseconds: a float costs JSON
twice an int to write.  :func:`decode_batch` turns a body back into the
documented events, one per ``code`` (times in float seconds), which is what
``greenq events``, the dashboard and this table show; it also reads the
version-1 body (a JSON list of event objects) of an older worker.
"""
from __future__ import annotations

import json
import math
from collections import deque
from contextlib import nullcontext
from time import monotonic_ns, time_ns
from typing import TYPE_CHECKING, Any, Deque, Dict, List, Optional, Sequence, Tuple

if TYPE_CHECKING:  # pragma: no cover
    from .hooks import Hooks

REPR_MAX = 200
#: event fields sent as integer microseconds and read as float seconds
MICROSECOND_FIELDS = ("timestamp", "sent", "eta", "expires", "runtime", "queue_wait")
#: a row's code is the index of its type here
TASK_EVENTS = ("task-received", "task-started", "task-succeeded", "task-failed", "task-retried",
               "task-revoked", "task-dead-lettered", "task-sent")
RECEIVED, STARTED, SUCCEEDED, FAILED, RETRIED, REVOKED, DEAD, SENT = range(len(TASK_EVENTS))
#: the fields of one event in a row, after its ``code, timestamp``, by code
ROW_FIELDS: Sequence[Sequence[str]] = (
    ("queue", "sent", "args", "kwargs", "retries", "eta"),
    ("queue_wait",),
    ("runtime",),
    ("runtime", "exception", "traceback"),
    ("runtime", "reason"),
    ("reason",),
    ("reason",),
    ("queue", "args", "kwargs", "retries", "eta", "expires", "parent_id", "root_id"),
)
WIRE_VERSION = 2
ROWS_MAX = 100000             # rows kept while the broker is away (the oldest are dropped)
LIVE_MAX = 200000             # tasks between received and done that are remembered

_encode = json.JSONEncoder(separators=(",", ":"), default=repr, check_circular=False).encode


def short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= REPR_MAX else text[:REPR_MAX - 3] + "..."


def _us(seconds: Optional[float]) -> Optional[int]:
    return int(seconds * 1e6) if seconds else None


def sent_row(msg: Any) -> List[Any]:
    """The row of a ``task-sent`` event for the task message ``msg``."""
    return [msg.id, msg.task, SENT, time_ns() // 1000, msg.queue,
            short_repr(msg.args) if msg.args else None, short_repr(msg.kwargs) if msg.kwargs else None,
            msg.retries or None, _us(msg.eta), _us(msg.expires), msg.parent_id,
            msg.root_id if msg.root_id != msg.id else None]


def encode_batch(worker: str, rows: List[Any]) -> str:
    """The body of one batch: task rows (lists) and worker events (dicts)."""
    return _encode({"v": WIRE_VERSION, "w": worker, "e": rows})


def decode_batch(body: Any) -> List[Dict[str, Any]]:
    """The events of a batch's body, times in seconds; [] for a body that is
    not a batch.  Whatever is not an event (a stray message on the stream, a
    row of the wrong shape, a time that is not a number) is skipped: a reader
    never fails on what somebody else wrote."""
    from .control.base import loads      # None for a body that is not JSON (or nested too deep)
    batch = loads(body)
    if isinstance(batch, list):                                  # version 1: event objects
        rows, worker = batch, None
    elif isinstance(batch, dict) and isinstance(batch.get("e"), list):
        rows, worker = batch["e"], batch.get("w")
    else:
        return []
    out: List[Dict[str, Any]] = []
    for row in rows:
        if isinstance(row, dict):
            if isinstance(row.get("type"), str):
                _in_seconds(row, out)
        elif isinstance(row, list) and len(row) >= 4 and isinstance(row[0], str):
            task_id, name, i = row[0], row[1], 2
            while i + 1 < len(row):
                code, timestamp = row[i], row[i + 1]
                if type(code) is not int or not 0 <= code < len(TASK_EVENTS) or type(timestamp) is not int:
                    break                                          # the rest of a garbled row is not read
                event = {"type": TASK_EVENTS[code], "uuid": task_id, "name": name, "worker": worker,
                         "timestamp": timestamp}
                keys = ROW_FIELDS[code]
                for key, value in zip(keys, row[i + 2:i + 2 + len(keys)]):
                    if value is not None:
                        event[key] = value
                i += 2 + len(keys)
                _in_seconds(event, out)
    return out


def _in_seconds(event: Dict[str, Any], out: List[Dict[str, Any]]) -> None:
    """Append ``event`` with its times in seconds, unless its id is not a string."""
    if not isinstance(event.get("uuid", ""), str):
        return
    for key in MICROSECOND_FIELDS:
        value = event.get(key)
        if type(value) is int:
            event[key] = value / 1e6
        elif value is not None and not (type(value) is float and math.isfinite(value)):
            del event[key]                                       # a time that is not one
    out.append(event)


class TaskEvents:
    """Builds the rows of the batch being filled (see the module's text);
    ``take`` hands it to the control greenlet and starts the next one."""

    def __init__(self, lock: Any = None) -> None:
        self.rows: Deque[List[Any]] = deque(maxlen=ROWS_MAX)
        self._batch = 0                     # which batch ``rows`` is (``take`` counts them)
        #: task id -> (its row, the batch of that row, due (sent or eta, epoch µs), monotonic start µs)
        self._live: Dict[str, Tuple[List[Any], int, Optional[int], Optional[int]]] = {}
        self._lock = lock
        self._guard = lock if lock is not None else nullcontext()   # take and sent: not the hot path

    def subscribe(self, hooks: "Hooks") -> None:
        subscribers = (("task_received", self._received), ("task_prerun", self._prerun),
                       ("task_success", self._success), ("task_failure", self._failure),
                       ("task_retry", self._retry), ("task_revoked", self._revoked),
                       ("message_dead_lettered", self._dead))
        for hook, fn in subscribers:
            hooks.on(hook, fn if self._lock is None else self._locked(fn))

    def _locked(self, fn: Any) -> Any:
        lock = self._lock

        def locked(*args: Any) -> None:
            with lock:
                fn(*args)
        locked.__qualname__ = getattr(fn, "__qualname__", "TaskEvents.subscriber")
        return locked

    def take(self) -> Deque[List[Any]]:
        """The rows of the batch filled so far; later events go to new rows."""
        with self._guard:
            rows, self.rows = self.rows, deque(maxlen=ROWS_MAX)
            self._batch += 1
            if len(self._live) > LIVE_MAX:  # tasks that never ended here (a lost runner): forget them
                self._live.clear()
            return rows

    def sent(self, msg: Any) -> None:
        """A task this worker sends (a retry, a workflow's next step, a call in
        a task's code): ``greenq.message.Codec.sent_sink``."""
        row = sent_row(msg)
        with self._guard:
            self.rows.append(row)

    # -- subscribers --------------------------------------------------------------
    def _row(self, task_id: str, name: Optional[str], entry: Any, event: Tuple[Any, ...]) -> List[Any]:
        """The task's row in this batch, ``event`` added to it."""
        if entry is not None and entry[1] == self._batch:
            row = entry[0]
            row.extend(event)
        else:
            row = [task_id, name, *event]
            self.rows.append(row)
        return row

    def _received(self, job: Any) -> None:
        msg = job.msg
        sent = int(msg.created * 1e6) if msg.created else None
        eta = int(msg.eta * 1e6) if msg.eta else None
        row = [msg.id, msg.task, RECEIVED, time_ns() // 1000, job.delivery.queue, sent,
               short_repr(msg.args) if msg.args else None, short_repr(msg.kwargs) if msg.kwargs else None,
               msg.retries or None, eta]
        self.rows.append(row)
        self._live[msg.id] = (row, self._batch, max(sent or 0, eta) if eta else sent, None)

    def _prerun(self, task: Any, request: Any) -> None:     # the hot path: _row inlined
        task_id = request.id
        entry = self._live.get(task_id)
        now = time_ns() // 1000
        if entry is not None:
            due = entry[2]
            waited = now - due if due and now > due else (0 if due else None)
            if entry[1] == self._batch:
                row = entry[0]
                row.extend((STARTED, now, waited))
            else:
                row = [task_id, task.name, STARTED, now, waited]
                self.rows.append(row)
        else:
            row = [task_id, task.name, STARTED, now, None]
            self.rows.append(row)
        self._live[task_id] = (row, self._batch, None, monotonic_ns() // 1000)

    def _end(self, task_id: str, name: Optional[str], code: int, *fields: Any) -> None:
        entry = self._live.pop(task_id, None)
        self._row(task_id, name, entry, (code, time_ns() // 1000, *fields))

    def _runtime(self, task_id: str) -> Optional[int]:
        entry = self._live.get(task_id)
        start = entry[3] if entry is not None else None
        return monotonic_ns() // 1000 - start if start is not None else None

    def _success(self, task: Any, request: Any, retval: Any) -> None:      # the hot path: inlined
        task_id = request.id
        entry = self._live.pop(task_id, None)
        now = time_ns() // 1000
        runtime = monotonic_ns() // 1000 - entry[3] if entry is not None and entry[3] is not None else None
        if entry is not None and entry[1] == self._batch:
            entry[0].extend((SUCCEEDED, now, runtime))
        else:
            self.rows.append([task_id, task.name, SUCCEEDED, now, runtime])

    def _failure(self, task: Any, request: Any, exc: Any, traceback: Any) -> None:
        self._end(request.id, task.name, FAILED, self._runtime(request.id),
                  f"{type(exc).__name__}: {short_repr(str(exc))}", traceback)

    def _retry(self, task: Any, request: Any, reason: Any) -> None:
        self._end(request.id, task.name, RETRIED, self._runtime(request.id), short_repr(reason))

    def _revoked(self, job: Any) -> None:
        self._end(job.id, job.msg.task if job.msg else None, REVOKED, job.reason)

    def _dead(self, job: Any, reason: str) -> None:
        self._end(job.id, job.msg.task if job.msg else None, DEAD, reason)
