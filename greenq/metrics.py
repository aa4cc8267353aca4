"""Per-task Prometheus metrics for /metrics, as subscribers of the worker's
hooks (prometheus_client, the ``metrics`` extra):

====================================  =========  =========================================
metric                                type       labels
====================================  =========  =========================================
greenq_task_outcomes_total            counter    task, outcome (succeeded failed retried revoked)
greenq_task_runtime_seconds           histogram  task
greenq_task_queue_wait_seconds        histogram  task: from sent (or eta) to start
greenq_queue_messages                 gauge      queue, state (ready delayed held dead), read
                                                 from the broker at scrape time
====================================  =========  =========================================

The worker-wide counters (greenq_tasks_succeeded_total, ...) stay in
greenq/worker/monitor.py.  Without prometheus_client these metrics are left
out and a line saying so is logged once.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Dict, Optional

if TYPE_CHECKING:  # pragma: no cover
    from .hooks import Hooks

log = logging.getLogger("greenq.monitor")

#: seconds; from a no-op to a slow HTTP call
RUNTIME_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)


class TaskMetrics:
    """Counters and histograms per task name, in a registry of this worker's own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
        self.registry = CollectorRegistry(auto_describe=True)
        self.outcomes = Counter("greenq_task_outcomes", "Tasks finished, by task and outcome",
                                ["task", "outcome"], registry=self.registry)
        self.runtime = Histogram("greenq_task_runtime_seconds", "Task run time", ["task"],
                                 buckets=RUNTIME_BUCKETS, registry=self.registry)
        self.wait = Histogram("greenq_task_queue_wait_seconds", "Time from sent (or eta) to start",
                              ["task"], buckets=WAIT_BUCKETS, registry=self.registry)
        self.depth = Gauge("greenq_queue_messages", "Messages per queue and state", ["queue", "state"],
                           registry=self.registry)
        self._due: Dict[str, float] = {}        # task id -> sent (or eta), epoch
        self._start: Dict[str, float] = {}      # task id -> monotonic start

    @classmethod
    def create(cls) -> Optional["TaskMetrics"]:
        try:
            return cls()
        except ImportError:
            log.info("per-task metrics are off: pip install 'greenq[metrics]' for prometheus_client")
            return None

    def subscribe(self, hooks: "Hooks") -> None:
        hooks.on("task_received", self._received)
        hooks.on("task_prerun", self._prerun)
        hooks.on("task_success", lambda task, request, retval: self._done(task.name, request.id, "succeeded"))
        hooks.on("task_failure", lambda task, request, exc, tb: self._done(task.name, request.id, "failed"))
        hooks.on("task_retry", lambda task, request, reason: self._done(task.name, request.id, "retried"))
        hooks.on("task_revoked", self._revoked)

    def _received(self, job: Any) -> None:
        msg = job.msg
        self._due[msg.id] = max(msg.created or 0.0, msg.eta or 0.0)

    def _prerun(self, task: Any, request: Any) -> None:
        self._start[request.id] = time.monotonic()
        due = self._due.pop(request.id, None)
        if due:
            self.wait.labels(task.name).observe(max(0.0, time.time() - due))

    def _done(self, name: str, task_id: str, outcome: str) -> None:
        start = self._start.pop(task_id, None)
        if start is not None:
            self.runtime.labels(name).observe(time.monotonic() - start)
        self.outcomes.labels(name, outcome).inc()

    def _revoked(self, job: Any) -> None:
        self._due.pop(job.id, None)
        self._start.pop(job.id, None)
        self.outcomes.labels(job.msg.task if job.msg else "?", "revoked").inc()

    def render(self, broker: Any, queues: Any) -> str:
        """The metrics in the text format, queue depths read now (skipped if the broker is away)."""
        from prometheus_client import generate_latest
        try:
            for q in broker.queue_stats(queues):
                for state in ("ready", "delayed", "held", "dead"):
                    self.depth.labels(q.name, state).set(getattr(q, state))
        except Exception as exc:
            log.warning("/metrics: could not read the queue depths: %s", exc)
        return generate_latest(self.registry).decode()
