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

The autoscaling signals (docs/autoscaling.md) need no prometheus_client: a
worker's /metrics gives them for its own queues, the dashboard's /metrics for
every queue (an always-on process, for scaling from zero).  The broker is
asked at most every ``QUEUE_SIGNALS_CACHE`` seconds (``QueueSignals``) however
often /metrics is scraped:

=====================================  =====  ==============================================
greenq_queue_ready                     gauge  queue: ready to be fetched (due delayed included)
greenq_queue_held                      gauge  queue: leased to a worker (prefetched or running)
greenq_queue_delayed                   gauge  queue: waiting for their eta
greenq_queue_oldest_ready_age_seconds  gauge  queue: how long the oldest ready one has waited
                                              (0 when none is ready; left out where the
                                              broker cannot tell: RabbitMQ)
=====================================  =====  ==============================================
"""
from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence, Tuple

if TYPE_CHECKING:  # pragma: no cover
    from .brokers.base import QueueStats
    from .hooks import Hooks

log = logging.getLogger("greenq.monitor")

#: seconds; from a no-op to a slow HTTP call
RUNTIME_BUCKETS = (0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
WAIT_BUCKETS = (0.001, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)

#: seconds a queue_stats answer serves /metrics (a scrape every second asks the broker every 5 s)
QUEUE_SIGNALS_CACHE = 5.0
#: (metric, QueueStats field, help) of the autoscaling signals
QUEUE_SIGNALS = (
    ("greenq_queue_ready", "ready", "Messages ready to be fetched (due delayed ones included)"),
    ("greenq_queue_held", "held", "Messages leased to a worker and not acknowledged: prefetched or running"),
    ("greenq_queue_delayed", "delayed", "Messages waiting for their eta"),
    ("greenq_queue_oldest_ready_age_seconds", "oldest_ready_age",
     "Seconds the oldest ready message has waited (0 when none is ready)"),
)


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

    def render(self, broker: Any, queues: Any, stats: Optional[Sequence["QueueStats"]] = None) -> str:
        """The metrics in the text format, queue depths read now (skipped if
        the broker is away), or taken from ``stats`` when given."""
        from prometheus_client import generate_latest
        try:
            for q in (broker.queue_stats(queues) if stats is None else stats):
                for state in ("ready", "delayed", "held", "dead"):
                    self.depth.labels(q.name, state).set(getattr(q, state))
        except Exception as exc:
            log.warning("/metrics: could not read the queue depths: %s", exc)
        return generate_latest(self.registry).decode()


class QueueSignals:
    """The answer of ``figures()`` (``broker.queue_stats(queues)``, or the
    listing of ``greenq queues``) reused for ``cache`` seconds: scraping
    /metrics often stays cheap for the broker.  ``read`` gives None (and logs)
    when the broker does not answer; an answer is not shown past its time."""

    def __init__(self, cache: float = QUEUE_SIGNALS_CACHE) -> None:
        self.cache = cache
        self._lock = threading.Lock()
        self._last: Tuple[float, Optional[List["QueueStats"]]] = (float("-inf"), None)
        self._refresh: Optional[threading.Event] = None     # set when the refresh under way ends

    def read_within(self, figures: Callable[[], List["QueueStats"]], spawn: Callable[..., Any],
                    wait: float) -> Optional[List["QueueStats"]]:
        """``read``, for a caller that must answer within ``wait`` seconds
        (a worker's /metrics while its broker is slow or its connection busy):
        a stale answer starts one refresh in ``spawn`` (the driver's) and the
        caller waits at most ``wait`` for it, else gets the answer it had
        (nothing on a first read)."""
        with self._lock:
            when, stats = self._last
            if time.monotonic() - when < self.cache:
                return stats
            done = self._refresh
            if done is None:
                done = self._refresh = threading.Event()
                spawn(self._refreshed, figures, done)
        if done.wait(wait):
            return self._last[1]
        return stats

    def _refreshed(self, figures: Callable[[], List["QueueStats"]], done: threading.Event) -> None:
        try:
            stats: Optional[List["QueueStats"]] = list(figures())
        except Exception as exc:
            log.warning("/metrics: could not read the queues' figures: %s", exc)
            stats = None
        with self._lock:
            self._last = (time.monotonic(), stats)
            self._refresh = None
        done.set()

    def read(self, figures: Callable[[], List["QueueStats"]]) -> Optional[List["QueueStats"]]:
        with self._lock:
            when, stats = self._last
            if time.monotonic() - when < self.cache:
                return stats
            try:
                stats = list(figures())
            except Exception as exc:
                log.warning("/metrics: could not read the queues' figures: %s", exc)
                stats = None
            self._last = (time.monotonic(), stats)
            return stats


def render_queue_signals(stats: Optional[Sequence["QueueStats"]]) -> str:
    """The autoscaling gauges in Prometheus' text format ("" without figures)."""
    if not stats:
        return ""
    lines = []
    for metric, field, help_text in QUEUE_SIGNALS:
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} gauge"]
        for q in stats:
            value = getattr(q, field)
            if value is not None:
                lines.append(f'{metric}{{queue="{_label(q.name)}"}} {_number(value)}')
    return "\n".join(lines) + "\n"


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(value) if isinstance(value, int) else f"{value:.3f}"
