"""The runners: ``concurrency`` long-lived greenlets (or threads), each running
one task at a time from the worker's run queue, and the task hooks around it.

Around each task, in the task's greenlet, with its request set (so every log
line carries its id): ``task_prerun``; the task; then ``task_success``,
``task_failure`` or ``task_retry``; then ``task_postrun``.  The worker's own
STARTED records are a ``task_prerun`` subscriber (:class:`StartedRecorder`),
registered before the app's and only when some task needs them; a hook
without subscribers is not emitted at all (every task pays for the hot path).
Rate limits are not hooks: they are an admission step (admission.py), decided
before a task takes a runner, so a task waiting for its turn holds no runner.

A free runner first asks the admission chain for a job it grants now
(``take``: the tasks waiting for resource permits, whose permits are taken
for this runner at that moment), then takes the next job of the run queue; a
``TAKE`` found there is a nudge to ask the chain.
"""
from __future__ import annotations

import logging
import sys
import time
import traceback
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

from ..backends.base import Record
from ..exceptions import SoftTimeLimitExceeded, describe
from ..result import STARTED, make_meta
from ..task import set_request
from . import jobs
from .admission import TAKE
from .jobs import Job

if TYPE_CHECKING:  # pragma: no cover
    from ..brokers.base import Broker
    from ..drivers.base import Driver
    from ..hooks import Hooks
    from ..message import Codec
    from ..task import Request, Task
    from .limits import Reaper
    from .state import StopState

log = logging.getLogger("greenq.worker")

KILLS = (SoftTimeLimitExceeded, jobs.HardKill, jobs.Abandon, jobs.Terminate)
#: jobs a runner may run one after another, each granted by the admission as
#: the one before ended, before it lets the hub run (``sleep(0)``)
HANDOFFS = 64
#: the state name given to task_postrun for each outcome
POSTRUN_STATE = {jobs.SUCCESS: "SUCCESS", jobs.FAILURE: "FAILURE", jobs.RETRY: "RETRY",
                 jobs.REJECT: "REJECTED", jobs.REVOKED: "REVOKED", jobs.REQUEUE: "REQUEUED"}


class Runner:
    """One long-lived runner; ``handle`` is its greenlet or thread, ``job`` the
    task it runs now, ``frame`` the frame of its loop (the monitor finds a
    task blocking the hub by walking up to it)."""
    __slots__ = ("handle", "job", "frame")

    def __init__(self) -> None:
        self.handle: Any = None
        self.job: Optional[Job] = None
        self.frame: Optional[FrameType] = None


class Runners:
    """The runners of one worker.  They get what they use: the run queue
    (jobs admitted to run; None retires a runner), the hooks, the broker (to
    acknowledge early), the worker's ``running`` jobs (under ``lock``), the
    ``revoked`` ids, the reaper (time limits), ``finish(job, outcome,
    reason)`` for a job that will not run, ``settle(job)`` for one that ran,
    ``release(job)`` (admission: the task ended) and ``stopping()``."""

    def __init__(self, driver: "Driver", runq: Any, hooks: "Hooks", broker: "Broker", *, lock: Any,
                 running: Dict[int, Job], revoked: Any, reaper: "Reaper",
                 finish: Callable[..., None], settle: Callable[[Job], None],
                 release: Callable[[Job], None], stopping: Callable[[], "StopState"],
                 take: Optional[Callable[[bool], Optional[Job]]] = None) -> None:
        self.driver = driver
        self.runq = runq
        self.hooks = hooks
        self.broker = broker
        self.lock = lock
        self.running = running
        self.revoked = revoked
        self.reaper = reaper
        self.finish = finish
        self.settle = settle
        self.release = release
        self.stopping = stopping
        self.take = take if take is not None else (lambda token: None)
        self.all: List[Runner] = []
        self._by_frame: Dict[FrameType, Runner] = {}
        # live lists: subscribers added later show in them
        self._prerun = hooks.live("task_prerun")
        self._success = hooks.live("task_success")
        self._postrun = hooks.live("task_postrun")
        # bound once, shared by every runner (a bound method made per runner is 48 B each)
        self._get, self._sleep = runq.get, driver.sleep

    def start(self, count: int) -> None:
        spawn, enter = self.driver.spawn, self._enter
        for _ in range(count):
            runner = Runner()
            self.all.append(runner)
            runner.handle = spawn(enter, runner)

    def stop(self) -> None:
        for _ in self.all:
            self.runq.put(None)

    def job_of_frame(self, frame: Optional[FrameType]) -> Optional[Job]:
        """The job whose runner's stack holds ``frame`` (from any OS thread)."""
        while frame is not None:
            runner = self._by_frame.get(frame)      # frames hash by identity
            if runner is not None:
                return runner.job
            frame = frame.f_back
        return None

    # -- one runner --------------------------------------------------------------
    def _enter(self, runner: Runner) -> None:
        """A runner: its frame is the one ``job_of_frame`` knows it by, a
        small one (a frame object, made here, is sized by its code's locals:
        ``_loop``'s would be 0.1 KB more a runner); ``_loop`` below it is
        called Python to Python, with no C stack of its own."""
        runner.frame = sys._getframe()
        self._by_frame[runner.frame] = runner
        try:
            self._loop(runner)
        finally:
            self._by_frame.pop(runner.frame, None)

    def _loop(self, runner: Runner) -> None:
        """Run jobs one after another.  A kill is aimed at one job; one that
        arrives after that job ended lands in the ``sleep(0)`` below (the hub
        delivers it before resuming us) or in ``get``, and is ignored there.
        The reaper marks the job it throws a kill at (``kill_sent``, under the
        lock under which ``_ran`` takes the job out of ``running``): after a
        job that ended unmarked no kill can come, so the runner asks the
        admission for a job it grants now before that ``sleep(0)``, and runs it
        without waiting a pass of the hub (a permit its task just gave back,
        or parked with a connection, goes on at once), ``HANDOFFS`` times in
        a row at most (then it lets the hub run)."""
        sleep, get = self._sleep, self._get
        stopping, revoked, finish, take = self.stopping, self.revoked, self.finish, self.take
        granted: Any = None
        chained = 0
        while True:
            try:
                job: Any
                job, granted = granted, None
                if job is None:
                    job = take(False)        # a job the admission grants to a free runner goes first
                if job is None:
                    job = get()
                    if job is None:
                        return
                    if job is TAKE:
                        job = take(True)
                        if job is None:
                            continue
                if stopping():               # shutting down: don't start what has not started
                    finish(job, jobs.REQUEUE)
                    continue
                if job.msg.id in revoked:    # revoked while it waited for a runner
                    finish(job, jobs.REVOKED, reason="revoked")
                    continue
                job.handle = runner.handle
                runner.job = job
                self._run(job)
                runner.job = None
                if not job.kill_sent and chained < HANDOFFS:
                    granted = take(False)
                if granted is None:
                    chained = 0
                    sleep(0)
                else:
                    chained += 1
            except KILLS:
                runner.job = None
                continue
            except Exception:   # never lose the runner: _run has settled the job already
                runner.job = None
                log.error("runner error (the runner goes on)", exc_info=True)

    def _run(self, job: Job) -> None:
        task = job.task
        assert job.msg is not None and task is not None, "a job runs only once its message decoded"
        try:
            soft, hard = jobs.limits(job)
        except Exception:                       # a bad [task:NAME] value: run without limits
            log.error("task %s[%s]: unusable time limits", job.msg.task, job.msg.id, exc_info=True)
            soft = hard = None
        with self.lock:
            self.running[id(job)] = job
        if soft or hard:
            self.reaper.arm(job, soft, hard)
        request = jobs.request_for(job)
        set_request(request)
        start = time.monotonic()
        try:
            try:
                if not task.option("acks_late"):   # at most once: acknowledged as it starts
                    self.broker.ack([job.delivery])
                    job.acked = True
                if self._prerun:
                    self.hooks.emit("task_prerun", task, request)
            except Exception as exc:            # the task is not run; its caller is told why
                log.error("task %s[%s] could not be started: %s", job.msg.task, job.msg.id, describe(exc))
                job.outcome, job.exc, job.tb = jobs.FAILURE, exc, traceback.format_exc()
            else:
                if job.msg.id in self.revoked:     # revoked during task_prerun
                    job.outcome, job.reason = jobs.REVOKED, "revoked"
                else:
                    jobs.run(job)
            self._after(job, task, request, start)
        finally:
            while True:  # a thread's kill may arrive late, even here: finish the bookkeeping anyway
                try:
                    set_request(None)
                    self._ran(job)
                    break
                except KILLS:
                    continue

    def _after(self, job: Job, task: "Task", request: "Request", start: float) -> None:
        """Log the outcome and run the outcome hooks (the counters among their
        subscribers), still in the task's context (``start``: its monotonic start)."""
        hooks, outcome = self.hooks, job.outcome
        if outcome == jobs.SUCCESS:
            if self._success:
                hooks.emit("task_success", task, request, job.value)
        elif outcome == jobs.FAILURE:
            log.warning("task %s[%s] failed after %.3f s: %s", task.name, request.id,
                        time.monotonic() - start, describe(job.exc))
            hooks.emit("task_failure", task, request, job.exc, job.tb)
        elif outcome == jobs.RETRY:
            cause = getattr(job.exc, "exc", None)      # Retry(exc=...): what made the task retry
            log.info("task %s[%s] retry %d: %s%s", task.name, request.id, request.retries + 1, describe(job.exc),
                     f" (cause: {describe(cause)})" if cause is not None else "")
            hooks.emit("task_retry", task, request, str(job.exc))
        if log.isEnabledFor(logging.DEBUG):
            log.debug("task %s[%s] %s in %.3f s", task.name, request.id, outcome, time.monotonic() - start)
        if outcome is not None and self._postrun:
            retval = job.value if outcome == jobs.SUCCESS else job.exc
            hooks.emit("task_postrun", task, request, POSTRUN_STATE.get(outcome, outcome), retval)

    def _ran(self, job: Job) -> None:
        if job.admitted is not None:            # the task ended: its admission steps let go
            self.release(job)
        if job.outcome is None:                 # killed before it began
            job.outcome = jobs.REQUEUE
            if job.killed_by is jobs.HardKill:  # ...by its own hard limit (a hook ate its time)
                assert job.msg is not None, "a job runs only once its message decoded"
                job.outcome, job.exc = jobs.FAILURE, jobs.TimeLimitExceeded(
                    f"{job.msg.task}[{job.msg.id}] killed by its hard time limit before it started")
        with self.lock:
            self.running.pop(id(job), None)
            if job.settling:
                return
            job.settling = True
        self.settle(job)


class StartedRecorder:
    """``[worker] track_started`` (or the task option): store STARTED when a
    task begins, as Celery's ``task_track_started`` does.  One more write per
    task, so off by default."""

    def __init__(self, codec: "Codec", backend: Callable[[], Any], default: bool) -> None:
        """``default``: ``[worker] track_started``; ``backend()``: the result backend."""
        self.codec = codec
        self._backend = backend
        self.default = default

    def __call__(self, task: "Task", request: "Request") -> None:
        track = task.option("track_started")
        if not (self.default if track is None else track) or task.option("ignore_result"):
            return
        data = self.codec.encode_result(make_meta(request.id, STARTED, task=task.name, retries=request.retries))
        try:
            self._backend().store_many([Record(request.id, data, False, request.reply_to)])
        except Exception as exc:                # a missing STARTED must not fail the task
            log.warning("could not store STARTED: %s", describe(exc))
