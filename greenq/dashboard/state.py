"""What the dashboard knows, built from the event stream: workers (their last
heartbeat), tasks (from task events), recent failures, and throughput over
the last minutes (from the heartbeats' counters, so it works without -E).

A background thread reads events (greenq/control/client.py) and reconnects
by itself; the web server's threads read snapshots under a lock.

Everything here comes from whoever can write to the broker, so each event is
checked field by field first (greenq.events.clean: a bad event is skipped, a
bad field dropped, both counted in ``stats()``, served as /api/stats), and
what is kept is bounded: at most ``WORKERS_KEPT`` workers (when a new one
comes, the one heard from longest ago goes), each forgotten ``FORGET_AFTER``
seconds after it was last heard from; ``TASKS_KEPT`` tasks, ``FAILURES_KEPT``
failures; for the Resources panel, at most ``RESOURCES_KEPT`` resources with
``BUCKETS`` points each.  A batch that still fails to apply is logged and passed over, never
read again.
"""
from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict, deque
from typing import Any, Callable, Deque, Dict, List, Optional

from ..backoff import Backoff
from ..control.agent import OFFLINE_AFTER
from ..control.base import Document
from ..events import Tally, clean_all

log = logging.getLogger("greenq.dashboard")

TASKS_KEPT = 5000
WORKERS_KEPT = 1000
FORGET_AFTER = 3600.0        # seconds without a word from a worker before it leaves the list
FAILURES_KEPT = 100
BUCKET = 5.0                 # seconds per throughput point
BUCKETS = 120                # ten minutes
RESOURCES_KEPT = 64          # resources the Resources panel follows (those heard of last)
HISTORY = 500                # event batches read back at start, where the broker keeps them
WORKER_FIELDS = ("hostname", "pid", "pool", "concurrency", "prefetch", "queues", "running", "held", "processed",
                 "succeeded", "failed", "retried", "rss", "version", "events", "uptime")
STATES = {"task-sent": "SENT", "task-received": "RECEIVED", "task-started": "STARTED", "task-succeeded": "SUCCESS",
          "task-failed": "FAILURE", "task-retried": "RETRY", "task-revoked": "REVOKED",
          "task-dead-lettered": "DEAD"}
FINAL = ("SUCCESS", "FAILURE", "REVOKED", "DEAD")


class FleetState:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.lock = threading.Lock()
        #: name -> its last worker event (checked), the one heard from longest ago first
        self.workers: "OrderedDict[str, Document]" = OrderedDict()
        self.tasks: "OrderedDict[str, Document]" = OrderedDict()
        self.failures: Deque[Document] = deque(maxlen=FAILURES_KEPT)
        self.buckets: Dict[int, List[float]] = {}          # bucket start -> [succeeded, failed]
        self.tally = Tally()
        self.forgotten = 0                                 # workers dropped (silent, or over the bound)
        self.batches_failed = 0                            # batches that raised in apply (a bug: logged)
        #: resource name -> {bucket start: [limit, in_use, waiting]}: the fleet's figures at the end
        #: of each BUCKET seconds (``_resource_tick``); the resource heard of last at the end
        self.resource_history: "OrderedDict[str, Dict[int, List[int]]]" = OrderedDict()
        self._resource_slot = -1

    # -- feeding -------------------------------------------------------------------
    def apply(self, events: Any) -> None:
        """Take a batch of events, each checked first (greenq.events.clean)."""
        if not isinstance(events, list):
            events = []
        with self.lock:
            for e in clean_all(events, self.tally):
                kind = e["type"]
                if kind.startswith("worker-"):
                    self._worker(kind, e)
                else:
                    self._task(kind, e)
            self._forget(self.clock() - FORGET_AFTER)

    def _worker(self, kind: str, e: Document) -> None:
        self._resource_tick()
        name = e["worker"]
        before = self.workers.pop(name, None)
        e["offline_event"] = kind == "worker-offline"
        e["heard"] = self.clock()
        self.workers[name] = e                              # heard from last: at the end
        while len(self.workers) > WORKERS_KEPT:
            self.workers.popitem(last=False)
            self.forgotten += 1
        if before is not None and before.get("boot") == e.get("boot"):
            self._count(e.get("timestamp") or self.clock(), _grown(before, e, "succeeded"),
                        _grown(before, e, "failed"))
        for resource in e.get("resources") or ():         # heard of last: at the end
            self.resource_history[resource] = self.resource_history.pop(resource, {})
        while len(self.resource_history) > RESOURCES_KEPT:
            self.resource_history.popitem(last=False)

    def _resource_tick(self) -> None:
        """Once per BUCKET seconds, at the first worker event of a new bucket
        (before it is applied): the last bucket's figures are final, noted as
        the fleet stood at its end.  The current bucket is read live."""
        slot = int(self.clock() // BUCKET * BUCKET)
        if slot == self._resource_slot:
            return
        last, self._resource_slot = self._resource_slot, slot
        if last < 0 or not self.resource_history:
            return
        for name, figures in self._fleet_resources(last + BUCKET).items():
            points = self.resource_history.get(name)
            if points is None:
                continue
            points[last] = [figures["limit"], figures["in_use"], figures["waiting"]]
            while len(points) > BUCKETS:
                del points[min(points)]

    def _fleet_resources(self, now: float) -> Dict[str, Document]:
        """Per resource, over the online workers' last heartbeats: permits in
        use and tasks waiting (sums), and the fleet's limit in force: the sum of
        the workers' limits, a ``host`` resource's at most its configured limit
        per machine and a ``cluster`` one's at most its configured limit."""
        out: Dict[str, Document] = {}
        per_host: Dict[Any, int] = {}
        for w in self.workers.values():
            if w["offline_event"] or now - w.get("timestamp", 0.0) >= OFFLINE_AFTER:
                continue
            for name, r in (w.get("resources") or {}).items():
                f = out.setdefault(name, {"name": name, "scope": r["scope"], "configured_limit": 0, "limit": 0,
                                          "in_use": 0, "waiting": 0, "workers": 0})
                f["scope"] = r["scope"]
                f["configured_limit"] = max(f["configured_limit"], r["configured_limit"])
                f["in_use"] += r["in_use"]
                f["waiting"] += r["waiting"]
                f["workers"] += 1
                if r["scope"] == "host":
                    key = (name, w.get("hostname"))
                    per_host[key] = per_host.get(key, 0) + r["limit"]
                else:
                    f["limit"] += r["limit"]
        for (name, _), limit in per_host.items():
            out[name]["limit"] += min(limit, out[name]["configured_limit"])
        for f in out.values():
            if f["scope"] == "cluster":
                f["limit"] = min(f["limit"], f["configured_limit"])
        return out

    def _forget(self, before: float) -> None:
        """Drop the workers last heard from before ``before`` (oldest first)."""
        while self.workers:
            name, oldest = next(iter(self.workers.items()))
            if oldest["heard"] >= before:
                return
            del self.workers[name]
            self.forgotten += 1

    def _count(self, when: float, succeeded: float, failed: float) -> None:
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
        task_id = e["uuid"]
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
            self._forget(now - FORGET_AFTER)
            out = []
            for name, w in sorted(self.workers.items()):
                seen = w.get("timestamp", 0.0)
                online = not w["offline_event"] and now - seen < OFFLINE_AFTER
                out.append({"name": name, "online": online, "last_heartbeat": seen,
                            "seconds_since_heartbeat": round(max(0.0, now - seen), 1),
                            **{k: w.get(k) for k in WORKER_FIELDS}})
            return out

    def resource_list(self) -> List[Document]:
        """The Resources panel: per resource the fleet's limit in force, in use
        and waiting now (``_fleet_resources``), and ``history``: one point per
        BUCKET seconds over the last BUCKETS (``t``, ``limit``, ``in_use``,
        ``waiting``), oldest first."""
        now = self.clock()
        with self.lock:
            current = self._fleet_resources(now)
            out = []
            for name in sorted(self.resource_history):
                figures = current.get(name) or {"name": name, "scope": None, "configured_limit": None,
                                                "limit": None, "in_use": None, "waiting": None, "workers": 0}
                points = dict(self.resource_history[name])
                slot = int(now // BUCKET * BUCKET)
                if name in current:                        # the bucket under way: as it stands
                    points[slot] = [figures["limit"], figures["in_use"], figures["waiting"]]
                history = [{"t": t, "limit": p[0], "in_use": p[1], "waiting": p[2]}
                           for t, p in sorted(points.items()) if t > now - BUCKETS * BUCKET]
                out.append({**figures, "history": history})
            return out

    def stats(self) -> Document:
        """What the reader made of the stream: events read, skipped and
        fields dropped (malformed), workers known and forgotten."""
        with self.lock:
            return {**self.tally.as_dict(), "batches_failed": self.batches_failed,
                    "workers": len(self.workers), "workers_forgotten": self.forgotten,
                    "workers_kept": WORKERS_KEPT, "forget_after": FORGET_AFTER}

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


def _grown(before: Document, after: Document, counter: str) -> float:
    """How much ``counter`` grew between two heartbeats of one boot; 0 when either lacks it."""
    old, new = before.get(counter), after.get(counter)
    return new - old if old is not None and new is not None else 0


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
        history = HISTORY                   # read back once: a reconnection would count it twice
        while self.running:
            control = None
            try:
                control = Control(self.app)
                for batch in control.events(history=history, poll=0.5):
                    history = 0
                    self._apply(batch)
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

    def _apply(self, batch: Any) -> None:
        """Feed one batch; one that fails (a bug: every event is checked first)
        is logged and passed over, never the reason to read it again."""
        try:
            self.state.apply(batch)
        except Exception:
            self.state.batches_failed += 1
            log.exception("dashboard: a batch of events could not be applied; passed over")
