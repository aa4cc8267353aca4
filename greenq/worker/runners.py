"""The runners: up to ``concurrency`` greenlets (or threads), each running
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

Under a green driver the runners are spawned on demand: work reaches the run
queue through ``submit``, which spawns one more runner when the items waiting
there outnumber the idle runners and fewer than ``concurrency`` exist (a
``TAKE`` counts: the job the chain grants needs a free runner).  An idle
runner costs a greenlet and its saved stack (8 KB); a worker at ``-c 10000``
with three tasks running has a handful, not 10,000.  Runners left idle go:
``trim`` (called by the worker's renewer loop) retires, every
``idle_seconds``, as many as stayed idle for the whole interval (the fewest
idle seen in it), keeping ``keep``.  Each runner is counted in ``count``
from its spawn until it is told to go (a retirement notice, None, in the run
queue, or its own check after a task: more runners than the concurrency,
after ``resize`` shrank it); ``idle`` counts the runners between two jobs
(from the spawn: a new runner is free).  Nothing else changes: a runner is
the same loop, the admission's ``take`` asks a free runner, kills aim at a
job's runner, the monitor finds a runner's frame.  Under threads (an OS
thread each) the ``concurrency`` runners start at once, as before.
"""
from __future__ import annotations

import logging
import os
import socket
import sys
import time
import traceback
from types import FrameType
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional, Set

from ..backends.base import Record
from ..exceptions import SoftTimeLimitExceeded, describe
from ..result import STARTED, make_meta
from ..task import set_request
from . import jobs
from .admission import TAKE
from .jobs import Job
from .state import Stats

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
#: seconds between two trims of idle runners (green drivers; ``Runners.idle_seconds``)
IDLE_SECONDS = 10.0
#: runners a trim keeps, however idle (``Runners.keep``)
KEEP = 10
#: jobs a runner may run one after another, each granted by the admission as
#: the one before ended, before it lets the hub run (``sleep(0)``)
HANDOFFS = 64
#: the state name given to task_postrun for each outcome
POSTRUN_STATE = {jobs.SUCCESS: "SUCCESS", jobs.FAILURE: "FAILURE", jobs.RETRY: "RETRY",
                 jobs.REJECT: "REJECTED", jobs.REVOKED: "REVOKED", jobs.REQUEUE: "REQUEUED"}


class Runner:
    """One runner; ``handle`` is its greenlet or thread, ``job`` the
    task it runs now, ``frame`` the frame of its loop (the monitor finds a
    task blocking the hub by walking up to it)."""
    __slots__ = ("handle", "job", "frame")

    def __init__(self) -> None:
        self.handle: Any = None
        self.job: Optional[Job] = None
        self.frame: Optional[FrameType] = None


class Runners:
    """The runners of one worker.  They get what they use: the run queue
    (jobs admitted to run, put by ``submit``; None retires a runner), the hooks, the broker (to
    acknowledge early), the worker's ``running`` jobs (under ``lock``), the
    ``revoked`` ids, the reaper (time limits), ``finish(job, outcome,
    reason)`` for a job that will not run, ``settle(job)`` for one that ran,
    ``release(job)`` (admission: the task ended) and ``stopping()``."""

    def __init__(self, driver: "Driver", runq: Any, hooks: "Hooks", broker: "Broker", *, lock: Any,
                 running: Dict[Job, Job], revoked: Any, reaper: "Reaper",
                 finish: Callable[..., None], settle: Callable[[Job], None],
                 release: Callable[[Job], None], stopping: Callable[[], "StopState"],
                 take: Optional[Callable[[bool], Optional[Job]]] = None,
                 stats: Optional[Stats] = None) -> None:
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
        #: the counters of tasks that succeeded, failed and retried (incremented here)
        self.stats = stats if stats is not None else Stats()
        self.all: Set[Runner] = set()
        self._by_frame: Dict[FrameType, Runner] = {}
        #: spawn runners as work comes (green drivers) rather than all at start
        self.on_demand = self.green = driver.green
        self.target = 0             # the concurrency: most runners at once
        self.count = 0              # runners spawned and not told to go
        self.idle = 0               # of those, the ones between two jobs (or not started yet)
        self.low = 0                # the fewest idle since the last trim
        self.keep = KEEP
        self.idle_seconds = IDLE_SECONDS
        self._trimmed = time.monotonic()
        # live lists: subscribers added later show in them
        self._prerun = hooks.live("task_prerun")
        self._success = hooks.live("task_success")
        self._postrun = hooks.live("task_postrun")
        # bound once, shared by every runner (a bound method made per runner is 48 B each)
        self._get, self._sleep = runq.get, driver.sleep

    def start(self, count: int) -> None:
        """Allow ``count`` runners at once (more: ``resize``); on demand, none
        is spawned before there is work, else all ``count`` now."""
        self.target += count
        if not self.on_demand:
            self._spawn(count)

    def submit(self, item: Any) -> None:
        """Put a job (or a ``TAKE``) in the run queue, spawning a runner for
        it when no idle one will take it and fewer than the concurrency run."""
        runq = self.runq
        runq.put(item)
        if self.count < self.target and self.idle < runq.qsize():
            self._spawn(1)

    def resize(self, concurrency: int) -> None:
        """Run ``concurrency`` tasks at once from now on.  Fewer: idle
        runners get a retirement notice (after the jobs queued before it),
        busy ones beyond the concurrency go after their task; more: under
        threads, the new runners start now; on demand, for the jobs waiting
        without a runner (the others as work comes)."""
        change = concurrency - self.target
        if not self.on_demand:
            if change > 0:
                self.target = concurrency
                self._spawn(change)
            else:
                self.count += change        # before the target: no runner leaves on its own
                self.target = concurrency
                self._notify(-change)
            return
        self.target = concurrency
        if change > 0:
            self._spawn(min(self.target - self.count, max(0, self.runq.qsize() - self.idle)))
        else:
            spare = min(self.count - concurrency, self.idle - self.runq.qsize())
            if spare > 0:
                self.count -= spare
                self._notify(spare)

    def trim(self, now: Optional[float] = None) -> int:
        """On demand: every ``idle_seconds``, retire the runners that stayed
        idle for the whole interval (the fewest idle seen in it), keeping
        ``keep``.  Returns how many were told to go."""
        if not self.on_demand:
            return 0
        now = time.monotonic() if now is None else now
        if now - self._trimmed < self.idle_seconds:
            return 0
        self._trimmed = now
        spare: int = min(self.low, self.idle - self.runq.qsize(), self.count - self.keep)
        self.low = self.idle
        if spare <= 0:
            return 0
        self.count -= spare
        self._notify(spare)
        return spare

    def stop(self) -> None:
        """Retire every runner (after the jobs queued before the notices)."""
        count, self.count, self.target = self.count, 0, 0
        self._notify(count)

    def _notify(self, count: int) -> None:
        put = self.runq.put
        for _ in range(count):
            put(None)

    def _spawn(self, count: int) -> None:
        spawn, enter = self.driver.spawn_light, self._enter
        for _ in range(count):
            runner = Runner()
            self.all.add(runner)
            self.count += 1
            self.idle += 1              # free from the start: the job it was spawned for is its
            runner.handle = spawn(enter, runner)

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
        except BaseException:               # ended by something else than its notice: no longer counted
            self.count -= 1
            raise
        finally:
            self._by_frame.pop(runner.frame, None)
            self.all.discard(runner)

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
        busy = False                         # counted idle (from the spawn) until it takes something
        granted: Any = None                  # a job the admission granted as the last one ended
        chained = 0
        while True:
            try:
                if busy:                     # back from a job (or a nudge): free again
                    busy = False
                    if granted is None and self.count > self.target:   # the pool shrank: this one goes
                        self.count -= 1
                        return
                    self.idle += 1
                job: Any
                job, granted = granted, None
                if job is None:
                    job = take(False)        # a job the admission grants to a free runner goes first
                taken = job is not None
                if job is None:
                    job = get()
                busy = True
                idle = self.idle = self.idle - 1
                if idle < self.low:
                    self.low = idle
                if taken and self.count < self.target and idle < self.runq.qsize():
                    self._spawn(1)           # the runner spawned for a queued TAKE took a grant instead
                if job is None:              # a retirement notice (counted out by who sent it)
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
        task, msg = job.task, job.msg
        assert msg is not None and task is not None, "a job runs only once its message decoded"
        options: Optional[Dict[str, Any]] = None
        try:                                    # the task's options, read once for the task
            options = task.resolved()
            soft, hard = jobs.limits(msg, options)
        except Exception:                       # a bad [task:NAME] value: run without limits
            log.error("task %s[%s]: unusable time limits", msg.task, msg.id, exc_info=True)
            soft = hard = None
        if self.green:          # one greenlet at a time, and no switch in here: no lock needed
            self.running[job] = job
        else:
            with self.lock:
                self.running[job] = job
        if soft or hard:
            self.reaper.arm(job, soft, hard)
        request = jobs.WorkerRequest(msg, job.delivery)
        set_request(request)
        start = time.monotonic()
        try:
            try:
                if not (options or task.resolved())["acks_late"]:   # at most once: acknowledged as it starts
                    self.broker.ack([job.delivery])
                    job.acked = True
                if self._prerun:
                    self.hooks.emit("task_prerun", task, request)
            except Exception as exc:            # the task is not run; its caller is told why
                log.error("task %s[%s] could not be started: %s", msg.task, msg.id, describe(exc))
                job.outcome, job.exc, job.tb = jobs.FAILURE, exc, traceback.format_exc()
            else:
                if msg.id in self.revoked:      # revoked during task_prerun
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
        """Log the outcome and run the outcome hooks, still in the task's
        context (``start``: its monotonic start); the counters count first
        (``stats``: plain integers, not a hook subscriber)."""
        hooks, outcome = self.hooks, job.outcome
        if outcome == jobs.SUCCESS:
            self.stats.succeeded += 1
            if self._success:
                hooks.emit("task_success", task, request, job.value)
        elif outcome == jobs.FAILURE:
            self.stats.failed += 1
            log.warning("task %s[%s] failed after %.3f s: %s", task.name, request.id,
                        time.monotonic() - start, describe(job.exc))
            hooks.emit("task_failure", task, request, job.exc, job.tb)
        elif outcome == jobs.RETRY:
            self.stats.retried += 1
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
        if self.green:          # as in _run: no switch between the check and the mark
            self.running.pop(job, None)
            if job.settling:
                return
            job.settling = True
        else:
            with self.lock:
                self.running.pop(job, None)
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
        #: the worker's name, in the ``hostname`` of a Celery STARTED record
        self.hostname = "greenq@" + socket.gethostname()

    def __call__(self, task: "Task", request: "Request") -> None:
        track = task.option("track_started")
        if not (self.default if track is None else track) or task.option("ignore_result"):
            return
        data = self.codec.encode_result(make_meta(request.id, STARTED, task=task.name, retries=request.retries))
        try:
            self._backend().store_many([Record(request.id, data, False, request.reply_to)])
            if request.delivery_info.get("queue") in self.codec.celery_queues:   # a Celery message
                backend = self._backend()
                if backend.celery_records:      # as Celery's worker: {"pid", "hostname"}
                    from ..celery.results import started
                    backend.store_celery([(request.id, started(request.id, os.getpid(), self.hostname,
                                                request.parent_id, request.group_id))])
        except Exception as exc:                # a missing STARTED must not fail the task
            log.warning("could not store STARTED: %s", describe(exc))
