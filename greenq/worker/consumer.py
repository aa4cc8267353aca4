"""The worker core: fetch with backpressure, run, store, acknowledge.

Greenlets (or threads, with the threads driver) of one worker:

* consumer  -- fetches up to the free prefetch room, decodes, dead-letters what
               cannot run, starts tasks while slots are free, queues the rest;
* runners   -- ``concurrency`` long-lived greenlets (or threads), each running
               one task at a time (``jobs.run``) from the local run queue;
* finisher  -- takes finished jobs in batches: publishes retries, stores the
               results in one call, then acknowledges in one call (late ack);
* renewer   -- renews the lease of every held message in one call per lease/3;
* reaper    -- fires soft and hard time limits, and revoke(terminate=True).

The last three are the control plane: they run outside the task limit, so a
full pool never starves them (DESIGN.md lesson 4).
"""
from __future__ import annotations

import heapq
import itertools
import logging
import queue as std_queue
import time
import traceback
from typing import Any, Callable, Dict, List, Optional, Sequence

from ..backends.base import Record
from ..config import effective_prefetch
from ..brokers.base import Delivery
from ..exceptions import MessageError, SoftTimeLimitExceeded
from ..message import TaskMessage
from ..result import FAILURE, RETRY, REVOKED, SUCCESS, make_meta
from . import jobs
from .jobs import Job

log = logging.getLogger("greenq.worker")

BURST_WAIT_FOR_DELAYED = 30.0   # --burst waits for delayed messages due within this many seconds
FETCH_BATCH_MAX = 500
KILLS = (SoftTimeLimitExceeded, jobs.HardKill, jobs.Abandon, jobs.Terminate)


#: errors that retrying the same call cannot cure: bad data, not an outage
PERMANENT_ERRORS = (TypeError, ValueError, KeyError, AttributeError, RecursionError, MessageError)


def _describe(exc: BaseException) -> str:
    try:
        return f"{type(exc).__name__}: {str(exc)[:300]}"
    except Exception:
        return type(exc).__name__


class _Plan:
    """What settling one batch takes, gathered before any call is made."""
    __slots__ = ("records", "republish", "acks", "requeue", "unstarted", "dead")

    def __init__(self) -> None:
        self.records: List[Record] = []
        self.republish: List[Any] = []
        self.acks: List[Delivery] = []
        self.requeue: List[Delivery] = []        # started, then returned (cold stop)
        self.unstarted: List[Delivery] = []      # never began: delivery count not raised
        self.dead: List[tuple] = []              # (delivery, reason)


class _Runner:
    """One long-lived runner; ``handle`` is its greenlet or thread."""
    __slots__ = ("handle",)


class Stats:
    """Counters for /metrics and `inspect stats`."""

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


class Worker:
    """One worker process's consumer.  ``run()`` returns the exit code."""

    def __init__(self, app: Any, driver: Any, *, queues: Sequence[str], concurrency: int,
                 prefetch: int = 0, burst: bool = False, shutdown_timeout: float = 30.0,
                 fetch_timeout: float = 1.0, max_tasks: int = 0) -> None:
        self.app = app
        self.driver = driver
        app.set_driver(driver)
        self.config = app.config
        self.queues = list(queues)
        self.concurrency = 1 if driver.name == "solo" else max(1, concurrency)
        self.prefetch = effective_prefetch(self.concurrency, prefetch)
        self.batch = min(self.prefetch, FETCH_BATCH_MAX)
        self.burst = burst
        self.shutdown_timeout = shutdown_timeout
        self.fetch_timeout = fetch_timeout
        self.max_tasks = max_tasks
        self.codec = app.codec
        self.broker = app.broker
        self.stats = Stats()
        self.lock = driver.lock()
        self.held: Dict[int, Delivery] = {}      # every message leased to us, by id(delivery)
        self.running: Dict[int, Job] = {}        # by id(job)
        self.runq = driver.queue()               # received, waiting for a free runner
        self.runners: List[Any] = []
        self.done = driver.queue()               # finished jobs for the finisher
        self.room = driver.event()               # set when held shrinks
        self.stopped = driver.event()            # set when the consumer loop ended
        self.deadlines: List[tuple] = []         # heap of (when, seq, job, exception)
        self._seq = itertools.count()
        self.stopping = 0                        # 0 running, 1 warm, 2 cold
        self.last_poll = time.monotonic()
        self.tasks_done = 0
        self.exit_code = 0
        self.failed: Optional[str] = None        # the control greenlet that died, if one did
        self.settling_since: Optional[float] = None  # monotonic start of the batch being settled
        self._next_slot: Dict[str, float] = {}   # rate limits: next free start time per task

    # -- public --------------------------------------------------------------
    def run(self) -> int:
        self.broker.declare(self.queues)
        self.backend = self.app.backend
        log.info("worker ready: pool=%s concurrency=%d prefetch=%d queues=%s",
                 self.driver.name, self.concurrency, self.prefetch, ",".join(self.queues))
        self.runners = [self._spawn_runner() for _ in range(self.concurrency)]
        finisher = self.driver.spawn(self._guarded, "finisher", self._finisher)
        self.driver.spawn(self._guarded, "renewer", self._renewer)
        self.driver.spawn(self._guarded, "reaper", self._reaper)
        try:
            self._guarded("consumer", self._consume)
        finally:
            self._shutdown(finisher)
        return self.exit_code

    def _guarded(self, name: str, loop: Callable[[], None]) -> None:
        """Run one control loop.  Each loop handles per-message errors itself;
        if one dies anyway, the worker must not stay up without it: /healthz
        answers 503 naming it, and the worker stops with exit code 1 so that
        its supervisor (systemd, the --processes supervisor) replaces it."""
        try:
            loop()
        except BaseException as exc:
            if isinstance(exc, KILLS) or type(exc).__name__ == "GreenletExit":
                raise
            self.failed = name
            self.exit_code = 1
            log.critical("the worker's %s died: %s; stopping with exit code 1 so that it is replaced",
                         name, _describe(exc), exc_info=True)
            self.request_stop(cold=True)
            self.stopped.set()

    def request_stop(self, cold: bool = False) -> None:
        """Warm stop (first call) or cold stop (second call, or cold=True).
        Safe to call from a signal handler: it only sets flags and events."""
        if cold or self.stopping:
            if self.stopping < 2:
                log.warning("cold shutdown: stopping running tasks and returning their messages")
            self.stopping = 2
        else:
            log.info("warm shutdown: finishing running tasks (up to %.0f s)", self.shutdown_timeout)
            self.stopping = 1
        self.room.set()
        try:
            self.broker.interrupt()
        except Exception:  # pragma: no cover - best effort
            pass

    # -- consumer ------------------------------------------------------------
    def _consume(self) -> None:
        backoff = 0.1
        while not self.stopping:
            room = self.prefetch - len(self.held)
            if room <= 0:                         # backpressure: fetch nothing while full
                self.room.clear()
                if self.prefetch - len(self.held) <= 0 and not self.stopping:
                    self.room.wait(1.0)
                self.last_poll = time.monotonic()
                continue
            try:
                deliveries = self.broker.fetch(self.queues, min(room, self.batch), self.fetch_timeout)
                backoff = 0.1
            except Exception as exc:
                log.error("fetch failed: %s; retrying in %.1f s", exc, backoff)
                self.driver.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            self.last_poll = time.monotonic()
            if deliveries:
                self._accept(deliveries)
            elif self.burst and not self.held and self._burst_done():
                log.info("burst: queues are empty, stopping")
                self.request_stop()
        self.stopped.set()

    def _burst_done(self) -> bool:
        try:
            return self._nothing_due()
        except Exception as exc:   # the broker is away: ask again on the next empty fetch
            log.warning("burst: could not read the queues' state: %s", exc)
            return False

    def _nothing_due(self) -> bool:
        """--burst: nothing delayed is due soon and no other consumer holds a
        message (a dead one's come back when its lease runs out)."""
        due = self.broker.next_due(self.queues)
        if due is not None and due <= time.time() + BURST_WAIT_FOR_DELAYED:
            return False
        return not any(s.held for s in self.broker.queue_stats(self.queues))

    def _accept(self, deliveries: List[Delivery]) -> None:
        now = time.time()
        max_deliveries = self.config.max_deliveries
        tasks = self.app.tasks
        ready: List[Job] = []
        for d in deliveries:
            self.held[id(d)] = d
            job = Job(d)
            try:
                reason = self._refusal(job, now, max_deliveries, tasks)
            except Exception as exc:        # a bug of ours must not strand the message
                log.error("message %s could not be accepted", d.message_id, exc_info=True)
                reason = f"worker error while accepting it: {_describe(exc)}"
            if reason == "expired":
                self._finish(job, jobs.REVOKED, reason="expired")
            elif reason:
                self._finish(job, jobs.DEAD, reason=reason)
            else:
                ready.append(job)
        self.stats.received += len(deliveries)
        if not ready:
            return
        revoked = self._revoked(ready)
        for job in ready:
            if job.msg.id in revoked:
                self._finish(job, jobs.REVOKED, reason="revoked")
            else:
                self.runq.put(job)

    def _refusal(self, job: Job, now: float, max_deliveries: int, tasks: Dict[str, Any]) -> Optional[str]:
        """Why this delivery will not run (a dead-letter reason, or "expired"), or None."""
        d = job.delivery
        if d.error:
            return f"bad transport metadata: {d.error}"
        if d.deliveries > max_deliveries:
            return f"delivered {d.deliveries} times (max_deliveries={max_deliveries})"
        try:
            msg = self.codec.decode(d.body)
        except MessageError as exc:
            return f"undecodable: {exc}"
        job.msg = msg
        job.task = tasks.get(msg.task)
        if job.task is None:
            return f"unknown task {msg.task!r}"
        if msg.expires is not None and msg.expires < now:
            return "expired"
        return None

    # -- runners -------------------------------------------------------------
    def _spawn_runner(self) -> "_Runner":
        runner = _Runner()
        runner.handle = self.driver.spawn(self._runner, runner)
        return runner

    def _runner(self, runner: "_Runner") -> None:
        """Run jobs one after another.  A kill is aimed at one job; one that
        arrives after that job ended lands in the ``sleep(0)`` below (the hub
        delivers it before resuming us) or in ``get``, and is ignored there."""
        sleep = self.driver.sleep
        while True:
            try:
                job = self.runq.get()
                if job is None:
                    return
                if self.stopping:               # shutting down: don't start what has not started
                    self._finish(job, jobs.REQUEUE)
                    continue
                job.handle = runner.handle
                self._run(job)
                sleep(0)
            except KILLS:
                continue
            except Exception:   # never lose the runner: _run has settled the job already
                log.error("runner error (the runner goes on)", exc_info=True)

    def _run(self, job: Job) -> None:
        try:
            soft, hard = jobs.limits(job)
        except Exception:                       # a bad [task:NAME] value: run without limits
            log.error("task %s[%s]: unusable time limits", job.msg.task, job.msg.id, exc_info=True)
            soft = hard = None
        with self.lock:
            self.running[id(job)] = job
            if soft or hard:
                now = time.monotonic()
                if soft:
                    heapq.heappush(self.deadlines, (now + soft, next(self._seq), job, SoftTimeLimitExceeded))
                if hard:
                    heapq.heappush(self.deadlines, (now + hard, next(self._seq), job, jobs.HardKill))
        try:
            try:
                if not job.task.option("acks_late"):   # at most once: acknowledged as it starts
                    self.broker.ack([job.delivery])
                    job.acked = True
                limiter = job.task.option("rate_limit")
                if limiter:
                    self._throttle(job.task.name, limiter)
            except Exception as exc:            # the task is not run; its caller is told why
                log.error("task %s[%s] could not be started: %s", job.msg.task, job.msg.id, _describe(exc))
                job.outcome, job.exc = jobs.FAILURE, exc
                job.tb = traceback.format_exc()
                return
            jobs.run(job)
        finally:
            while True:  # a thread's kill may arrive late, even here: finish the bookkeeping anyway
                try:
                    self._ran(job)
                    break
                except KILLS:
                    continue

    def _ran(self, job: Job) -> None:
        if job.outcome is None:                 # killed before it began
            job.outcome = jobs.REQUEUE
        with self.lock:
            self.running.pop(id(job), None)
            if job.settling:
                return
            job.settling = True
        self.done.put(job)

    def _throttle(self, name: str, rate: str) -> None:
        """A per-worker rate limit: the task waits for its slot (holding its pool slot)."""
        from ..config import parse_rate
        interval = 1.0 / parse_rate(rate)
        now = time.monotonic()
        with self.lock:
            slot = max(now, self._next_slot.get(name, 0.0))
            self._next_slot[name] = slot + interval
        if slot > now:
            self.driver.sleep(slot - now)

    def _finish(self, job: Job, outcome: str, reason: Optional[str] = None) -> None:
        """Hand a job that will not run to the finisher."""
        job.outcome, job.reason = outcome, reason
        self.done.put(job)

    # -- finisher ------------------------------------------------------------
    def _finisher(self) -> None:
        while True:
            first = self.done.get()             # shutdown ends it with None
            if first is None:
                return
            batch = [first]
            while len(batch) < 1000:
                try:
                    item = self.done.get(block=False)
                except std_queue.Empty:
                    break
                if item is None:
                    self.done.put(None)
                    break
                batch.append(item)
            self._settle(batch)

    def _settle(self, batch: List[Job]) -> None:
        """Publish retries, store results, then acknowledge: one call each.
        A job whose record cannot be built is stored as a FAILURE saying why;
        nothing in one job can stop the others from being settled."""
        self.settling_since = time.monotonic()
        plan = _Plan()
        for job in batch:
            try:
                self._plan(job, plan)
            except Exception as exc:
                log.error("task %s: its outcome could not be recorded", job.id, exc_info=True)
                self._plan_failure(job, plan, exc)
        self._with_retries("publish retries", self.broker.publish_many, plan.republish)
        self._with_retries("store results", self.backend.store_many, plan.records,
                           on_permanent=self._store_fallback)
        self._with_retries("acknowledge", self.broker.ack, plan.acks)
        self._with_retries("requeue", self.broker.requeue, plan.requeue)
        self._with_retries("requeue", lambda ds: self.broker.requeue(ds, started=False), plan.unstarted)
        self._with_retries("dead-letter", self._dead_letter_each, plan.dead)
        with self.lock:
            for job in batch:
                self.held.pop(id(job.delivery), None)
        self.tasks_done += len(batch)
        self.settling_since = None
        self.room.set()
        if self.max_tasks and self.tasks_done >= self.max_tasks and not self.stopping:
            log.info("max_tasks_per_child reached (%d): stopping to be replaced", self.max_tasks)
            self.request_stop()

    def _plan(self, job: Job, plan: "_Plan") -> None:
        """Add what settling ``job`` takes to ``plan``."""
        encode = self.codec.encode_result
        outcome, msg = job.outcome, job.msg
        if outcome == jobs.DEAD:
            plan.dead.append((job.delivery, job.reason))
            self.stats.dead_lettered += 1
            log.warning("message %s dead-lettered: %s", job.delivery.message_id, job.reason)
            return
        if outcome == jobs.REQUEUE:
            (plan.requeue if job.started else plan.unstarted).append(job.delivery)
            return
        if outcome == jobs.REJECT:
            if job.exc.requeue:
                plan.requeue.append(job.delivery)
            else:
                plan.dead.append((job.delivery, f"rejected: {job.reason}"))
            return
        ignore = job.task is not None and job.task.option("ignore_result")
        if outcome == jobs.SUCCESS:
            self.stats.succeeded += 1
            if not ignore:
                plan.records.append(Record(msg.id, encode(make_meta(
                    msg.id, SUCCESS, result=job.value, task=msg.task, retries=msg.retries)),
                    True, msg.reply_to))
        elif outcome == jobs.FAILURE:
            self.stats.failed += 1
            plan.records.append(Record(msg.id, encode(make_meta(
                msg.id, FAILURE, exc=job.exc, traceback=job.tb, task=msg.task,
                retries=msg.retries)), True, msg.reply_to))
        elif outcome == jobs.RETRY:
            self.stats.retried += 1
            retry = TaskMessage(task=msg.task, args=msg.args, kwargs=msg.kwargs, id=msg.id,
                                queue=msg.queue, priority=msg.priority, eta=job.exc.when,
                                expires=msg.expires, retries=msg.retries + 1,
                                root_id=msg.root_id, time_limit=msg.time_limit,
                                soft_time_limit=msg.soft_time_limit, reply_to=msg.reply_to)
            outgoing = self.app._outgoing(retry)
            plan.records.append(Record(msg.id, encode(make_meta(
                msg.id, RETRY, exc=job.exc.exc or job.exc, task=msg.task,
                retries=msg.retries + 1)), False, msg.reply_to))
            plan.republish.append(outgoing)
        elif outcome == jobs.REVOKED:
            self.stats.revoked += 1
            plan.records.append(Record(msg.id, encode(make_meta(
                msg.id, REVOKED, task=msg.task, reason=job.reason)), True, msg.reply_to))
        if not job.acked:
            plan.acks.append(job.delivery)

    def _plan_failure(self, job: Job, plan: "_Plan", exc: BaseException) -> None:
        """The fallback of ``_plan``: store a FAILURE naming the error and
        acknowledge (a message that is not a task at all is dead-lettered)."""
        msg = job.msg
        if msg is None:
            plan.dead.append((job.delivery, f"worker error while settling it: {_describe(exc)}"))
            return
        error = MessageError(f"the worker could not record this task's outcome: {_describe(exc)}")
        plan.records.append(Record(msg.id, self.codec.encode_result(make_meta(
            msg.id, FAILURE, exc=error, task=msg.task, retries=msg.retries)), True, msg.reply_to))
        if not job.acked:
            plan.acks.append(job.delivery)

    def _store_fallback(self, record: Record, exc: BaseException) -> None:
        """A record the backend refuses for good (too large, say): store a
        small FAILURE in its place, once."""
        error = MessageError(f"the result could not be stored: {_describe(exc)}")
        small = Record(record.task_id, self.codec.encode_result(make_meta(record.task_id, FAILURE, exc=error)),
                       record.final, record.reply_to)
        try:
            self.backend.store_many([small])
        except Exception as again:
            log.error("task %s: not even a failure record could be stored: %s", record.task_id, _describe(again))

    def _dead_letter_each(self, items: List[tuple]) -> None:
        for delivery, reason in items:
            self.broker.dead_letter(delivery, reason)

    def _with_retries(self, what: str, fn: Callable[[List[Any]], None], items: List[Any],
                      on_permanent: Optional[Callable[[Any, BaseException], None]] = None) -> None:
        """Call ``fn(items)`` until it succeeds: a result is never acknowledged
        unstored.  An error that retrying cannot cure (bad data, not a broker
        outage) is narrowed down by calling ``fn`` with one item at a time;
        the items that fail alone with such an error are logged and handed to
        ``on_permanent``, the rest go on.  Gives up only at cold shutdown,
        leaving the messages unacknowledged (they come back: at-least-once)."""
        delay = 0.1
        while items:
            try:
                fn(items)
                return
            except PERMANENT_ERRORS as exc:
                items = self._one_by_one(what, fn, items, exc, on_permanent)
                if not items:
                    return
                err: BaseException = exc
            except Exception as exc:
                err = exc
            if self.stopping >= 2 and delay > 1:
                log.error("%s failed at shutdown, giving up (messages will be redelivered): %s", what, err)
                return
            log.error("%s failed: %s; retrying in %.1f s", what, _describe(err), delay)
            self.driver.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _one_by_one(self, what: str, fn: Callable[[List[Any]], None], items: List[Any],
                    first: BaseException, on_permanent: Optional[Callable[[Any, BaseException], None]]
                    ) -> List[Any]:
        """Retry ``items`` singly after a permanent-looking error; return those
        that failed with a transient one (to be retried as a batch)."""
        transient = []
        for item in items:
            try:
                fn([item])
            except PERMANENT_ERRORS as exc:
                log.error("%s: giving up on %r: %s", what, item, _describe(exc))
                if on_permanent is not None:
                    on_permanent(item, exc)
            except Exception:
                transient.append(item)
        return transient

    # -- control plane -------------------------------------------------------
    def _renewer(self) -> None:
        interval = max(0.2, self.config.lease_seconds / 3.0)
        while not (self.stopped.is_set() and not self.held):
            self.driver.sleep(interval)
            held = list(self.held.values())
            if held:
                try:
                    self.broker.renew(held)
                except Exception as exc:
                    log.warning("lease renewal failed: %s", exc)

    def _reaper(self) -> None:
        """Fire time limits; every second, kill running tasks revoked with terminate."""
        next_revoke_check = time.monotonic() + 1.0
        while not (self.stopped.is_set() and not self.running):
            now = time.monotonic()
            while self.deadlines and self.deadlines[0][0] <= now:
                _, _, job, exc = heapq.heappop(self.deadlines)
                if id(job) not in self.running or job.outcome is not None:
                    continue
                if not job.started:              # not yet scheduled: check again shortly
                    heapq.heappush(self.deadlines, (now + 0.05, next(self._seq), job, exc))
                    break
                self._kill(job, exc)
            if now >= next_revoke_check:
                next_revoke_check = now + 1.0
                self._terminate_revoked()
            wait = 0.1
            if self.deadlines:
                wait = min(wait, max(0.005, self.deadlines[0][0] - now))
            self.driver.sleep(wait)

    def _kill(self, job: Job, exc: type) -> None:
        if exc is jobs.HardKill or exc is jobs.Terminate:
            job.killed_by = exc
        log.warning("task %s[%s]: %s", job.msg.task, job.msg.id, {
            SoftTimeLimitExceeded: "soft time limit exceeded", jobs.HardKill: "hard time limit: killed",
            jobs.Terminate: "revoked: terminated", jobs.Abandon: "cold shutdown: abandoned"}[exc])
        job.handle.kill(exc)

    def _revoked(self, batch: List[Job]) -> Dict[str, bool]:
        """Revoked ids of ``batch`` (id -> terminate); none when the backend is unreachable."""
        try:
            return self.backend.revoked([j.msg.id for j in batch])
        except Exception as exc:
            log.warning("could not read revocations: %s", exc)
            return {}

    def _terminate_revoked(self) -> None:
        running = [j for j in list(self.running.values()) if j.started]
        if not running:
            return
        revoked = self._revoked(running)
        for job in running:
            if revoked.get(job.msg.id) and job.outcome is None and job.killed_by is None:
                self._kill(job, jobs.Terminate)

    # -- shutdown ------------------------------------------------------------
    def _shutdown(self, finisher: Any) -> None:
        """Warm: let running tasks finish within shutdown_timeout, return the
        backlog.  Cold (or time out): kill the rest and return their messages."""
        self.stopping = max(self.stopping, 1)
        self.stopped.set()
        try:                                    # AMQP: basic.cancel, so nothing more arrives
            self.broker.stop_consuming()
        except Exception as exc:
            log.warning("could not stop consuming cleanly: %s", _describe(exc))
        while True:                             # received but not started: back to the queue
            try:
                job = self.runq.get(block=False)
            except std_queue.Empty:
                break
            if job is not None:
                self._finish(job, jobs.REQUEUE)
        deadline = time.monotonic() + self.shutdown_timeout
        while self.running and self.stopping < 2 and time.monotonic() < deadline:
            self.driver.sleep(0.05)
        if self.running:
            if self.stopping < 2:
                log.warning("shutdown_timeout passed with %d task(s) running", len(self.running))
            self.stopping = 2
            for job in list(self.running.values()):
                if job.outcome is None:
                    self._kill(job, jobs.Abandon)
            abandon_deadline = time.monotonic() + 2.0
            while self.running and time.monotonic() < abandon_deadline:
                self.driver.sleep(0.02)
        # settle what finished; a thread still stuck in C code after its kill is not waited for
        stuck = {id(job.delivery) for job in list(self.running.values())}
        finisher_deadline = time.monotonic() + 10.0
        while (set(self.held) - stuck) and time.monotonic() < finisher_deadline and not finisher.dead:
            self.driver.sleep(0.02)
        self.done.put(None)
        finisher.join(5.0)
        for _ in self.runners:
            self.runq.put(None)
        leftover = list(self.held.values())
        if leftover:  # whatever was not settled goes back to the queue
            log.warning("returning %d unsettled message(s) to the queue", len(leftover))
            try:
                self.broker.requeue(leftover)
            except Exception as exc:
                log.error("could not return %d message(s): %s (their leases will expire)", len(leftover), exc)
        log.info("worker stopped: %d succeeded, %d failed, %d retried, %d dead-lettered",
                 self.stats.succeeded, self.stats.failed, self.stats.retried, self.stats.dead_lettered)
