"""Time limits and revocation: the reaper greenlet.

Soft and hard deadlines wait in a heap; the reaper fires each when it is due
by throwing an exception into the task's greenlet (or thread).  It also kills
the running tasks revoked with ``terminate=True`` when the worker learns of
the revoke (revocations.py).
"""
from __future__ import annotations

import heapq
import itertools
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Type

from ..exceptions import SoftTimeLimitExceeded
from . import jobs
from .jobs import Job

if TYPE_CHECKING:  # pragma: no cover
    from ..drivers.base import Driver

log = logging.getLogger("greenq.worker")

KILL_MESSAGES = {SoftTimeLimitExceeded: "soft time limit exceeded", jobs.HardKill: "hard time limit: killed",
                 jobs.Terminate: "revoked: terminated", jobs.Abandon: "cold shutdown: abandoned"}


@dataclass(order=True, slots=True)
class Deadline:
    when: float                                   # monotonic seconds
    seq: int
    job: Job = field(compare=False)
    exc: Type[BaseException] = field(compare=False)


class Reaper:
    """``running``: the worker's running jobs by id (read under ``lock``);
    ``stopped``: set when the worker's consumer ended (the loop ends once
    nothing runs)."""

    def __init__(self, driver: "Driver", lock: Any, running: Dict[Job, Job], stopped: Any) -> None:
        self.driver = driver
        self.running = running
        self.stopped = stopped
        self.deadlines: List[Deadline] = []
        self._seq = itertools.count()
        self._lock = lock

    def arm(self, job: Job, soft: Optional[float], hard: Optional[float]) -> None:
        """Start the clocks of a task that is about to run."""
        if not (soft or hard):
            return
        now = time.monotonic()
        with self._lock:
            if soft:
                heapq.heappush(self.deadlines, Deadline(now + soft, next(self._seq), job, SoftTimeLimitExceeded))
            if hard:
                heapq.heappush(self.deadlines, Deadline(now + hard, next(self._seq), job, jobs.HardKill))

    def loop(self) -> None:
        while not (self.stopped.is_set() and not self.running):
            now = time.monotonic()
            self._fire_due(now)
            wait = 0.1
            if self.deadlines:
                wait = min(wait, max(0.005, self.deadlines[0].when - now))
            self.driver.sleep(wait)

    def _fire_due(self, now: float) -> None:
        running = self.running
        while True:
            with self._lock:
                if not self.deadlines or self.deadlines[0].when > now:
                    return
                due = heapq.heappop(self.deadlines)
                job = due.job
                if job not in running or job.outcome is not None:
                    continue
                if not job.started:              # not yet scheduled: check again shortly
                    heapq.heappush(self.deadlines, Deadline(now + 0.05, next(self._seq), job, due.exc))
                    return
            self.kill(job, due.exc)

    def kill(self, job: Job, exc: Type[BaseException]) -> None:
        """Throw ``exc`` into ``job`` if it still runs.  Checked, marked
        (``job.kill_sent``) and thrown under the worker's lock, under which the
        runner takes the job out of ``running`` when it ends: a job that ended
        unmarked can no longer be aimed at, so its runner goes on without
        waiting for a late kill (runners.py)."""
        with self._lock:
            if job not in self.running or job.outcome is not None:
                return                      # it ended meanwhile: a kill now would hit the runner's next task
            if exc is jobs.HardKill or exc is jobs.Terminate:
                job.killed_by = exc
            job.kill_sent = True
            job.handle.kill(exc)            # never switches: the kill is delivered at the job's next switch
        assert job.msg is not None, "a job runs only once its message decoded"
        log.warning("task %s[%s]: %s", job.msg.task, job.msg.id, KILL_MESSAGES[exc])

    def terminate(self, task_ids: List[str]) -> None:
        """Kill the running tasks among ``task_ids`` (revoked with terminate)."""
        if not task_ids:
            return
        wanted = set(task_ids)
        for job in list(self.running.values()):
            if (job.msg is not None and job.msg.id in wanted and job.started
                    and job.outcome is None and job.killed_by is None):
                self.kill(job, jobs.Terminate)
