"""The worker's state as others see it: the stop state, the messages held,
the counters (a hook subscriber), and the snapshot that the monitor and the
fleet view read instead of reaching into the worker.

``Stop`` and ``Held`` are built by the assembly (greenq/worker/assembly.py)
before the Worker, and shared by it and its parts: the settler releases
settled messages into ``Held``, which asks ``Stop`` for a stop after
``max_tasks``; the runners and the settler read ``Stop.state``.  So no part
needs a callback into the Worker."""
from __future__ import annotations

import enum
import logging
import os
import re
import socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Protocol

if TYPE_CHECKING:  # pragma: no cover
    from ..brokers.base import Delivery
    from ..hooks import Hooks
    from .jobs import Job

log = logging.getLogger("greenq.worker")


class StopState(enum.IntEnum):
    """Ordered: a stop only ever moves up."""
    RUNNING = 0
    WARM = 1     # stop fetching, let running tasks finish within shutdown_timeout
    COLD = 2     # stop now, return every unfinished message


class Stop:
    """The worker's stop state (``state``, a StopState) and the request that
    moves it up.  ``room`` is set and ``interrupt`` (the broker's) called so
    that a consumer waiting for room or for messages sees the stop at once."""

    def __init__(self, room: Any, interrupt: Callable[[], None], shutdown_timeout: float) -> None:
        self.state = StopState.RUNNING
        self.room = room
        self.interrupt = interrupt
        self.shutdown_timeout = shutdown_timeout

    def request(self, cold: bool = False) -> None:
        """Warm stop, or cold stop with ``cold=True``; asking again for a warm
        stop changes nothing (the stop signals' "a second SIGTERM is cold"
        is decided by greenq/worker/signals.py, which calls this).
        Safe to call from a signal handler: it sets flags and events first,
        and only then logs, guarded (a signal that lands while this thread is
        writing a log line makes a second write raise "reentrant call"; the
        stop must not be lost with it)."""
        before = self.state
        if before and not cold:
            return
        self.state = StopState.COLD if cold else StopState.WARM
        self.room.set()
        try:
            self.interrupt()
        except Exception:  # pragma: no cover - best effort
            pass
        try:
            if self.state == StopState.WARM:
                log.info("warm shutdown: finishing running tasks (up to %.0f s)", self.shutdown_timeout)
            elif before < StopState.COLD:
                log.warning("cold shutdown: stopping running tasks and returning their messages")
        except Exception:  # noqa: S110 - the flags are set; a lost log line is all it costs
            pass


class Held:
    """The messages leased to the worker (``messages``, each delivery by
    itself: a Delivery hashes by identity, and an ``id()`` key was one more
    int, 32 bytes, a message in flight) and
    the sum of their bodies' lengths (``bytes``), under ``lock``.  The
    consumer adds what it fetched; the settler ``release``s what it settled,
    which sets ``room`` and, after ``max_tasks`` (0: never), requests a warm
    stop so that the worker is replaced."""

    def __init__(self, lock: Any, room: Any, stop: Stop, max_tasks: int) -> None:
        self.lock = lock
        self.room = room
        self.stop = stop
        self.max_tasks = max_tasks
        self.messages: Dict["Delivery", "Delivery"] = {}
        self.bytes = 0
        self.done = 0                          # messages settled so far

    def add(self, deliveries: List["Delivery"]) -> None:
        with self.lock:
            for d in deliveries:
                self.messages[d] = d
                self.bytes += len(d.body)

    def release(self, batch: List["Job"]) -> None:
        """The settler settled ``batch``: make room for more."""
        with self.lock:
            for job in batch:
                if self.messages.pop(job.delivery, None) is not None:
                    self.bytes -= len(job.delivery.body)
        self.done += len(batch)
        self.room.set()
        if self.max_tasks and self.done >= self.max_tasks and not self.stop.state:
            log.info("max_tasks_per_child reached (%d): stopping to be replaced", self.max_tasks)
            self.stop.request()


class Stats:
    """Counters for /metrics, the summary line and ``inspect stats``.  The
    runners count the tasks that succeeded, failed and retried themselves
    (plain integer increments on ``succeeded``, ``failed``, ``retried``: one
    per task, where a hook subscriber was a call through ``Hooks.emit``);
    the rest are kept by subscribing to the worker's hooks."""

    def __init__(self) -> None:
        self.started = time.time()
        self.received = 0
        self.succeeded = 0
        self.failed = 0
        self.retried = 0
        self.dead_lettered = 0
        self.revoked = 0
        self.hub_blocked = 0
        self.hub_blocked_seconds = 0.0

    def subscribe(self, hooks: "Hooks") -> None:
        hooks.on("messages_received", self._received)
        hooks.on("task_revoked", self._revoked)
        hooks.on("message_dead_lettered", self._dead)

    def _received(self, count: int) -> None:
        self.received += count

    def _revoked(self, job: Any) -> None:
        self.revoked += 1

    def _dead(self, job: Any, reason: str) -> None:
        self.dead_lettered += 1

    def as_dict(self) -> Dict[str, Any]:
        return {k: v for k, v in vars(self).items()}


@dataclass(frozen=True)
class RunningTask:
    id: str
    name: str
    args: Any
    kwargs: Any
    started: float          # epoch seconds the task began (0 while waiting for its rate-limit slot)


@dataclass(frozen=True)
class Snapshot:
    """One consistent look at a worker, taken under its lock."""
    pool: str
    concurrency: int
    prefetch: int
    queues: List[str]
    stopping: StopState
    failed: Optional[str]                 # the control loop that died, if one did
    seconds_since_poll: float
    seconds_settling: float               # how long the settler has been on its current batch
    held: int
    running: List[RunningTask] = field(default_factory=list)


class Service(Protocol):
    """Something that runs beside a worker (the control agent): the
    composition root attaches it with ``Worker.attach``; ``start`` gets a
    ``spawn(name, loop)`` that runs ``loop`` as a guarded control loop (one
    that stops the worker if it dies)."""

    def start(self, spawn: Callable[[str, Callable[[], None]], Any]) -> None: ...

    def stop(self) -> None: ...


#: the name of a worker started without ``-n`` (Celery's ``celery@%h``)
DEFAULT_NAME = "greenq@%h"


def worker_name(name: Optional[str] = None, index: int = 0) -> str:
    """``-n NAME`` (default ``greenq@%h``) with Celery's expansions: ``%h``
    the host name, ``%n`` the host name up to its first dot, ``%d`` the rest
    (the domain), ``%i`` the process index (``index``: the supervisor's slot,
    0 for a single process), ``%p`` the pid, ``%%`` a percent sign."""
    host = socket.gethostname()
    short, _, domain = host.partition(".")
    values = {"h": host, "n": short, "d": domain, "i": str(index), "p": str(os.getpid()), "%": "%"}
    return re.sub(r"%([hndip%])", lambda m: values[m.group(1)], name or DEFAULT_NAME)
