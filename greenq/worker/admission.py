"""Admission: the steps a task passes before it takes a runner slot.

A fetched message that may run (decoded, known, not expired, not revoked) is
*offered* to the worker's admission steps, in order.  Each step that concerns
the task answers with a :class:`Decision`:

* ``RUN``   -- go on to the next step; after the last one the job joins the
  run queue and the next free runner takes it;
* ``WAIT``  -- not yet: the job is *parked* here, holding no runner slot.  Its
  message stays held by this worker, so the renewer keeps its lease, and it
  counts against ``prefetch`` (not at a ``frees_room`` step, below).  It is
  offered to the same step again when its ``until`` time comes (a monotonic
  clock time) or when the step calls ``wake(key)`` (a permit was freed);
* ``DEFER`` -- back to the broker, to be delivered again at ``eta`` (epoch
  seconds): published again with that eta and acknowledged, as a message
  that came before its eta is.

Waiters are served per step and *wait key* (``step.key(job)``, e.g. the
task's name for the rate limiter, a resource's name for permits) in arrival
order: a job offered while others wait on the same key parks behind them
without asking the step, and only the head of a queue is asked again.  A
step with ``by_priority`` serves a higher message priority first, then
arrival order (the permits do; the rate limiter keeps arrival order).

A step with ``frees_room`` (the permits) parks jobs that do *not* count
against ``prefetch``: a worker whose prefetch is full of tasks waiting for a
saturated resource still fetches tasks that need none (no head-of-line
blocking).  Instead, at most ``max_waiting`` jobs (the worker's prefetch)
wait per key there; one more is deferred back to the broker, due
``overflow_backoff`` seconds later, for a worker that has permits.

After the job ends (it ran, or it was returned unstarted), ``release(job)``
is called on every step that answered RUN for it, newest first.

Why a step and not a hook: observer hooks (``app.on``, greenq/hooks.py) can
only watch; a ``task_prerun`` subscriber that wants to say "not yet" has to
sleep, and it sleeps holding a runner slot and the message's lease.  A step
decides before the slot is taken.

The chain times each wait: when a parked job is admitted, the step that
parked it hears ``waited(job, seconds)`` (from the moment it was parked at
that step); and a step with ``wait_warning`` seconds hears
``waiting_long(job, seconds)`` once per job that waits longer (the loop looks
about every ``WATCH_EVERY`` seconds, and again at the admission).  A job that
never parks costs nothing for either.

A step's ``admit`` runs in the consumer's greenlet (for a newly fetched job)
or in the admission greenlet (for a parked one), under the admission lock:
it must be quick and must not block.  A step that needs a remote answer
(a permit kept in Redis) answers WAIT with an ``until`` and asks again.
"""
from __future__ import annotations

import functools
import heapq
import itertools
import logging
import time
from abc import ABC, abstractmethod
from typing import (TYPE_CHECKING, Callable, Dict, Hashable, Iterator, List, Optional, Sequence, Set,
                    Tuple)

from ..config import parse_rate
from ..exceptions import describe

if TYPE_CHECKING:  # pragma: no cover
    from ..drivers.base import Driver
    from .jobs import Job

log = logging.getLogger("greenq.worker")

#: the longest the admission greenlet sleeps without a due time (it also wakes on ``wake``)
IDLE_WAIT = 1.0
#: seconds between two looks for jobs parked longer than their step's ``wait_warning``
WATCH_EVERY = 1.0


class Decision:
    """What a step says about one job: ``RUN``, ``wait(...)`` or ``defer(eta)``."""

    __slots__ = ("kind", "until", "eta")

    def __init__(self, kind: str, until: Optional[float] = None, eta: Optional[float] = None) -> None:
        self.kind = kind
        self.until = until      # WAIT: monotonic time to ask again; None: only when woken
        self.eta = eta          # DEFER: epoch seconds the message is delivered again

    def __repr__(self) -> str:
        extra = f" until={self.until}" if self.until is not None else ""
        extra += f" eta={self.eta}" if self.eta is not None else ""
        return f"<{self.kind}{extra}>"


RUN = Decision("run")


def wait(until: Optional[float] = None) -> Decision:
    """Park the job without a slot until ``until`` (``time.monotonic()``
    seconds), or until the step calls ``wake`` with its key."""
    return Decision("wait", until=until)


def defer(eta: float) -> Decision:
    """Send the job back to the broker, to be delivered at ``eta`` (epoch seconds)."""
    return Decision("defer", eta=eta)


class AdmissionStep(ABC):
    """One admission step.  Subclasses set ``name``, declare the task options
    and ``[task:NAME]`` INI keys they read, and implement ``key`` and
    ``admit``; ``release`` when they hold something while a task runs."""

    #: a short name, for logs and ``worker.admission.step(name)``
    name = "step"
    #: the task options (``@app.task(...)``) this step reads
    task_options: Tuple[str, ...] = ()
    #: the ``[task:NAME]`` keys this step reads (a worker-wide default: ``[worker]`` keys)
    ini_keys: Tuple[str, ...] = ()
    #: waiters ordered by (higher message priority, arrival) instead of arrival alone
    by_priority = False
    #: jobs parked here do not count against prefetch; at most ``Admission.max_waiting``
    #: wait per key, the next is deferred ``overflow_backoff`` seconds
    frees_room = False
    overflow_backoff = 1.0
    #: seconds a job may stay parked here before ``waiting_long`` (once per job); 0: never
    wait_warning = 0.0

    def __init__(self) -> None:
        self._wake: Callable[[Hashable], None] = lambda key: None

    def attach(self, wake: Callable[[Hashable], None]) -> None:
        """Called by the Admission that runs this step: ``wake(key)`` asks it
        to offer the jobs waiting on ``key`` here again."""
        self._wake = wake

    def wake(self, key: Hashable) -> None:
        self._wake(key)

    @abstractmethod
    def key(self, job: "Job") -> Optional[Hashable]:
        """The queue ``job`` waits in at this step, or None when the step does
        not concern it (it passes without ``admit``: the fast path)."""
        raise NotImplementedError

    @abstractmethod
    def admit(self, job: "Job") -> Decision:
        """RUN, ``wait(...)`` or ``defer(eta)``.  Quick, never blocking."""
        raise NotImplementedError

    def release(self, job: "Job") -> None:
        """``job``, admitted by this step, ended (ran, or was returned unstarted)."""

    def waited(self, job: "Job", seconds: float) -> None:
        """``job`` was parked here for ``seconds`` and is admitted now (only parked jobs get this)."""

    def waiting_long(self, job: "Job", seconds: float) -> None:
        """``job`` has been parked here ``seconds``, over ``wait_warning``: said once per job."""


class RateLimit(AdmissionStep):
    """``rate_limit`` per worker: starts of one task are at least
    ``1 / rate`` seconds apart.  A task whose turn has not come WAITs (no
    slot held) until its turn; tasks of one name start in arrival order.
    ``set(task, rate)`` overrides the configured limit in this worker
    (``greenq control rate-limit``)."""

    name = "rate_limit"
    task_options = ("rate_limit",)
    ini_keys = ("rate_limit",)

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.clock = clock
        self._next_slot: Dict[str, float] = {}     # the next free start time per task name
        self._intervals: Dict[str, float] = {}     # per rate text
        self._overrides: Dict[str, Optional[str]] = {}

    def set(self, task: str, rate: Optional[str]) -> None:
        """This worker's limit for ``task`` from now on (None: no limit)."""
        self._overrides[task] = rate or None
        if not rate:
            self._next_slot.pop(task, None)
        self.wake(task)                 # waiters go on under the new limit

    def rate(self, job: "Job") -> Optional[str]:
        assert job.msg is not None and job.task is not None, "admission sees decoded messages only"
        name = job.msg.task
        if name in self._overrides:
            return self._overrides[name]
        return job.task.option("rate_limit") or None

    def key(self, job: "Job") -> Optional[Hashable]:
        return job.msg.task if job.msg is not None and self.rate(job) else None

    def admit(self, job: "Job") -> Decision:
        rate = self.rate(job)
        if not rate:                          # removed while it waited
            return RUN
        interval = self._intervals.get(rate)
        if interval is None:
            interval = self._intervals[rate] = 1.0 / parse_rate(rate)
        now = self.clock()
        assert job.msg is not None, "admission sees decoded messages only"
        name = job.msg.task
        slot = self._next_slot.get(name, 0.0)
        if slot > now:
            return wait(until=slot)
        self._next_slot[name] = now + interval
        return RUN


class Waiters:
    """The jobs parked on one key: a heap by (rank, arrival), where the rank is
    minus the message's priority for a ``by_priority`` step and 0 otherwise
    (arrival order).  Each entry keeps when the job was parked (monotonic
    seconds); ``warned`` holds the arrival numbers of those already said to
    wait long."""

    __slots__ = ("_heap", "by_priority", "warned")

    def __init__(self, by_priority: bool) -> None:
        self._heap: List[Tuple[int, int, float, "Job"]] = []
        self.by_priority = by_priority
        self.warned: Set[int] = set()

    def push(self, job: "Job", seq: int, since: float) -> None:
        rank = -(getattr(job.msg, "priority", 0) or 0) if self.by_priority else 0
        heapq.heappush(self._heap, (rank, seq, since, job))

    def head(self) -> "Job":
        return self._heap[0][3]

    def pop(self) -> Tuple["Job", float, bool]:
        """The head job, when it was parked, and whether it was said to wait long."""
        _, seq, since, job = heapq.heappop(self._heap)
        warned = seq in self.warned
        if warned:
            self.warned.discard(seq)
        return job, since, warned

    def older(self, before: float) -> List[Tuple["Job", float]]:
        """The jobs parked before ``before`` not said to wait long yet (now marked so), with when."""
        out = []
        for _, seq, since, job in self._heap:
            if since <= before and seq not in self.warned:
                self.warned.add(seq)
                out.append((job, since))
        return out

    def __len__(self) -> int:
        return len(self._heap)

    def __iter__(self) -> Iterator["Job"]:
        return (entry[3] for entry in sorted(self._heap, key=lambda e: (e[0], e[1])))


class Admission:
    """The worker's chain of admission steps and the jobs parked in it.

    ``run(job)`` puts an admitted job in the run queue; ``defer(job, eta)``
    hands a deferred one to the settler.  ``loop`` (a control greenlet)
    offers parked jobs again when their time comes or their key is woken."""

    def __init__(self, driver: "Driver", run: Callable[["Job"], None],
                 defer: Callable[["Job", float], None], steps: Sequence[AdmissionStep] = ()) -> None:
        self.driver = driver
        self._run = run
        self._defer = defer
        self.steps: List[AdmissionStep] = []
        self._lock = driver.lock()
        self._event = driver.event()
        self._parked: Dict[Tuple[int, Hashable], Waiters] = {}
        self._due: List[Tuple[float, int, Tuple[int, Hashable]]] = []   # heap: (until, seq, queue)
        self._woken: Set[Tuple[int, Hashable]] = set()
        self._seq = itertools.count()
        self._closed = False
        #: jobs that may wait per key at a ``frees_room`` step (0: no bound); the worker sets its prefetch
        self.max_waiting = 0
        #: the latest eta (epoch seconds) of a job this worker sent back to the broker: a --burst
        #: worker does not stop before it (RabbitMQ cannot say when its delayed messages are due)
        self.deferred_until = 0.0
        self._exempt = 0            # jobs parked at ``frees_room`` steps (not counted against prefetch)
        self._watched = 0.0         # when the loop last looked for jobs waiting long
        for step in steps:
            self.add(step)

    # -- the chain ---------------------------------------------------------------
    def add(self, step: AdmissionStep) -> AdmissionStep:
        index = len(self.steps)
        step.attach(functools.partial(self._wake_key, index))
        self.steps.append(step)
        return step

    def step(self, name: str) -> Optional[AdmissionStep]:
        for step in self.steps:
            if step.name == name:
                return step
        return None

    def __bool__(self) -> bool:
        return bool(self.steps)

    @property
    def parked(self) -> int:
        """How many jobs wait now."""
        with self._lock:
            return sum(len(q) for q in self._parked.values())

    @property
    def exempt(self) -> int:
        """How many parked jobs do not count against prefetch (``frees_room`` steps)."""
        return self._exempt

    def waiting(self, index: int, key: Hashable) -> int:
        """How many jobs wait on ``key`` at step number ``index``."""
        with self._lock:
            return len(self._parked.get((index, key), ()))

    def waiting_at(self, name: str) -> Dict[Hashable, int]:
        """How many jobs wait on each key of the step named ``name`` (for stats: a look, not a path)."""
        with self._lock:
            return {key: len(waiting) for (index, key), waiting in self._parked.items()
                    if self.steps[index].name == name and waiting}

    # -- offering -----------------------------------------------------------------
    def offer(self, job: "Job", start: int = 0) -> None:
        """Pass ``job`` through the steps from ``start``; it runs, parks or is deferred."""
        steps = self.steps
        for index in range(start, len(steps)):
            step = steps[index]
            key = step.key(job)
            if key is None:
                continue
            queue_key = (index, key)
            with self._lock:
                waiting = self._parked.get(queue_key)
                if waiting and not self._full(step, waiting):   # behind those already waiting
                    self._push(step, waiting, job)
                    return
                if waiting:                    # full: back to the broker, for a worker with room
                    decision = defer(time.time() + step.overflow_backoff)
                else:
                    decision = step.admit(job)
                if decision.kind == "wait":
                    self._park(queue_key, job, decision.until)
                    return
            if decision.kind == "defer":
                self._deferred(job, decision.eta)
                return
            self._admitted(job, step)
        self._run(job)

    def _full(self, step: AdmissionStep, waiting: Waiters) -> bool:
        return step.frees_room and 0 < self.max_waiting <= len(waiting)

    def _push(self, step: AdmissionStep, waiting: Waiters, job: "Job") -> None:
        waiting.push(job, next(self._seq), time.monotonic())
        if step.frees_room:
            self._exempt += 1

    def _park(self, queue_key: Tuple[int, Hashable], job: "Job", until: Optional[float]) -> None:
        step = self.steps[queue_key[0]]
        waiting = self._parked.get(queue_key)
        if waiting is None:
            waiting = self._parked[queue_key] = Waiters(step.by_priority)
        self._push(step, waiting, job)
        if until is not None:
            heapq.heappush(self._due, (until, next(self._seq), queue_key))
            self._event.set()               # the loop may sleep past this time: look again

    @staticmethod
    def _admitted(job: "Job", step: AdmissionStep) -> None:
        if job.admitted is None:
            job.admitted = [step]
        else:
            job.admitted.append(step)

    def _deferred(self, job: "Job", eta: Optional[float]) -> None:
        self.release(job)
        eta = eta if eta is not None else time.time()
        self.deferred_until = max(self.deferred_until, eta)
        self._defer(job, eta)

    def release(self, job: "Job") -> None:
        """``job`` ended: give back what the steps that admitted it hold."""
        admitted, job.admitted = job.admitted, None
        if not admitted:
            return
        for step in reversed(admitted):
            try:
                step.release(job)
            except Exception as exc:       # a step's bug must not stop the others' release
                log.error("admission step %s: release failed: %s", step.name, describe(exc), exc_info=True)

    def _wake_key(self, index: int, key: Hashable) -> None:
        with self._lock:
            if (index, key) in self._parked:
                self._woken.add((index, key))
        self._event.set()

    # -- the loop -------------------------------------------------------------------
    def loop(self) -> None:
        while not self._closed:
            with self._lock:
                timeout = IDLE_WAIT
                if self._due:
                    timeout = min(timeout, max(0.0, self._due[0][0] - time.monotonic()))
            if timeout > 0:
                self._event.wait(timeout)
            self._event.clear()
            if self._closed:
                break
            self.serve()
            self.watch()

    def serve(self) -> None:
        """Ask the heads of the queues that are due or woken again; go on with
        those admitted (outside the lock: the next steps, then the run queue)."""
        now = time.monotonic()
        admitted: List[Tuple["Job", int, AdmissionStep]] = []
        deferred: List[Tuple["Job", Optional[float]]] = []
        waits: List[Tuple["Job", AdmissionStep, float, bool]] = []   # (job, step, parked at, warned)
        with self._lock:
            ready = self._woken
            self._woken = set()
            while self._due and self._due[0][0] <= now:
                ready.add(heapq.heappop(self._due)[2])
            for queue_key in ready:
                waiting = self._parked.get(queue_key)
                step = self.steps[queue_key[0]]
                while waiting:
                    job = waiting.head()
                    decision = step.admit(job)
                    if decision.kind == "wait":
                        if decision.until is not None:
                            heapq.heappush(self._due, (decision.until, next(self._seq), queue_key))
                        break
                    _, since, warned = waiting.pop()
                    if step.frees_room:
                        self._exempt -= 1
                    if decision.kind == "defer":
                        deferred.append((job, decision.eta))
                    else:
                        admitted.append((job, queue_key[0], step))
                        waits.append((job, step, since, warned))
                if not waiting:
                    self._parked.pop(queue_key, None)
        for job, eta in deferred:
            self._deferred(job, eta)
        for job, step, since, warned in waits:
            self._waited(job, step, now - since, warned)
        for job, index, step in admitted:
            self._admitted(job, step)
            self.offer(job, index + 1)

    @staticmethod
    def _waited(job: "Job", step: AdmissionStep, seconds: float, warned: bool) -> None:
        try:
            if step.wait_warning and not warned and seconds >= step.wait_warning:
                step.waiting_long(job, seconds)
            step.waited(job, seconds)
        except Exception as exc:           # a step's bug must not lose the job
            log.error("admission step %s: waited failed: %s", step.name, describe(exc), exc_info=True)

    def watch(self, now: Optional[float] = None, force: bool = False) -> None:
        """Tell the steps with a ``wait_warning`` of the jobs parked longer than
        it (once per job); at most every ``WATCH_EVERY`` seconds unless ``force``."""
        if not any(step.wait_warning for step in self.steps):
            return
        now = time.monotonic() if now is None else now
        if not force and now - self._watched < WATCH_EVERY:
            return
        self._watched = now
        long: List[Tuple["Job", AdmissionStep, float]] = []
        with self._lock:
            for (index, _), waiting in self._parked.items():
                step = self.steps[index]
                if step.wait_warning:
                    long.extend((job, step, now - since) for job, since in waiting.older(now - step.wait_warning))
        for job, step, seconds in long:
            try:
                step.waiting_long(job, seconds)
            except Exception as exc:
                log.error("admission step %s: waiting_long failed: %s", step.name, describe(exc), exc_info=True)

    def close(self) -> List["Job"]:
        """Stop the loop; return the parked jobs (the worker sends them back)."""
        with self._lock:
            self._closed = True
            jobs = [job for waiting in self._parked.values() for job in waiting]
            self._parked.clear()
            self._exempt = 0
            self._due.clear()
            self._woken.clear()
        self._event.set()
        for job in jobs:
            self.release(job)
        return jobs
