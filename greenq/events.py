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
task-failed        ``runtime``, ``exception``, ``traceback`` (its last
                   ``TRACEBACK_MAX`` characters, after a line saying how many were cut)
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
per ``EVENTS_BATCH_MAX`` rows (control/base.py), with one call to the C JSON encoder and no Python work
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

**What a reader keeps** (:func:`clean`).  Anybody who can write to the broker
can write to the event stream, so every reader (the dashboard, ``greenq
events``) checks each event field by field before it uses it.  An event whose
``type`` is not one of the documented types, or whose identity (a worker
event's ``worker``, a task event's ``uuid``) is not a name, is skipped; any
other field of the wrong type is dropped (the page shows it blank); fields that
are not documented are dropped too, so what a reader holds per event is
bounded.  Names (worker, task, queue, host, ids) are printable strings of at
most ``NAME_MAX`` characters; counters are finite numbers from 0 to
``COUNT_MAX``; times and durations finite numbers from 0 to ``TIME_MAX``;
``queues`` a list of at most ``NAMES_MAX`` names; a heartbeat's
``resources`` at most ``RESOURCES_MAX`` names, each a ``scope`` and the
counts ``RESOURCE_FIELDS``; texts (reprs, exception,
reason) strings cut at ``TEXT_MAX`` characters, a traceback at
``TRACEBACK_MAX``.  A :class:`Tally` counts what was read, skipped and
dropped.
"""
from __future__ import annotations

import json
import math
from collections import deque
from contextlib import nullcontext
from time import monotonic_ns, time_ns
from typing import TYPE_CHECKING, Any, Callable, Deque, Dict, Iterable, List, Optional, Sequence, Tuple

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
WORKER_EVENTS = ("worker-online", "worker-heartbeat", "worker-offline")
ROWS_MAX = 100000             # rows kept while the broker is away (the oldest are dropped)
LIVE_MAX = 200000             # tasks between received and done that are remembered

#: what a reader keeps (see "What a reader keeps" above)
NAME_MAX = 200                # characters of a name
NAMES_MAX = 64                # names in a list (a heartbeat's queues)
TEXT_MAX = 400                # characters of a repr, an exception, a reason
TRACEBACK_MAX = 4000          # characters of a traceback: its end, where the exception is
COUNT_MAX = 2 ** 53           # a counter beyond (or a float not exact) is not believed
TIME_MAX = 253402300799.0     # the end of year 9999, in epoch seconds

_encode = json.JSONEncoder(separators=(",", ":"), default=repr, check_circular=False).encode


def short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= REPR_MAX else text[:REPR_MAX - 3] + "..."


def trim_traceback(text: Any) -> Optional[str]:
    """The last ``TRACEBACK_MAX`` characters of a traceback (the innermost
    frames and the exception), after a line saying how many were cut; None
    for what is not a string."""
    if not isinstance(text, str):
        return None
    if len(text) <= TRACEBACK_MAX:
        return text
    kept = text[len(text) - TRACEBACK_MAX:]
    return f"... ({len(text) - len(kept)} characters cut)\n{kept}"


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
        if type(value) is int and abs(value) <= _US_MAX:
            event[key] = value / 1e6
        elif value is not None and not (type(value) is float and math.isfinite(value)):
            del event[key]                # a time that is not one (or too large for a float)
    out.append(event)


_US_MAX = int(TIME_MAX * 1e6)
_BAD = object()          # what a field check returns for a value of the wrong type


def _name(value: Any) -> Any:
    if isinstance(value, str) and 0 < len(value) <= NAME_MAX and value.isprintable():
        return value
    return _BAD


def _names(value: Any) -> Any:
    if isinstance(value, list) and len(value) <= NAMES_MAX and all(_name(v) is not _BAD for v in value):
        return value
    return _BAD


def _number(top: float) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if type(value) is int and 0 <= value <= top:
            return value
        if type(value) is float and 0 <= value <= top:      # (NaN compares false)
            return value
        return _BAD
    return check


def _text(limit: int) -> Callable[[Any], Any]:
    def check(value: Any) -> Any:
        if not isinstance(value, str):
            return _BAD
        return value if len(value) <= limit else value[:limit - 3] + "..."
    return check


def _flag(value: Any) -> Any:
    return value if type(value) is bool else _BAD


RESOURCES_MAX = 32            # resources in a heartbeat (greenq/resources/observe.py HEARTBEAT_RESOURCES)
RESOURCE_FIELDS = ("limit", "configured_limit", "in_use", "waiting")
SCOPES = ("process", "host", "cluster")


def _resources(value: Any) -> Any:
    """A heartbeat's ``resources``: at most RESOURCES_MAX names, each a
    ``scope`` and the counts of RESOURCE_FIELDS (nothing else is kept)."""
    if not isinstance(value, dict) or len(value) > RESOURCES_MAX:
        return _BAD
    out = {}
    for name, entry in value.items():
        if _name(name) is _BAD or not isinstance(entry, dict) or entry.get("scope") not in SCOPES:
            return _BAD
        counts = {k: entry.get(k) for k in RESOURCE_FIELDS}
        if any(_count(v) is _BAD for v in counts.values()):
            return _BAD
        out[name] = {"scope": entry["scope"], **counts}
    return out


def _traceback(value: Any) -> Any:
    text = trim_traceback(value)
    return _BAD if text is None else text


_count, _time = _number(COUNT_MAX), _number(TIME_MAX)
#: every documented field but ``type``, and its check
FIELD_CHECKS: Dict[str, Callable[[Any], Any]] = {
    **dict.fromkeys(("worker", "uuid", "name", "queue", "parent_id", "root_id", "hostname", "version",
                     "pool", "boot"), _name),
    **dict.fromkeys(("timestamp", "sent", "eta", "expires", "runtime", "queue_wait", "started", "uptime",
                     "freq"), _time),
    **dict.fromkeys(("retries", "pid", "concurrency", "prefetch", "running", "held", "processed", "received",
                     "succeeded", "failed", "retried", "dead_lettered", "revoked", "rss"), _count),
    **dict.fromkeys(("args", "kwargs", "exception", "reason"), _text(TEXT_MAX)),
    "traceback": _traceback, "queues": _names, "stopping": _flag, "events": _flag,
    "resources": _resources,
}
KNOWN_TYPES = frozenset(TASK_EVENTS + WORKER_EVENTS)


class Tally:
    """What a reader made of the events it was given: ``read`` events,
    ``skipped`` (not an event, an unknown type, an identity that is not a
    name), ``dropped`` fields (of the wrong type)."""

    __slots__ = ("read", "skipped", "dropped")

    def __init__(self) -> None:
        self.read = self.skipped = self.dropped = 0

    def as_dict(self) -> Dict[str, int]:
        return {"events_read": self.read, "events_skipped": self.skipped, "fields_dropped": self.dropped}


def clean(event: Any, tally: Tally) -> Optional[Dict[str, Any]]:
    """``event`` with only its documented fields of the right type, or None
    when it is not an event a reader can use (see "What a reader keeps");
    ``tally`` counts it.  Never raises, whatever ``event`` holds."""
    tally.read += 1
    kind = event.get("type") if isinstance(event, dict) else None
    identity = "worker" if kind in WORKER_EVENTS else "uuid"
    if not isinstance(kind, str) or kind not in KNOWN_TYPES or _name(event.get(identity)) is _BAD:
        tally.skipped += 1
        return None
    out: Dict[str, Any] = {"type": kind}
    for key, value in event.items():
        check = FIELD_CHECKS.get(key) if isinstance(key, str) else None
        if check is None or value is None:
            continue                                     # not documented, or absent
        value = check(value)
        if value is _BAD:
            tally.dropped += 1
        else:
            out[key] = value
    return out


def clean_all(events: Iterable[Any], tally: Tally) -> List[Dict[str, Any]]:
    """The events of ``events`` a reader can use, each :func:`clean`."""
    return [e for e in (clean(event, tally) for event in events) if e is not None]


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
                  f"{type(exc).__name__}: {short_repr(str(exc))}", trim_traceback(traceback))

    def _retry(self, task: Any, request: Any, reason: Any) -> None:
        self._end(request.id, task.name, RETRIED, self._runtime(request.id), short_repr(reason))

    def _revoked(self, job: Any) -> None:
        self._end(job.id, job.msg.task if job.msg else None, REVOKED, job.reason)

    def _dead(self, job: Any, reason: str) -> None:
        self._end(job.id, job.msg.task if job.msg else None, DEAD, reason)
