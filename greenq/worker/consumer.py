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
from typing import Any, Dict, List, Optional, Sequence

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
        self._next_slot: Dict[str, float] = {}   # rate limits: next free start time per task

    # -- public --------------------------------------------------------------
    def run(self) -> int:
        self.broker.declare(self.queues)
        self.backend = self.app.backend
        log.info("worker ready: pool=%s concurrency=%d prefetch=%d queues=%s",
                 self.driver.name, self.concurrency, self.prefetch, ",".join(self.queues))
        self.runners = [self._spawn_runner() for _ in range(self.concurrency)]
        finisher = self.driver.spawn(self._finisher)
        self.driver.spawn(self._renewer)
        self.driver.spawn(self._reaper)
        try:
            self._consume()
        finally:
            self._shutdown(finisher)
        return self.exit_code

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
            elif self.burst and not self.held and self._nothing_due():
                log.info("burst: queues are empty, stopping")
                self.request_stop()
        self.stopped.set()

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
            if d.deliveries > max_deliveries:
                self._finish(job, jobs.DEAD, reason=f"delivered {d.deliveries} times "
                                                     f"(max_deliveries={max_deliveries})")
                continue
            try:
                msg = self.codec.decode(d.body)
            except MessageError as exc:
                self._finish(job, jobs.DEAD, reason=f"undecodable: {exc}")
                continue
            job.msg = msg
            job.task = tasks.get(msg.task)
            if job.task is None:
                self._finish(job, jobs.DEAD, reason=f"unknown task {msg.task!r}")
                continue
            if msg.expires is not None and msg.expires < now:
                self._finish(job, jobs.REVOKED, reason="expired")
                continue
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

    def _run(self, job: Job) -> None:
        soft, hard = jobs.limits(job)
        with self.lock:
            self.running[id(job)] = job
            if soft or hard:
                now = time.monotonic()
                if soft:
                    heapq.heappush(self.deadlines, (now + soft, next(self._seq), job, SoftTimeLimitExceeded))
                if hard:
                    heapq.heappush(self.deadlines, (now + hard, next(self._seq), job, jobs.HardKill))
        try:
            if not job.task.option("acks_late"):   # at most once: acknowledged as it starts
                self.broker.ack([job.delivery])
                job.acked = True
            limiter = job.task.option("rate_limit")
            if limiter:
                self._throttle(job.task.name, limiter)
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
        """Publish retries, store results, then acknowledge: one call each."""
        encode = self.codec.encode_result
        records: List[Record] = []
        republish = []
        acks: List[Delivery] = []
        requeue: List[Delivery] = []
        dead: List[tuple] = []
        for job in batch:
            outcome, msg = job.outcome, job.msg
            if outcome == jobs.DEAD:
                dead.append((job.delivery, job.reason))
                self.stats.dead_lettered += 1
                log.warning("message %s dead-lettered: %s", job.delivery.message_id, job.reason)
                continue
            if outcome == jobs.REQUEUE:
                requeue.append(job.delivery)
                continue
            if outcome == jobs.REJECT:
                if job.exc.requeue:
                    requeue.append(job.delivery)
                else:
                    dead.append((job.delivery, f"rejected: {job.reason}"))
                continue
            ignore = job.task is not None and job.task.option("ignore_result")
            if outcome == jobs.SUCCESS:
                self.stats.succeeded += 1
                if not ignore:
                    records.append(Record(msg.id, encode(make_meta(
                        msg.id, SUCCESS, result=job.value, task=msg.task, retries=msg.retries)),
                        True, msg.reply_to))
            elif outcome == jobs.FAILURE:
                self.stats.failed += 1
                records.append(Record(msg.id, encode(make_meta(
                    msg.id, FAILURE, exc=job.exc, traceback=job.tb, task=msg.task,
                    retries=msg.retries)), True, msg.reply_to))
            elif outcome == jobs.RETRY:
                self.stats.retried += 1
                retry = TaskMessage(task=msg.task, args=msg.args, kwargs=msg.kwargs, id=msg.id,
                                    queue=msg.queue, priority=msg.priority, eta=job.exc.when,
                                    expires=msg.expires, retries=msg.retries + 1,
                                    root_id=msg.root_id, time_limit=msg.time_limit,
                                    soft_time_limit=msg.soft_time_limit, reply_to=msg.reply_to)
                republish.append(self.app._outgoing(retry))
                records.append(Record(msg.id, encode(make_meta(
                    msg.id, RETRY, exc=job.exc.exc or job.exc, task=msg.task,
                    retries=msg.retries + 1)), False, msg.reply_to))
            elif outcome == jobs.REVOKED:
                self.stats.revoked += 1
                records.append(Record(msg.id, encode(make_meta(
                    msg.id, REVOKED, task=msg.task, reason=job.reason)), True, msg.reply_to))
            if not job.acked:
                acks.append(job.delivery)
        self._with_retries("publish retries", self.broker.publish_many, republish)
        self._with_retries("store results", self.backend.store_many, records)
        self._with_retries("acknowledge", self.broker.ack, acks)
        self._with_retries("requeue", self.broker.requeue, requeue)
        for delivery, reason in dead:
            self._with_retries("dead-letter", self.broker.dead_letter, delivery, reason)
        with self.lock:
            for job in batch:
                self.held.pop(id(job.delivery), None)
        self.tasks_done += len(batch)
        self.room.set()
        if self.max_tasks and self.tasks_done >= self.max_tasks and not self.stopping:
            log.info("max_tasks_per_child reached (%d): stopping to be replaced", self.max_tasks)
            self.request_stop()

    def _with_retries(self, what: str, fn, *args: Any) -> None:
        """Call ``fn`` until it succeeds: a result is never acknowledged unstored.
        Gives up only at cold shutdown, leaving the messages unacknowledged (they
        come back: at-least-once)."""
        if not args[0]:
            return
        delay = 0.1
        while True:
            try:
                fn(*args)
                return
            except Exception as exc:
                if self.stopping >= 2 and delay > 1:
                    log.error("%s failed at shutdown, giving up (messages will be redelivered): %s", what, exc)
                    return
                log.error("%s failed: %s; retrying in %.1f s", what, exc, delay)
                self.driver.sleep(delay)
                delay = min(delay * 2, 5.0)

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
