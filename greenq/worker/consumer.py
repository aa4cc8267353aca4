"""The worker: fetch with backpressure, hand tasks to the runners, settle, stop.

Greenlets (or threads, with the threads driver) of one worker, and where each
lives:

* consumer  -- here: fetches up to the free prefetch room (in messages and
               in bytes, ``prefetch_bytes``), checks each delivery,
               dead-letters what cannot run, queues the rest;
* admission -- admission.py: the steps a task passes before it takes a
               runner slot (rate limits); it parks the jobs told to WAIT,
               without a slot, and offers them again when their turn comes;
* runners   -- runners.py: up to ``concurrency`` greenlets, spawned as work
               comes (threads: all at start), each running one task at a
               time, with the task hooks around it;
* settler   -- settle.py: publishes retries, stores results, acknowledges;
* reaper    -- limits.py: time limits and revoke(terminate=True);
* revocations -- revocations.py: the worker's copy of the revoked ids, loaded
               from the result backend, fed by the control plane;
* renewer   -- here: renews the lease of every held message in one call per
               lease/3; also logs the summary line.

These, with the admission greenlet, are the control plane: they run outside
the task limit, so a full pool never starves them (DESIGN.md lesson 4).  The
counters (Stats) subscribe to the worker's hooks (greenq/hooks.py); so do
STARTED records when some task needs them, and the app's own hooks.

Each part gets the collaborators it uses, not the Worker: the parts are
built, with the state they share (Held, Stop), by ``assemble`` in
greenq/worker/assembly.py before the Worker, which is handed them.  What the control
plane (greenq/control/) may do to a running worker is the Worker's own
operations below (``resize``, ``add_queue``, ``cancel_queue``,
``set_rate_limit``...), declared as the ``ControlledWorker`` protocol in
greenq/control/commands.py; the control agent is built and attached by the
composition root, greenq/cli/worker.py (``build_worker``), so this module
never imports greenq.control.
"""
from __future__ import annotations

import logging
import queue as std_queue
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Sequence

from ..backoff import Backoff
from ..brokers.base import Delivery, body_limit
from ..config import Config, effective_prefetch
from ..exceptions import MessageError, describe
from . import jobs
from ..resources.observe import WaitTimes, resource_stats
from ..resources.registry import wait_keys
from ..resources.step import Permits
from ..validation import MAX_PREFETCH
from .admission import TAKE, AdmissionStep, RateLimit
from .assembly import WorkerParts, assemble
from .jobs import Job
from .runners import KILLS
from .state import RunningTask, Service, Snapshot, StopState

if TYPE_CHECKING:  # pragma: no cover
    from ..app import GreenQ
    from ..drivers.base import Driver

log = logging.getLogger("greenq.worker")

BURST_WAIT_FOR_DELAYED = 30.0   # --burst waits for delayed messages due within this many seconds
BURST_AFTER_DEFERRED = 2.0      # ... and this long past the eta of what its admission deferred
BURST_FETCH_TIMEOUT = 0.1       # --burst: a fetch waits at most this long (its empty answer is what stops it),
                                # except the confirming fetch where the broker pushes (one may be on its way)
FETCH_BATCH_MAX = 500           # most messages one fetch asks for (a fetch takes min(prefetch, this))
SUMMARY_INTERVAL = 30.0         # seconds between the INFO summary lines
EARLY_TOLERANCE = 1.0           # seconds a message may arrive before its envelope's eta and still run
PREFETCH_BYTES_FACTOR = 8       # [worker] prefetch_bytes = 0: this many of the largest message


def effective_prefetch_bytes(config: Config) -> int:
    """How many bytes of message bodies a worker holds at most (beside at most
    ``prefetch`` messages): ``[worker] prefetch_bytes``, or when 0, eight
    times the largest message a worker reads whole (the setting's ceiling,
    config.MAX_PREFETCH_BYTES, is checked where it is set).  A single message
    is always taken, however big."""
    return config.worker["prefetch_bytes"] or PREFETCH_BYTES_FACTOR * body_limit(config)


class Worker:
    """One worker process's consumer.  ``run()`` returns the exit code."""

    def __init__(self, app: "GreenQ", driver: "Driver", *, queues: Sequence[str], concurrency: int,
                 prefetch: int = 0, burst: bool = False, shutdown_timeout: float = 30.0,
                 fetch_timeout: float = 1.0, max_tasks: int = 0, name: Optional[str] = None,
                 parts: Optional[WorkerParts] = None) -> None:
        """``parts``: built by the composition root with ``assemble`` (which
        then took ``name``, ``max_tasks`` and ``shutdown_timeout``); without
        them the Worker assembles its own from those three."""
        if parts is None:
            parts = assemble(app, driver, name=name, max_tasks=max_tasks, shutdown_timeout=shutdown_timeout)
        self.app = app
        self.driver = driver
        self.config = app.config
        self.queues = list(queues)
        self.concurrency = 1 if driver.name == "solo" else max(1, concurrency)
        self.prefetch = effective_prefetch(self.concurrency, prefetch)
        self.batch = min(self.prefetch, FETCH_BATCH_MAX)
        self.prefetch_bytes = effective_prefetch_bytes(app.config)
        self.body_limit = body_limit(app.config)
        self.burst = burst
        self._quiet_once = False     # --burst on a broker that pushes: the queues looked done once
        self.shutdown_timeout = parts.stop.shutdown_timeout
        self.fetch_timeout = fetch_timeout
        self.codec = app.codec
        self.broker = app.broker
        self.name = parts.name
        self.parts = parts
        self.lock = parts.lock
        self._held = parts.held
        self.held: Dict[Delivery, Delivery] = parts.held.messages   # every message leased to us, by itself
        self.running: Dict[Job, Job] = parts.running           # by itself (identity)
        self.runq = parts.runq                   # admitted, waiting for a free runner
        self.room = parts.room                   # set when held shrinks
        self.stopped = parts.stopped             # set when the consumer loop ended
        self._stop = parts.stop
        self._backend = parts.backend            # the parts' port to the result backend, set by run()
        self.last_poll = time.monotonic()
        self.exit_code = 0
        self.failed: Optional[str] = None        # the control loop that died, if one did
        self.stats = parts.stats
        self.hooks = parts.hooks
        self.services: List[Service] = []        # attached by the composition root (the control agent)
        self.reaper = parts.reaper
        self.revocations = parts.revocations
        self.settler = parts.settler
        self.admission = parts.admission
        self.runners = parts.runners
        self.finish = parts.finish               # finish(job, outcome, reason=None): to the settler unrun
        self.resources = parts.resources         # the permit pools (greenq/resources/)
        self.admission.max_waiting = self.prefetch   # at most prefetch jobs wait per resource
        self.admission.max_waiting_bytes = self.prefetch_bytes   # ... and prefetch_bytes bytes

    # -- the shared state, as the Worker's own attributes ----------------------
    @property
    def stopping(self) -> StopState:
        return self._stop.state

    @stopping.setter
    def stopping(self, state: StopState) -> None:
        self._stop.state = state

    @property
    def backend(self) -> Any:
        """The app's result backend, from ``run()`` (building it may connect)."""
        return self._backend.backend

    @backend.setter
    def backend(self, backend: Any) -> None:
        self._backend.backend = backend

    @property
    def held_bytes(self) -> int:
        """The sum of the held messages' bodies' lengths."""
        return self._held.bytes

    @property
    def tasks_done(self) -> int:
        return self._held.done

    @property
    def max_tasks(self) -> int:
        """Settled messages after which the worker stops to be replaced (0: never)."""
        return self._held.max_tasks

    @max_tasks.setter
    def max_tasks(self, max_tasks: int) -> None:
        self._held.max_tasks = max_tasks

    # -- public --------------------------------------------------------------
    def run(self) -> int:
        try:
            self.hooks.emit_strict("worker_process_init", self)
        except Exception as exc:
            log.critical("worker_process_init hook failed: %s; this worker stops before taking any "
                         "message", describe(exc), exc_info=True)
            return 1
        self.broker.declare(self.queues)
        self._set_broker_prefetch()
        self.backend = self.app.backend
        self.revocations.first_load()
        log.info("worker ready: pool=%s concurrency=%d prefetch=%d prefetch_bytes=%d queues=%s",
                 self.driver.name, self.concurrency, self.prefetch, self.prefetch_bytes,
                 ",".join(self.queues))
        self.runners.start(self.concurrency)
        settler = self.driver.spawn(self._guarded, "settler", self.settler.loop)
        self.driver.spawn(self._guarded, "renewer", self._renewer)
        self.driver.spawn(self._guarded, "reaper", self.reaper.loop)
        self.driver.spawn(self._guarded, "revocations", self.revocations.loop)
        self.driver.spawn(self._guarded, "admission", self.admission.loop)
        for service in self.services:
            service.start(self.spawn_guarded)
        try:
            self._guarded("consumer", self._consume)
        finally:
            self._shutdown(settler)
            self.revocations.stop()
            for service in reversed(self.services):
                service.stop()
            self.hooks.emit("worker_shutdown", self)
        return self.exit_code

    def request_stop(self, cold: bool = False) -> None:
        """Warm stop, or cold stop with ``cold=True`` (``Stop.request``, in
        greenq/worker/state.py); safe to call from a signal handler."""
        self._stop.request(cold)

    def attach(self, service: Service) -> None:
        """Run ``service`` beside the worker (before ``run``): started once
        the worker is ready, stopped after its shutdown.  The composition
        root attaches the control agent so."""
        self.services.append(service)

    def spawn_guarded(self, name: str, loop: Callable[[], None]) -> Any:
        """Spawn a control loop that stops the worker if it dies (``_guarded``)."""
        return self.driver.spawn(self._guarded, name, loop)

    # -- operations of the control plane -------------------------------------------
    def resize(self, concurrency: int) -> None:
        """Run ``concurrency`` tasks at once from now on: more runners (on
        demand: as work comes; threads: started now), or fewer (idle ones end
        when they take their retirement notice from the run queue, after the
        messages queued before it; busy ones beyond the concurrency after
        their task: ``Runners.resize``); the prefetch follows (``basic_qos``
        too on AMQP).  The caller checks the bounds."""
        change = concurrency - self.concurrency
        self.runners.resize(self.runners.target + change)
        self.concurrency = concurrency
        self.prefetch = effective_prefetch(concurrency, self.config.worker["prefetch"])
        self.batch = min(self.prefetch, FETCH_BATCH_MAX)
        self.admission.max_waiting = self.prefetch
        self._set_broker_prefetch(always=True)
        self.room.set()

    def _set_broker_prefetch(self, always: bool = False) -> None:
        """AMQP: ``basic_qos`` follows the pool, plus room for the tasks
        waiting for permits (up to prefetch per resource the tasks name),
        which RabbitMQ counts as unacknowledged like any other."""
        if not self.broker.prefetch_window:
            return
        keys = wait_keys(self.app.tasks.values()) if self.resources is not None else 0
        if keys or always:
            self.broker.set_prefetch(min(MAX_PREFETCH, self.prefetch * (1 + keys)))

    def add_queue(self, queue: str) -> bool:
        """Consume ``queue`` too (declared first); False if it already does."""
        if queue in self.queues:
            return False
        self.broker.declare([queue])
        self.queues.append(queue)
        return True

    def cancel_queue(self, queue: str) -> bool:
        """Stop consuming ``queue``; False if it did not.  A message of it
        fetched meanwhile goes back untouched (``_of_queues_consumed``)."""
        if queue not in self.queues:
            return False
        if len(self.queues) == 1:
            raise ValueError(f"{queue} is the only queue this worker consumes")
        self.queues.remove(queue)
        return True

    def set_rate_limit(self, task: str, rate: Optional[str]) -> None:
        """This worker's rate limit of ``task`` from now on (None: none).  A
        limit is checked as the configuration checks it (ConfigError)."""
        if task not in self.app.tasks:
            raise ValueError(f"unknown task {task!r}")
        if rate is not None:
            self.config.set(f"task:{task}", "rate_limit", rate, origin="greenq control rate-limit")
            rate = self.config.task_options(task)["rate_limit"]
        step = self.admission.step(RateLimit.name)
        if step is None:
            if rate is None:
                return
            step = self.admission.add(RateLimit())
        assert isinstance(step, RateLimit)
        step.set(task, rate)

    def add_admission_step(self, step: AdmissionStep) -> AdmissionStep:
        """One more admission step, after those there are (before ``run``)."""
        return self.admission.add(step)

    def task_names(self) -> List[str]:
        return sorted(self.app.tasks)

    def reserved(self) -> List[Delivery]:
        """The held messages no runner has started (waiting for a runner or
        for their admission)."""
        with self.lock:
            running = {job.delivery for job in self.running.values()}
            return [d for key, d in self.held.items() if key not in running]

    def resource_stats(self) -> Dict[str, Dict[str, Any]]:
        """Per configured resource: the limit in force and configured, scope,
        adaptive, permits held here, tasks parked for it here, and their wait
        figures (``inspect stats``, /metrics, the heartbeat; greenq/resources/observe.py)."""
        return resource_stats(self.resources, self.admission.waiting_at(Permits.name), self.resource_waits())

    def resource_waits(self) -> Dict[str, WaitTimes]:
        """How long the tasks that got permits waited, per resource (the wait histogram of /metrics)."""
        step = self.admission.step(Permits.name)
        return step.waits if isinstance(step, Permits) else {}

    def snapshot(self) -> Snapshot:
        """A consistent copy of what others may read (the monitor, inspect)."""
        now = time.monotonic()
        since = self.settler.settling_since
        with self.lock:
            running = [RunningTask(j.msg.id, j.msg.task, j.msg.args, j.msg.kwargs, j.started_at)
                       for j in self.running.values() if j.msg is not None]
            held = len(self.held)
        return Snapshot(self.driver.name, self.concurrency, self.prefetch, list(self.queues),
                        self.stopping, self.failed, now - self.last_poll,
                        now - since if since is not None else 0.0, held, running)

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
                         name, describe(exc), exc_info=True)
            self.request_stop(cold=True)
            self.stopped.set()

    # -- consumer ------------------------------------------------------------
    def _consume(self) -> None:
        retry = Backoff(0.1, 5.0)
        while not self._stop.state:
            room, byte_room = self._room()
            if room <= 0 or byte_room <= 0:       # backpressure: fetch nothing while full
                self.room.clear()
                if min(self._room()) <= 0 and not self._stop.state:
                    self.room.wait(1.0)
                self.last_poll = time.monotonic()
                continue
            timeout = self.fetch_timeout
            if self.burst and not self._quiet_once:
                timeout = min(timeout, BURST_FETCH_TIMEOUT)
            asked = min(room, self.batch)
            try:
                deliveries = self.broker.fetch(self.queues, asked, timeout, max_bytes=byte_room)
                retry.reset()
            except Exception as exc:
                pause = retry.next()
                log.error("fetch failed: %s; retrying in %.1f s", exc, pause)
                self.driver.sleep(pause)
                continue
            self.last_poll = time.monotonic()
            deliveries = self._of_queues_consumed(deliveries)
            if deliveries:
                self._quiet_once = False
                self._accept(deliveries)
                if len(deliveries) < asked and not self.broker.pushes_deliveries:
                    self._let_run()           # the queues ran dry (a blocking read's one message)
            elif self.burst and not self.held and self._burst_done():
                log.info("burst: queues are empty, stopping")
                self.request_stop()
        self.stopped.set()

    def _let_run(self) -> None:
        """Two passes of the hub before the next fetch, after one that found
        the queues dry: the first runs the tasks just accepted (to their end
        or their first wait), the second lets the settler store what finished
        (its result and notification on the wire) before the fetch's round
        trip, which would otherwise go first and delay a lone round trip's
        result.  The next fetch would most likely block anyway.  Not where the
        broker pushes deliveries (RabbitMQ): its fetch makes no round trip."""
        self.driver.sleep(0)
        self.driver.sleep(0)

    def _of_queues_consumed(self, deliveries: List[Delivery]) -> List[Delivery]:
        """``deliveries`` less those of a queue ``cancel-consumer`` dropped
        while the fetch was under way (a blocking read began with it), which
        go back at once, untouched."""
        stale = [d for d in deliveries if d.queue not in self.queues]
        if not stale:
            return deliveries
        self.broker.requeue(stale, started=False)
        return [d for d in deliveries if d.queue in self.queues]

    def _room(self) -> "tuple[int, int]":
        """How many more messages, and how many more bytes of bodies, the
        worker may fetch.  A fetch always takes one message, so bytes count as
        room only while a message of the largest size (``body_limit``) fits
        in them, or while nothing is held: the worker never goes over
        ``prefetch_bytes``, except by holding one message bigger than it."""
        # tasks waiting for a permit hold no room, in messages or bytes (both are bounded per
        # resource instead: Admission.max_waiting and max_waiting_bytes)
        admission = self.admission
        counted = len(self.held) - admission.exempt
        byte_room = self.prefetch_bytes - (self._held.bytes - admission.exempt_bytes)
        if counted > 0 and byte_room < self.body_limit:
            byte_room = 0
        return self.prefetch - counted, byte_room

    def _burst_done(self) -> bool:
        """--burst: nothing delayed is due soon, nothing became ready since
        the fetch (the queues are read after the delayed messages: one that
        leaves them meanwhile is met in its queue) and no other consumer holds
        a message (a dead one's come back when its lease runs out).  Where
        the broker pushes deliveries (RabbitMQ), that must be so twice, a
        fetch apart: one may be on its way to this process the first time."""
        if not self._burst_quiet():
            self._quiet_once = False
            return False
        if self.broker.pushes_deliveries and not self._quiet_once:
            self._quiet_once = True
            return False
        return True

    def _burst_quiet(self) -> bool:
        if time.time() < self.parts.admission.deferred_until + BURST_AFTER_DEFERRED:
            return False        # what this worker deferred comes back (and is fetched) first
        try:
            due = self.broker.next_due(self.queues)
            if due is not None and due <= time.time() + BURST_WAIT_FOR_DELAYED:
                return False
            return not any(s.held or s.ready for s in self.broker.queue_stats(self.queues))
        except Exception as exc:   # the broker is away: ask again on the next empty fetch
            log.warning("burst: could not read the queues' state: %s", exc)
            return False

    def _accept(self, deliveries: List[Delivery]) -> None:
        now = time.time()
        max_deliveries = self.config.max_deliveries
        tasks = self.app.tasks
        ready: List[Job] = []
        self._held.add(deliveries)
        for d in deliveries:
            job = Job(d)
            try:
                reason = self._refusal(job, now, max_deliveries, tasks)
            except Exception as exc:        # a bug of ours must not strand the message
                log.error("message %s could not be accepted", d.message_id, exc_info=True)
                reason = f"worker error while accepting it: {describe(exc)}"
            if reason == "expired":
                self.finish(job, jobs.REVOKED, reason="expired")
            elif reason == "early":
                self.finish(job, jobs.DEFER, reason="eta in the future")
            elif reason:
                self.finish(job, jobs.DEAD, reason=reason)
            else:
                ready.append(job)
        self.hooks.emit("messages_received", len(deliveries))
        if not ready:
            return
        revoked = self.revocations.ids
        received = self.hooks.has("task_received")
        offer = self.admission.offer if self.admission else self.runners.submit
        for job in ready:
            assert job.msg is not None, "ready: its message decoded"
            if job.msg.id in revoked:
                self.finish(job, jobs.REVOKED, reason="revoked")
            else:
                if received:
                    self.hooks.emit("task_received", job)
                offer(job)

    def _refusal(self, job: Job, now: float, max_deliveries: int, tasks: Dict[str, Any]) -> Optional[str]:
        """Why this delivery will not run now (a dead-letter reason, "expired" or
        "early"), or None."""
        d = job.delivery
        plain = type(d) is Delivery          # the base class: its ``truncated`` and ``decode`` inline
        if (d.size is not None) if plain else d.truncated:     # too big to read: only a preview came
            return d.error
        if d.error:
            return f"bad transport metadata: {d.error}"
        if d.deliveries > max_deliveries:
            return f"delivered {d.deliveries} times (max_deliveries={max_deliveries})"
        try:
            msg = self.codec.decode(d.body) if plain else d.decode(self.codec)
        except MessageError as exc:
            return f"undecodable: {exc}"
        job.msg = msg
        job.task = task = tasks.get(msg.task)
        if task is None:
            return f"unknown task {msg.task!r}: not registered in this worker"
        # the message refers to strings the worker holds anyway where they are equal: the
        # task's registered name, the queue name the broker delivered it from, the message id
        # the delivery carries; the decoded copies go (about 200 bytes a message in flight)
        if msg.task == task.name:
            msg.task = task.name
        if msg.queue == d.queue:
            msg.queue = d.queue
        if msg.id == d.message_id:
            msg.id = d.message_id
        if msg.expires is not None and msg.expires < now:
            return "expired"
        if msg.eta is not None and msg.eta > now + EARLY_TOLERANCE:
            return "early"      # ready before its eta (not sent by greenq's client): put it back to wait
        return None

    def release(self, batch: List[Job]) -> None:
        """The settler settled ``batch``: make room for more (``Held.release``)."""
        self._held.release(batch)

    # -- leases and the summary line -------------------------------------------
    def _renewer(self) -> None:
        interval = max(0.2, self.config.lease_seconds / 3.0)
        next_summary = time.monotonic() + SUMMARY_INTERVAL
        last = (time.monotonic(), 0)
        while not (self.stopped.is_set() and not self.held):
            self.driver.sleep(min(interval, SUMMARY_INTERVAL))
            self.runners.trim()                 # on demand: idle runners go
            held = list(self.held.values())
            if held:
                try:
                    self.broker.renew(held)
                except Exception as exc:
                    log.warning("lease renewal failed: %s", exc)
            if self.resources is not None and self.resources.pools:
                try:                            # cluster permits are leases too
                    self.resources.renew()
                except Exception as exc:
                    log.warning("permit renewal failed: %s", describe(exc))
            if time.monotonic() >= next_summary:
                next_summary += SUMMARY_INTERVAL
                last = self._summary(*last)

    def _summary(self, since: float, done_before: int) -> "tuple[float, int]":
        s, now = self.stats, time.monotonic()
        processed = s.succeeded + s.failed
        rate = (processed - done_before) / max(now - since, 1e-9)
        log.info("summary: processed %d (failed %d, retried %d, dead-lettered %d), %.1f tasks/s, "
                 "running %d, held %d", processed, s.failed, s.retried, s.dead_lettered, rate,
                 len(self.running), len(self.held))
        return now, processed

    # -- shutdown ------------------------------------------------------------
    def _shutdown(self, settler: Any) -> None:
        """Warm: let running tasks finish within shutdown_timeout, return the
        backlog.  Cold (or time out): kill the rest and return their messages."""
        self._stop.state = max(self._stop.state, StopState.WARM)
        self.stopped.set()
        try:                                    # AMQP: basic.cancel, so nothing more arrives
            self.broker.stop_consuming()
        except Exception as exc:
            log.warning("could not stop consuming cleanly: %s", describe(exc))
        while True:                             # received but not started: back to the queue
            try:
                job = self.runq.get(block=False)
            except std_queue.Empty:
                break
            if job is not None and job is not TAKE:
                self.finish(job, jobs.REQUEUE)
        for job in self.admission.close():      # parked by an admission step: back as well
            self.finish(job, jobs.REQUEUE)
        deadline = time.monotonic() + self.shutdown_timeout
        while self.running and self.stopping < StopState.COLD and time.monotonic() < deadline:
            self.driver.sleep(0.05)
        if self.running:
            if self.stopping < StopState.COLD:
                log.warning("shutdown_timeout passed with %d task(s) running", len(self.running))
            self.stopping = StopState.COLD
            for job in list(self.running.values()):
                if job.outcome is None:
                    self.reaper.kill(job, jobs.Abandon)
            abandon_deadline = time.monotonic() + 2.0
            while self.running and time.monotonic() < abandon_deadline:
                self.driver.sleep(0.02)
        # settle what finished; a thread still stuck in C code after its kill is not waited for
        stuck = {job.delivery for job in list(self.running.values())}
        settler_deadline = time.monotonic() + 10.0
        while (set(self.held) - stuck) and time.monotonic() < settler_deadline and not settler.dead:
            self.driver.sleep(0.02)
        self.settler.close()
        settler.join(5.0)
        self.runners.stop()
        if self.resources is not None:          # whatever permits this process still holds
            try:
                self.resources.close()
            except Exception as exc:
                log.warning("could not give back the permits held: %s", describe(exc))
        leftover = list(self.held.values())
        if leftover:  # whatever was not settled goes back to the queue
            log.warning("returning %d unsettled message(s) to the queue", len(leftover))
            try:
                self.broker.requeue(leftover)
            except Exception as exc:
                log.error("could not return %d message(s): %s (their leases will expire)", len(leftover), exc)
        s = self.stats
        log.info("worker stopped: %d succeeded, %d failed, %d retried, %d dead-lettered",
                 s.succeeded, s.failed, s.retried, s.dead_lettered)
