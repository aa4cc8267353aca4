"""Task events (``-E`` / ``[worker] events = true``), as subscribers of the
worker's hooks.

Each event is a small dict appended to the control plane's outbox, which the
control greenlet publishes in batches (every half second, one broker call per
batch), so a task pays for a dict and an append, never for a round trip:

=================  ==========================================================
type               fields beside ``type``, ``uuid``, ``name``, ``worker``, ``timestamp``
=================  ==========================================================
task-received      ``args``, ``kwargs`` (reprs, cut at 200 characters; left out when
                   empty), ``queue``, ``retries`` (when > 0), ``sent`` (epoch the client
                   sent it), ``eta`` (when set)
task-started       ``queue_wait`` (seconds from sent, or eta, to start)
task-succeeded     ``runtime``
task-failed        ``runtime``, ``exception``, ``traceback``
task-retried       ``runtime``, ``reason``
task-revoked       ``reason`` (revoked, expired, terminated by revoke)
task-dead-lettered ``reason`` (the message could not run; ``name`` may be None)
=================  ==========================================================

Worker events (``worker-online``, ``worker-heartbeat``, ``worker-offline``)
are made by the control plane itself (greenq/control/agent.py).

On the wire the times (``MICROSECOND_FIELDS``) are whole microseconds: a
float costs JSON twice an int to write, and encoding is most of what events
cost.  ``greenq.control.client.Control.events`` turns them back into seconds
(floats), which is what ``greenq events``, the dashboard and this table show.
"""
from __future__ import annotations

from time import monotonic_ns, time_ns
from typing import TYPE_CHECKING, Any, Deque, Dict, Optional

if TYPE_CHECKING:  # pragma: no cover
    from .hooks import Hooks

REPR_MAX = 200
#: event fields sent as integer microseconds and read as float seconds
MICROSECOND_FIELDS = ("timestamp", "sent", "eta", "runtime", "queue_wait")
TASK_EVENTS = ("task-received", "task-started", "task-succeeded", "task-failed", "task-retried",
               "task-revoked", "task-dead-lettered")


def short_repr(value: Any) -> str:
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= REPR_MAX else text[:REPR_MAX - 3] + "..."


class TaskEvents:
    """Appends one event per task transition to ``outbox``."""

    def __init__(self, outbox: Deque[Dict[str, Any]], worker_name: str) -> None:
        self.outbox = outbox
        self.worker = worker_name
        self._sent: Dict[str, Optional[int]] = {}   # task id -> when it became due (sent, or eta), epoch µs
        self._started: Dict[str, int] = {}          # task id -> monotonic start, µs

    def subscribe(self, hooks: "Hooks") -> None:
        hooks.on("task_received", self._received)
        hooks.on("task_prerun", self._prerun)
        hooks.on("task_success", self._success)
        hooks.on("task_failure", self._failure)
        hooks.on("task_retry", self._retry)
        hooks.on("task_revoked", self._revoked)
        hooks.on("message_dead_lettered", self._dead)

    def _event(self, kind: str, task_id: Optional[str], name: Optional[str], **fields: Any) -> None:
        fields.update(type=kind, uuid=task_id, name=name, worker=self.worker, timestamp=time_ns() // 1000)
        self.outbox.append(fields)

    def _short(self, kind: str, task_id: str, name: str, key: str, value: Any) -> None:
        """The hot path (started, succeeded): one field beside the common ones."""
        self.outbox.append({"type": kind, "uuid": task_id, "name": name, "worker": self.worker,
                            "timestamp": time_ns() // 1000, key: value})

    def _runtime(self, task_id: str) -> Optional[int]:
        start = self._started.pop(task_id, None)
        return monotonic_ns() // 1000 - start if start is not None else None

    # -- subscribers -------------------------------------------------------------
    def _received(self, job: Any) -> None:
        msg = job.msg
        sent = int(msg.created * 1e6) if msg.created else None
        self._sent[msg.id] = max(sent or 0, int(msg.eta * 1e6)) if msg.eta else sent
        event = {"type": "task-received", "uuid": msg.id, "name": msg.task, "worker": self.worker,
                 "timestamp": time_ns() // 1000, "args": short_repr(msg.args), "queue": job.delivery.queue,
                 "sent": sent}
        if msg.kwargs:                        # fields at their default are left out: smaller batches
            event["kwargs"] = short_repr(msg.kwargs)
        if msg.retries:
            event["retries"] = msg.retries
        if msg.eta:
            event["eta"] = int(msg.eta * 1e6)
        self.outbox.append(event)

    def _prerun(self, task: Any, request: Any) -> None:
        self._started[request.id] = monotonic_ns() // 1000
        due = self._sent.pop(request.id, None)
        self._short("task-started", request.id, task.name, "queue_wait",
                    max(0, time_ns() // 1000 - due) if due else None)

    def _success(self, task: Any, request: Any, retval: Any) -> None:
        self._short("task-succeeded", request.id, task.name, "runtime", self._runtime(request.id))

    def _failure(self, task: Any, request: Any, exc: Any, traceback: Any) -> None:
        self._event("task-failed", request.id, task.name, runtime=self._runtime(request.id),
                    exception=f"{type(exc).__name__}: {short_repr(str(exc))}", traceback=traceback)

    def _retry(self, task: Any, request: Any, reason: Any) -> None:
        self._event("task-retried", request.id, task.name, runtime=self._runtime(request.id),
                    reason=short_repr(reason))

    def _revoked(self, job: Any) -> None:
        task_id = job.id
        self._sent.pop(task_id, None)
        self._started.pop(task_id, None)
        self._event("task-revoked", task_id, job.msg.task if job.msg else None, reason=job.reason)

    def _dead(self, job: Any, reason: str) -> None:
        self._event("task-dead-lettered", job.id, job.msg.task if job.msg else None, reason=reason)
