"""What the dashboard knows, built from the event stream: workers (their last
heartbeat), tasks (from task events), recent failures, and throughput over
the last minutes (from the heartbeats' counters, so it works without -E).

A background thread reads events (greenq/control/client.py) and reconnects
by itself; the web server's threads read snapshots under a lock.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

from ..backoff import Backoff
from ..control.agent import OFFLINE_AFTER
from ..control.base import Document

log = logging.getLogger("greenq.dashboard")

TASKS_KEPT = 5000
FAILURES_KEPT = 100
BUCKET = 5.0                 # seconds per throughput point
BUCKETS = 120                # ten minutes
HISTORY = 500                # event batches read back at start, where the broker keeps them
STATES = {"task-sent": "SENT", "task-received": "RECEIVED", "task-started": "STARTED", "task-succeeded": "SUCCESS",
          "task-failed": "FAILURE", "task-retried": "RETRY", "task-revoked": "REVOKED",
          "task-dead-lettered": "DEAD"}
FINAL = ("SUCCESS", "FAILURE", "REVOKED", "DEAD")


class FleetState:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.lock = threading.Lock()
        self.workers: Dict[str, Document] = {}
        self.tasks: "OrderedDict[str, Document]" = OrderedDict()
        self.failures: Deque[Document] = deque(maxlen=FAILURES_KEPT)
        self.buckets: Dict[int, List[int]] = {}            # bucket start -> [succeeded, failed]
        self._counters: Dict[Tuple[str, str], Tuple[int, int]] = {}   # (worker, boot) -> (succeeded, failed)

    # -- feeding -------------------------------------------------------------------
    def apply(self, events: List[Document]) -> None:
        with self.lock:
            for e in events:
                kind = e.get("type") if isinstance(e, dict) else None
                if not isinstance(kind, str):
                    continue
                if kind.startswith("worker-"):
                    self._worker(kind, e)
                elif kind in STATES:
                    self._task(kind, e)

    def _worker(self, kind: str, e: Document) -> None:
        name = e.get("worker")
        if not isinstance(name, str):
            return
        info = dict(e)
        info["offline_event"] = kind == "worker-offline"
        self.workers[name] = info
        key = (name, str(e.get("boot")))
        now = (int(e.get("succeeded") or 0), int(e.get("failed") or 0))
        before = self._counters.get(key)
        self._counters[key] = now
        if before is not None:
            self._count(float(e.get("timestamp") or self.clock()), now[0] - before[0], now[1] - before[1])

    def _count(self, when: float, succeeded: int, failed: int) -> None:
        if succeeded <= 0 and failed <= 0:
            return
        slot = int(when // BUCKET * BUCKET)
        bucket = self.buckets.setdefault(slot, [0, 0])
        bucket[0] += max(0, succeeded)
        bucket[1] += max(0, failed)
        if len(self.buckets) > BUCKETS * 2:
            for old in sorted(self.buckets)[:-BUCKETS]:
                del self.buckets[old]

    def _task(self, kind: str, e: Document) -> None:
        task_id = e.get("uuid")
        if not isinstance(task_id, str):
            return
        task = self.tasks.pop(task_id, None) or {"id": task_id, "name": e.get("name")}
        self.tasks[task_id] = task                      # most recently changed last
        while len(self.tasks) > TASKS_KEPT:
            self.tasks.popitem(last=False)
        state = STATES[kind]
        if kind == "task-sent":      # by a client or another worker; may arrive after the worker's events
            task.setdefault("state", state)
            task["sent_by"] = e.get("worker")
            task.setdefault("sent", e.get("timestamp"))
            task.setdefault("updated", e.get("timestamp"))
            for key in ("args", "kwargs", "queue", "eta", "expires", "parent_id", "root_id"):
                if e.get(key) is not None:
                    task.setdefault(key, e[key])
            return
        if task.get("state") not in FINAL or state in FINAL:
            task["state"] = state
        task["worker"] = e.get("worker")
        task["updated"] = e.get("timestamp")
        task["name"] = task.get("name") or e.get("name")
        for key in ("args", "kwargs", "queue", "sent", "runtime", "queue_wait", "exception",
                    "traceback", "reason", "retries"):
            if e.get(key) is not None:
                task[key] = e[key]
        if kind == "task-received":
            task["received"] = e.get("timestamp")
        elif kind == "task-started":
            task["started"] = e.get("timestamp")
        elif kind == "task-failed":
            self.failures.appendleft(dict(task))

    # -- reading -------------------------------------------------------------------
    def worker_list(self) -> List[Document]:
        now = self.clock()
        with self.lock:
            out = []
            for name, w in sorted(self.workers.items()):
                seen = float(w.get("timestamp") or 0)
                online = not w["offline_event"] and now - seen < OFFLINE_AFTER
                out.append({"name": name, "online": online, "last_heartbeat": seen,
                            "seconds_since_heartbeat": round(max(0.0, now - seen), 1),
                            **{k: w.get(k) for k in ("hostname", "pid", "pool", "concurrency", "prefetch",
                                                     "queues", "running", "held", "processed",
                                                     "succeeded", "failed", "retried", "rss",
                                                     "version", "events", "uptime")}})
            return out

    def task_list(self, search: str = "", state: str = "", limit: int = 100) -> List[Document]:
        search = search.strip().lower()
        with self.lock:
            out = []
            for task in reversed(self.tasks.values()):
                if state and task.get("state") != state:
                    continue
                if search and search not in task["id"].lower() and search not in str(task.get("name")).lower():
                    continue
                out.append({k: v for k, v in task.items() if k != "traceback"})
                if len(out) >= limit:
                    break
            return out

    def task(self, task_id: str) -> Optional[Document]:
        with self.lock:
            task = self.tasks.get(task_id)
            return dict(task) if task else None

    def failure_list(self, limit: int = 20) -> List[Document]:
        with self.lock:
            return list(self.failures)[:limit]

    def throughput(self) -> List[Document]:
        """One point per BUCKET seconds over the last BUCKETS, oldest first."""
        now = self.clock()
        last = int(now // BUCKET * BUCKET)
        with self.lock:
            return [{"t": slot, "succeeded": self.buckets.get(slot, [0, 0])[0],
                     "failed": self.buckets.get(slot, [0, 0])[1]}
                    for slot in range(last - (BUCKETS - 1) * int(BUCKET), last + 1, int(BUCKET))]


class EventReader:
    """The thread that feeds a FleetState from the broker's event stream."""

    def __init__(self, app: Any, state: FleetState) -> None:
        self.app = app
        self.state = state
        self.running = True
        self.thread = threading.Thread(target=self._run, name="greenq-dashboard-events", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.running = False

    def _run(self) -> None:
        from ..control.client import Control
        retry = Backoff(0.5, 10.0)
        while self.running:
            control = None
            try:
                control = Control(self.app)
                for batch in control.events(history=HISTORY, poll=0.5):
                    self.state.apply(batch)
                    retry.reset()
                    if not self.running:
                        break
            except Exception as exc:
                pause = retry.next()
                log.warning("dashboard: reading events failed: %s; retrying in %.1f s", exc, pause)
                time.sleep(pause)
            finally:
                if control is not None:
                    control.close()
