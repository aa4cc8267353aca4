"""Hub-blocking detection and the /metrics and /healthz endpoints.

Blocking detection (green drivers, on by default): a greenlet on the hub
records a heartbeat every ``threshold / 5`` seconds; a real OS thread, which
a stuck hub cannot stop, notices when the heartbeat is older than
``threshold`` and logs the blocking task, for how long, and its stack.  The
count and total blocked time go to /metrics, beside the per-task metrics of
greenq/metrics.py.

While the hub is blocked no greenlet runs, the reaper's neither: a task's
time limits cannot fire, and a task that blocks past its limit and then
returns is stored as it ended.  The warning says so, and the seconds the task
kept the hub blocked go into its result's meta as ``hub_blocked``
(``AsyncResult.hub_blocked``), so a task that overran its limit this way can
be told apart.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
import traceback
from types import FrameType
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Protocol, Tuple

from ..httpserve import Server, routes_app, serve
from ..metrics import QueueSignals, TaskMetrics, render_queue_signals
from ..resources.observe import WaitTimes, render_metrics
from .jobs import Job, limits
from .state import Snapshot, Stats

if TYPE_CHECKING:  # pragma: no cover
    from ..brokers.base import Broker
    from ..config import Config
    from ..drivers.base import Driver
    from ..hooks import Hooks

log = logging.getLogger("greenq.monitor")

#: set by the supervisor for its children: a file whose mtime the hub refreshes
HEARTBEAT_ENV = "GREENQ_SUPERVISOR_HEARTBEAT"
#: set by a supervisor serving --http: the file where a child writes its own /metrics port
HTTP_PORT_ENV = "GREENQ_SUPERVISOR_HTTP_PORT_FILE"


class FrameOwners(Protocol):
    """Who runs on a frame (greenq.worker.runners.Runners is one)."""

    def job_of_frame(self, frame: Optional[FrameType]) -> Optional[Job]: ...


class Monitored(Protocol):
    """What the monitor reads of a worker (greenq.worker.consumer.Worker is
    one): read-only, so a test may give any object with these."""

    @property
    def driver(self) -> "Driver": ...

    @property
    def hooks(self) -> "Hooks": ...            # the per-task metrics subscribe to them

    @property
    def stats(self) -> Stats: ...              # the counters, and where blocking episodes are counted

    @property
    def runners(self) -> FrameOwners: ...      # the task blocking the hub

    @property
    def broker(self) -> "Broker": ...          # healthy, and the queues' depths for /metrics

    @property
    def queues(self) -> List[str]: ...

    @property
    def fetch_timeout(self) -> float: ...

    @property
    def config(self) -> "Config": ...          # lease_seconds: how long settling may take

    def snapshot(self) -> Snapshot: ...

    def resource_stats(self) -> Dict[str, Dict[str, Any]]: ...    # per resource: limit, in use, waiting

    def resource_waits(self) -> Dict[str, WaitTimes]: ...          # the permit waits' histogram


class Monitor:
    def __init__(self, worker: Monitored, blocking_threshold: float, http: str,
                 port_file: Optional[str] = None) -> None:
        """``port_file``: set in a supervised child; serve on a free local port and write it there."""
        self.worker = worker
        self.port_file = port_file
        self.driver = worker.driver
        self.threshold = blocking_threshold
        self.http = http
        self.beat = time.monotonic()
        self._running = False
        self._server: Optional[Server] = None
        self._hub_ident = self.driver.os_thread_ident()
        #: the hub-blocking episode under way, as "open": (since, blocking job, its earlier hub_blocked)
        self._episode: "Dict[str, Tuple[float, Optional[Job], float]]" = {}
        self.heartbeat_file = os.environ.get(HEARTBEAT_ENV)
        self.task_metrics: Optional[TaskMetrics] = TaskMetrics.create() if http else None
        if self.task_metrics is not None:
            self.task_metrics.subscribe(worker.hooks)
        self.queue_signals = QueueSignals()     # this worker's queues, read at most every 5 s

    def start(self) -> None:
        self._running = True
        if self.threshold and self.driver.green:
            self.driver.spawn(self._ticker)
            self.driver.start_os_thread(self._watch)
        if self.http or self.port_file:
            self._serve()
        if self.heartbeat_file:
            self.driver.spawn(self._heartbeat)

    def stop(self) -> None:
        self._running = False
        self._end_episode()                  # on the hub: it runs, so any blocking is over
        if self._server is not None:
            self._server.server_close()

    def _heartbeat(self) -> None:
        """Tell the supervisor the hub runs: touch the file every second."""
        assert self.heartbeat_file is not None, "started only with a heartbeat file"
        while self._running:
            try:
                os.utime(self.heartbeat_file)
            except OSError:
                pass
            self.driver.sleep(1.0)

    # -- blocking detection ----------------------------------------------------
    def _ticker(self) -> None:
        interval = self.threshold / 5.0
        while self._running:
            self.beat = time.monotonic()
            self.driver.sleep(interval)

    def _watch(self) -> None:
        """The watchdog (a real OS thread).  While the hub is blocked it
        updates the blocking task's ``hub_blocked`` at every look, so the
        figure is there when the task's result is stored, even when that
        happens before this thread sees the hub run again."""
        interval = self.threshold / 5.0
        stats = self.worker.stats
        while self._running:
            self.driver.os_sleep(interval)
            age = time.monotonic() - self.beat
            episode = self._episode.get("open")
            if age > self.threshold:
                if episode is None:
                    frame = sys._current_frames().get(self._hub_ident)
                    blocker = self.worker.runners.job_of_frame(frame)
                    if blocker is not None and blocker.msg is None:
                        blocker = None
                    before = blocker.hub_blocked if blocker is not None else 0.0   # earlier episodes
                    episode = self._episode["open"] = (self.beat, blocker, before)
                    stats.hub_blocked += 1
                    self._warn_blocked(age, blocker, frame)
                _, blocker, before = episode
                if blocker is not None:
                    blocker.hub_blocked = before + age
            elif episode is not None:
                self._end_episode()

    def _end_episode(self) -> None:
        """Say the hub runs again.  Called by the watchdog when the ticker
        beats again, and by :meth:`stop` on the hub (a --burst worker can stop
        right after the blocking task, before the watchdog looks): whichever
        comes first takes the episode (``dict.pop`` is atomic) and reports it."""
        episode = self._episode.pop("open", None)
        if episode is None:
            return
        since, blocker, _ = episode
        end = self.beat if self.beat > since else time.monotonic()   # the ticker may not have run yet
        duration = end - since
        self.worker.stats.hub_blocked_seconds += duration
        who = f" (task {blocker.msg.task}[{blocker.msg.id}])" if blocker is not None and blocker.msg else ""
        log.warning("hub unblocked after %.2f s%s", duration, who)

    def _warn_blocked(self, age: float, job: Optional[Job], frame: Any) -> None:
        """The warning of one episode: who blocks the hub, that no time limit
        can fire meanwhile (naming the task's own limits), and the stack."""
        who, limit_note = "greenq itself", ""
        if job is not None and job.msg is not None:   # a running job: its message decoded
            who = f"task {job.msg.task}[{job.msg.id}]"
            try:
                soft, hard = limits(job.msg, job.task.resolved()) if job.task is not None else (None, None)
            except Exception:                  # a bad [task:NAME] value: the runner said so already
                soft = hard = None
            named = [f"{name} {value:g} s" for name, value in (("soft_time_limit", soft), ("time_limit", hard))
                     if value]
            if named:
                limit_note = f" (this task's {', '.join(named)})"
        stack = "".join(traceback.format_stack(frame)) if frame is not None else "(no stack)"
        log.warning("hub blocked for %.2f s (threshold %.2f s) by %s; every other greenlet is frozen, and "
                    "time limits cannot fire while the hub is blocked%s. A blocking C call or CPU loop? "
                    "Stack:\n%s", age, self.threshold, who, limit_note, stack)

    # -- HTTP ------------------------------------------------------------------
    def healthy(self) -> "tuple[bool, Dict[str, Any]]":
        w = self.worker
        snap = w.snapshot()
        broker_ok = w.broker.healthy
        limit = max(10.0, 5 * w.fetch_timeout)
        settle_ok = snap.seconds_settling < max(60.0, w.config.lease_seconds)   # results and acks flow
        ok = (snap.seconds_since_poll < limit and broker_ok and not snap.stopping and not snap.failed
              and settle_ok)
        return ok, {"status": "ok" if ok else "unhealthy", "seconds_since_poll": round(snap.seconds_since_poll, 3),
                    "broker_healthy": bool(broker_ok), "stopping": bool(snap.stopping),
                    "failed": snap.failed, "seconds_settling": round(snap.seconds_settling, 3),
                    "running": len(snap.running), "held": snap.held}

    def metrics(self) -> str:
        w, s = self.worker, self.worker.stats
        snap = w.snapshot()
        lines = []

        def metric(name: str, kind: str, value: float, help_text: str) -> None:
            lines.append(f"# HELP greenq_{name} {help_text}")
            lines.append(f"# TYPE greenq_{name} {kind}")
            lines.append(f"greenq_{name} {value}")
        metric("tasks_received_total", "counter", s.received, "Messages received")
        metric("tasks_succeeded_total", "counter", s.succeeded, "Tasks that succeeded")
        metric("tasks_failed_total", "counter", s.failed, "Tasks that failed")
        metric("tasks_retried_total", "counter", s.retried, "Task retries scheduled")
        metric("messages_dead_lettered_total", "counter", s.dead_lettered, "Messages dead-lettered")
        metric("tasks_revoked_total", "counter", s.revoked, "Tasks revoked or expired")
        metric("hub_blocked_total", "counter", s.hub_blocked, "Times the hub was blocked past the threshold")
        metric("hub_blocked_seconds_total", "counter", round(s.hub_blocked_seconds, 3),
               "Seconds the hub spent blocked")
        metric("tasks_running", "gauge", len(snap.running), "Tasks running now")
        metric("messages_held", "gauge", snap.held, "Messages leased to this worker")
        metric("messages_prefetched", "gauge", max(0, snap.held - len(snap.running)),
               "Messages leased to this worker and not started (docs/autoscaling.md)")
        metric("concurrency", "gauge", snap.concurrency, "Task slots")
        metric("up", "gauge", 1 if self.healthy()[0] else 0, "1 while the worker is consuming")
        text = "\n".join(lines) + "\n"
        text += render_metrics(w.resource_stats(), w.resource_waits())   # per resource (none: nothing)
        # cached 5 s; a slow broker (or a connection busy with a fetch) never holds the answer past 0.5 s
        queues = self.queue_signals.read_within(lambda: w.broker.queue_stats(list(w.queues)),
                                                self.driver.spawn, wait=0.5)
        text += render_queue_signals(queues)
        if self.task_metrics is not None:      # per task name, and the queues' depths
            text += self.task_metrics.render(w.broker, list(w.queues), queues or [])
        return text

    def _serve(self) -> None:
        address = "127.0.0.1:0" if self.port_file else self.http
        self._server = serve(address, routes_app({"/healthz": self._healthz, "/metrics": self._metrics}),
                             self.driver)
        port = self._server.server_address[1]
        if self.port_file:  # a supervised child: the supervisor serves HOST:PORT and asks us
            tmp = f"{self.port_file}.tmp"
            with open(tmp, "w") as fh:
                fh.write(str(port))
            os.replace(tmp, self.port_file)
        else:
            log.info("serving /metrics and /healthz on %s", self.http)

    def _healthz(self) -> "tuple[int, str, str]":
        ok, body = self.healthy()
        return 200 if ok else 503, json.dumps(body), "application/json"

    def _metrics(self) -> "tuple[int, str, str]":
        return 200, self.metrics(), METRICS_TYPE


METRICS_TYPE = "text/plain; version=0.0.4"
