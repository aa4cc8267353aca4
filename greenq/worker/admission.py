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

Waiters are served per step and *wait queue* (``step.key(job)``, e.g. the
task's name for the rate limiter; one queue for every permit waiter), and in
a queue *per need* (``step.needs(job, key)``: by default the key itself; for
permits, the resources a task names): a job is asked only if no job before it
in the queue waits for one of its needs.  A job that is refused (told WAIT),
or that is skipped so, *blocks* its needs for the jobs after it: nobody
overtakes a job on a need it waits for, whatever else either needs.  A job
offered while jobs wait for one of its needs parks behind them without
asking the step.  A step with ``by_priority`` orders its queue by higher
message priority first, then arrival (the permits do; the rate limiter keeps
arrival order).  The price of that order: a free permit of one resource can
stay unused while the first task waiting for it waits for another resource
of its set.

A step with ``frees_room`` (the permits) parks jobs that do *not* count
against ``prefetch`` nor ``prefetch_bytes`` once refused: a worker whose
prefetch is full of tasks waiting for a saturated resource still fetches
tasks that need none (no head-of-line blocking).  Instead, at most
``max_waiting`` jobs (the worker's prefetch) and ``max_waiting_bytes`` bytes
of bodies (its prefetch_bytes; one job may always wait, however big) wait per
need there; one more is deferred back to the broker, due ``overflow_backoff``
seconds later, for a worker that has permits.

A step that ``reserves_runner`` (the permits) grants, in a worker's chain
(``pull``), only to a runner that is free: the runners call ``take`` before
they take the next job of the run queue, and a job that step would let run
is admitted there, for that runner, which runs it at once.  What it holds
(permits) is so never held by a job queued for a runner, and tasks that wait
for the same permits inside their runner slot (``with app.resource(...)``)
cannot take every runner while admitted jobs hold the permits they wait for.
A job offered to such a step is parked *fresh* (not asked yet; it counts
against prefetch like a job in the run queue) and a ``TAKE`` is put in the
run queue to bring a free runner; when its permits come back, the chain is
woken the same way.  Such steps stay last in the chain (``add``).  Without
``pull`` (a chain with no runners, as in tests), they grant where they are
asked, like the others.

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

A step's ``admit`` runs in the consumer's greenlet (for a newly fetched job),
in the admission greenlet (for a parked one) or in a free runner (``take``),
under the admission lock:
it must be quick and must not block.  A step that needs a remote answer
(a permit kept in Redis) answers WAIT with an ``until`` and asks again.
"""
from __future__ import annotations

import bisect
import functools
import heapq
import itertools
import logging
import time
from abc import ABC, abstractmethod
from typing import (TYPE_CHECKING, Any, Callable, Dict, Hashable, Iterator, List, Optional, Sequence, Set,
                    Tuple)

from ..config import parse_rate
from ..exceptions import describe

if TYPE_CHECKING:  # pragma: no cover
    from ..drivers.base import Driver
    from .jobs import Job

log = logging.getLogger("greenq.worker")

#: the longest the admission greenlet sleeps without a due time (it also wakes on ``wake``)
IDLE_WAIT = 1.0
#: the soonest a job deferred over a ``frees_room`` step's bounds is due again (``Admission._overflow_delay``)
OVERFLOW_MIN = 0.1
#: the weight of the newest wait in the running mean of the waits per need (``Admission._drained``)
DRAIN_WEIGHT = 0.3
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


class _Take:
    """The type of ``TAKE``."""
    __slots__ = ()

    def __repr__(self) -> str:
        return "<TAKE>"


#: put in the run queue (no job): "a free runner, ask the chain for a job it grants you" (``Admission.take``)
TAKE: Any = _Take()


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
    #: jobs parked here do not count against prefetch; at most ``Admission.max_waiting`` jobs
    #: (and ``max_waiting_bytes`` bytes) wait per need, the next is deferred ``overflow_backoff`` seconds
    frees_room = False
    #: what this step admits is granted only in a free runner, which runs it at once
    #: (``Admission.take``, in a worker); such steps stay last in the chain
    reserves_runner = False
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

    def needs(self, job: "Job", key: Hashable) -> Tuple[Hashable, ...]:
        """What ``job`` waits for in queue ``key`` (default: the key itself).
        Jobs of one queue are served in order per need: a job is not asked
        while one before it waits for one of its needs (the permits step: one
        queue, and the needs are the resources a task names)."""
        return (key,)

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
    """The jobs parked on one queue of a step, in order: by (rank, arrival),
    where the rank is minus the message's priority for a ``by_priority`` step
    and 0 otherwise (arrival order).

    Each entry is ``[rank, seq, since, job, needs, size, refused]``: when the
    job was parked (monotonic seconds), what it waits for (``step.needs``),
    its body's length, and whether it is *refused*: the step said WAIT to it
    or it waits behind one that was (a job is parked *fresh*, not asked yet,
    only where runners take their jobs from the chain: ``Admission.take``).
    Per need, ``present`` counts the entries naming it and ``counts`` and
    ``bytes`` the refused ones (the bounds of ``frees_room``).  ``warned``
    holds the arrival numbers of the jobs already said to wait long."""

    __slots__ = ("_entries", "by_priority", "warned", "present", "counts", "bytes", "fresh")

    def __init__(self, by_priority: bool) -> None:
        self._entries: List[List[Any]] = []          # sorted by (rank, seq): seq is unique
        self.by_priority = by_priority
        self.warned: Set[int] = set()
        self.present: Dict[Hashable, int] = {}
        self.counts: Dict[Hashable, int] = {}
        self.bytes: Dict[Hashable, int] = {}
        self.fresh = 0

    def push(self, job: "Job", seq: int, since: float, needs: Tuple[Hashable, ...], size: int,
             refused: bool) -> List[Any]:
        rank = -(getattr(job.msg, "priority", 0) or 0) if self.by_priority else 0
        entry = [rank, seq, since, job, needs, size, False]
        bisect.insort(self._entries, entry)
        for need in needs:
            self.present[need] = self.present.get(need, 0) + 1
        self.fresh += 1
        if refused:
            self.refuse(entry)
        return entry

    def refuse(self, entry: List[Any]) -> None:
        """``entry`` waits for its needs now (counted against the bounds)."""
        if entry[6]:
            return
        entry[6] = True
        self.fresh -= 1
        for need in entry[4]:
            self.counts[need] = self.counts.get(need, 0) + 1
            self.bytes[need] = self.bytes.get(need, 0) + entry[5]

    def remove(self, entry: List[Any]) -> bool:
        """Take ``entry`` out; whether it was said to wait long."""
        del self._entries[bisect.bisect_left(self._entries, entry[:2])]
        for need in entry[4]:
            _decrement(self.present, need, 1)
            if entry[6]:
                _decrement(self.counts, need, 1)
                _decrement(self.bytes, need, entry[5])
        if not entry[6]:
            self.fresh -= 1
        warned = entry[1] in self.warned
        if warned:
            self.warned.discard(entry[1])
        return warned

    def shares(self, needs: Tuple[Hashable, ...]) -> bool:
        """Does a parked job wait for one of ``needs``?"""
        return any(need in self.present for need in needs)

    def refused_on(self, needs: Tuple[Hashable, ...]) -> bool:
        """Does a refused job wait for one of ``needs``?"""
        return any(need in self.counts for need in needs)

    def live(self) -> List[List[Any]]:
        """The entries themselves, in order (``remove`` deletes from this list)."""
        return self._entries

    def older(self, before: float) -> List[Tuple["Job", float]]:
        """The refused jobs parked before ``before`` not said to wait long yet (now marked so), with when."""
        out = []
        for _, seq, since, job, _, _, refused in self._entries:
            if refused and since <= before and seq not in self.warned:
                self.warned.add(seq)
                out.append((job, since))
        return out

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator["Job"]:
        return (entry[3] for entry in list(self._entries))


def _decrement(counts: Dict[Hashable, int], key: Hashable, by: int) -> None:
    left = counts.get(key, 0) - by
    if left > 0:
        counts[key] = left
    else:
        counts.pop(key, None)


QueueKey = Tuple[AdmissionStep, Hashable]
#: what a scan admitted: (job, step, parked at, refused, warned)
Admitted = Tuple["Job", AdmissionStep, float, bool, bool]


class Admission:
    """The worker's chain of admission steps and the jobs parked in it.

    ``run(job)`` puts an admitted job (or a ``TAKE``) in the run queue; ``defer(job, eta)``
    hands a deferred one to the settler.  ``loop`` (a control greenlet)
    offers parked jobs again when their time comes or their key is woken.
    With ``pull`` (a worker's chain: its runners call ``take``), the steps
    that ``reserves_runner`` grant in a free runner only (see the module
    docstring)."""

    def __init__(self, driver: "Driver", run: Callable[[Any], None],
                 defer: Callable[["Job", float], None], steps: Sequence[AdmissionStep] = ()) -> None:
        self.driver = driver
        self._run = run
        self._defer = defer
        self.steps: List[AdmissionStep] = []
        self._lock = driver.lock()
        self._event = driver.event()
        self._parked: Dict[QueueKey, Waiters] = {}
        self._due: List[Tuple[float, int, QueueKey]] = []   # heap: (until, seq, queue)
        self._woken: Set[QueueKey] = set()
        self._seq = itertools.count()
        self._closed = False
        #: runners take the jobs of ``reserves_runner`` steps (``take``): set by the worker's assembly
        self.pull = False
        #: called when parked jobs stopped counting against prefetch (the consumer's room event)
        self.on_room: Callable[[], None] = lambda: None
        #: jobs that may wait per need at a ``frees_room`` step (0: no bound); the worker sets its prefetch
        self.max_waiting = 0
        #: bytes of bodies that may wait per need at a ``frees_room`` step (0: no bound); the worker
        #: sets its prefetch_bytes (one job always may wait, however big)
        self.max_waiting_bytes = 0
        #: the latest eta (epoch seconds) of a job this worker sent back to the broker: a --burst
        #: worker does not stop before it (RabbitMQ cannot say when its delayed messages are due)
        self.deferred_until = 0.0
        self._drained: Dict[Hashable, float] = {}   # per need at ``frees_room`` steps: the recent wait (seconds)
        self._exempt = 0            # refused jobs parked at ``frees_room`` steps (not counted against prefetch)
        self._exempt_bytes = 0      # ... and their bodies' bytes
        self._ready: Set[QueueKey] = set()   # pull: queues a runner's ``take`` should look at
        self._token_out = False     # pull: a TAKE is in the run queue, not taken yet
        self._watched = 0.0         # when the loop last looked for jobs waiting long
        for step in steps:
            self.add(step)

    # -- the chain ---------------------------------------------------------------
    def add(self, step: AdmissionStep) -> AdmissionStep:
        """Add ``step`` at the end of the chain, but before the steps that
        ``reserves_runner`` (they stay last: what they grant goes to a runner at once)."""
        step.attach(functools.partial(self._wake_key, step))
        steps = list(self.steps)
        at = len(steps)
        if not step.reserves_runner:
            at = next((i for i, s in enumerate(steps) if s.reserves_runner), at)
        steps.insert(at, step)
        self.steps = steps          # a new list: an offer under way keeps the one it began with
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
        """How many parked jobs do not count against prefetch (refused at ``frees_room`` steps)."""
        return self._exempt

    @property
    def exempt_bytes(self) -> int:
        """Their bodies' bytes (not counted against prefetch_bytes)."""
        return self._exempt_bytes

    def waiting(self, index: int, key: Hashable) -> int:
        """How many jobs wait on ``key`` at step number ``index``."""
        with self._lock:
            return len(self._parked.get((self.steps[index], key), ()))

    def waiting_at(self, name: str) -> Dict[Hashable, int]:
        """How many jobs wait for each need at the step named ``name`` (a job
        waiting for two resources counts for both; for stats: a look, not a path)."""
        out: Dict[Hashable, int] = {}
        with self._lock:
            for (step, _), waiting in self._parked.items():
                if step.name == name:
                    for need, count in waiting.present.items():
                        out[need] = out.get(need, 0) + count
        return out

    # -- offering -----------------------------------------------------------------
    def offer(self, job: "Job", start: int = 0) -> None:
        """Pass ``job`` through the steps from ``start``; it runs, parks or is deferred."""
        steps = self.steps
        for index in range(start, len(steps)):
            step = steps[index]
            key = step.key(job)
            if key is None:
                continue
            queue_key = (step, key)
            token = parked = False
            with self._lock:
                waiting = self._parked.get(queue_key)
                needs = step.needs(job, key)
                size = len(job.delivery.body or b"") if step.frees_room else 0
                pull = self.pull and step.reserves_runner
                decision = RUN
                if waiting and waiting.shares(needs):          # behind those already waiting
                    if self._full(step, waiting, needs, size):  # back to the broker, for a worker with room
                        decision = defer(time.time() + self._overflow_delay(step, needs))
                    else:
                        refused = waiting.refused_on(needs)
                        self._push(queue_key, job, needs, size, refused)
                        token = pull and not refused and self._mark_ready(queue_key)
                        parked = True
                elif pull:                   # granted in a free runner only (take): parked fresh
                    self._push(queue_key, job, needs, size, False)
                    token = self._mark_ready(queue_key)
                    parked = True
                else:
                    decision = step.admit(job)
                    if decision.kind == "wait":
                        self._push(queue_key, job, needs, size, True, decision.until)
                        parked = True
            if parked:
                if token:
                    self._run(TAKE)
                return
            if decision.kind == "defer":
                self._deferred(job, decision.eta)
                return
            self._admitted(job, step)
        self._run(job)

    def _full(self, step: AdmissionStep, waiting: Waiters, needs: Tuple[Hashable, ...], size: int) -> bool:
        """Would one more job of ``needs`` (``size`` bytes) go over a ``frees_room`` step's bounds?"""
        if not step.frees_room:
            return False
        for need in needs:
            count = waiting.counts.get(need, 0)
            if not count:
                continue
            if 0 < self.max_waiting <= count:
                return True
            if 0 < self.max_waiting_bytes < waiting.bytes.get(need, 0) + size:
                return True
        return False

    def _overflow_delay(self, step: AdmissionStep, needs: Tuple[Hashable, ...]) -> float:
        """Seconds until a job deferred for going over a ``frees_room`` step's
        bounds is due again: about when this worker's waiters of ``needs``
        have been served (the recent wait of those admitted there,
        ``_drained``), between ``OVERFLOW_MIN`` and the step's
        ``overflow_backoff``.  A fixed ``overflow_backoff`` took every task of
        a backlog out of the queue for that long, while the few that waited
        here were served in a fraction of it: the permits then stood idle."""
        drained = max((self._drained.get(need, OVERFLOW_MIN) for need in needs), default=OVERFLOW_MIN)
        return min(step.overflow_backoff, max(OVERFLOW_MIN, drained))

    def _push(self, queue_key: QueueKey, job: "Job", needs: Tuple[Hashable, ...], size: int, refused: bool,
              until: Optional[float] = None) -> None:
        step = queue_key[0]
        waiting = self._parked.get(queue_key)
        if waiting is None:
            waiting = self._parked[queue_key] = Waiters(step.by_priority)
        entry = waiting.push(job, next(self._seq), time.monotonic(), needs, size, False)
        if refused:
            self._refuse(step, waiting, entry)
        if until is not None:
            heapq.heappush(self._due, (until, next(self._seq), queue_key))
            self._event.set()               # the loop may sleep past this time: look again

    def _refuse(self, step: AdmissionStep, waiting: Waiters, entry: List[Any]) -> None:
        if entry[6]:
            return
        waiting.refuse(entry)
        if step.frees_room:
            self._exempt += 1
            self._exempt_bytes += entry[5]

    def _remove(self, step: AdmissionStep, waiting: Waiters, entry: List[Any]) -> bool:
        if entry[6] and step.frees_room:
            self._exempt -= 1
            self._exempt_bytes -= entry[5]
        return waiting.remove(entry)

    def _mark_ready(self, queue_key: QueueKey) -> bool:
        """Pull: a runner should look at ``queue_key``; True when the caller must put a TAKE
        in the run queue (none is there yet).  Under the lock."""
        self._ready.add(queue_key)
        if self._token_out:
            return False
        self._token_out = True
        return True

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

    def _wake_key(self, step: AdmissionStep, key: Hashable) -> None:
        queue_key = (step, key)
        token = False
        with self._lock:
            if queue_key in self._parked:
                if self.pull and step.reserves_runner:
                    token = self._mark_ready(queue_key)
                else:
                    self._woken.add(queue_key)
        if token:
            self._run(TAKE)
        self._event.set()

    # -- serving parked jobs ------------------------------------------------------
    def _scan(self, queue_key: QueueKey, waiting: Waiters, grants: Optional[int],
              admitted: List[Admitted], deferred: List[Tuple["Job", Optional[float]]]) -> Tuple[bool, bool]:
        """Ask the jobs of one queue again, in order, under the lock.  A job
        is asked only if no job before it waits for one of its needs (those
        are *blocked*): a job that is refused, or skipped, blocks its needs
        for the jobs after it, so nobody overtakes a job on a need it waits
        for, whatever else either needs.  At most ``grants`` jobs are
        admitted (None: no bound).  Returns (more, freed): whether it stopped
        on ``grants`` before a job that could be asked, and whether jobs
        stopped counting against prefetch (fresh ones refused)."""
        step = queue_key[0]
        blocked: Set[Hashable] = set()
        more = freed = False
        entries = waiting.live()            # walked in place: an entry taken out is not stepped over
        at = 0
        while at < len(entries):
            entry = entries[at]
            needs, job = entry[4], entry[3]
            if not waiting.fresh and len(blocked) >= len(waiting.present) and blocked.issuperset(waiting.present):
                break                                       # every job left waits behind another
            if not blocked.isdisjoint(needs):
                blocked.update(needs)
                held, refused_now = self._hold(step, waiting, entry, deferred)
                freed |= refused_now
                at += held
                continue
            if grants is not None and grants <= 0:
                more = True
                break
            decision = step.admit(job)
            if decision.kind == "wait":
                blocked.update(needs)
                if decision.until is not None:
                    heapq.heappush(self._due, (decision.until, next(self._seq), queue_key))
                    if self._due[0][0] == decision.until:   # from a runner (take): the loop may sleep past it
                        self._event.set()
                held, refused_now = self._hold(step, waiting, entry, deferred)
                freed |= refused_now
                at += held
                continue
            refused = entry[6]
            warned = self._remove(step, waiting, entry)
            if decision.kind == "defer":
                deferred.append((job, decision.eta))
            else:
                admitted.append((job, step, entry[2], refused, warned))
                if grants is not None:
                    grants -= 1
        return more, freed

    def _hold(self, step: AdmissionStep, waiting: Waiters, entry: List[Any],
              deferred: List[Tuple["Job", Optional[float]]]) -> Tuple[int, bool]:
        """A job found it must wait.  A fresh one is refused now (it stops
        counting against prefetch), or deferred if that goes over the step's
        bounds.  Returns (1 if it stays parked else 0, whether room was freed)."""
        if entry[6]:
            return 1, False
        if self._full(step, waiting, entry[4], entry[5]):
            self._remove(step, waiting, entry)
            deferred.append((entry[3], time.time() + self._overflow_delay(step, entry[4])))
            return 0, False
        self._refuse(step, waiting, entry)
        return 1, step.frees_room

    def serve(self) -> None:
        """Ask the jobs of the queues that are due or woken again; go on with
        those admitted (outside the lock: the next steps, then the run queue).
        Pull: the queues of ``reserves_runner`` steps are left to a runner (``take``)."""
        now = time.monotonic()
        admitted: List[Admitted] = []
        deferred: List[Tuple["Job", Optional[float]]] = []
        token = freed = False
        with self._lock:
            ready = self._woken
            self._woken = set()
            while self._due and self._due[0][0] <= now:
                ready.add(heapq.heappop(self._due)[2])
            for queue_key in ready:
                waiting = self._parked.get(queue_key)
                if not waiting:
                    continue
                if self.pull and queue_key[0].reserves_runner:
                    token = self._mark_ready(queue_key) or token
                    continue
                freed |= self._scan(queue_key, waiting, None, admitted, deferred)[1]
                if not waiting:
                    self._parked.pop(queue_key, None)
        if token:
            self._run(TAKE)
        self._go_on(now, admitted, deferred, freed)
        for job, step, _, _, _ in admitted:
            self._admitted(job, step)
            self.offer(job, self.steps.index(step) + 1)

    def _go_on(self, now: float, admitted: List[Admitted], deferred: List[Tuple["Job", Optional[float]]],
               freed: bool) -> None:
        """After a scan, outside the lock: the deferred back to the broker, the
        waits told to their steps, the consumer told of room."""
        for job, eta in deferred:
            self._deferred(job, eta)
        for job, step, since, refused, warned in admitted:
            if refused:                 # a fresh job taken at once did not wait for a permit
                self._waited(job, step, now - since, warned)
                if step.frees_room:     # how long a waiter here waits: when to bring an overflow back
                    key = step.key(job)
                    for need in (step.needs(job, key) if key is not None else ()):
                        last = self._drained.get(need)
                        seconds = now - since
                        self._drained[need] = seconds if last is None else last + (seconds - last) * DRAIN_WEIGHT
        if freed:
            self.on_room()

    def take(self, token: bool = False) -> Optional["Job"]:
        """Pull: called by a runner that is free, before it takes the next job
        from the run queue, and when it took a TAKE from it (``token``): one
        job that a ``reserves_runner`` step grants now, for this runner (its
        permits are taken at the moment it has a runner), or None.  A job
        whose grant is possible goes before the jobs in the run queue."""
        if not token and not self._ready:
            return None
        now = time.monotonic()
        admitted: List[Admitted] = []
        deferred: List[Tuple["Job", Optional[float]]] = []
        more_token = freed = False
        with self._lock:
            if token:
                self._token_out = False
            if self._closed:
                return None
            while self._ready and not admitted:
                queue_key = next(iter(self._ready))
                waiting = self._parked.get(queue_key)
                more = False
                if waiting:
                    more, scan_freed = self._scan(queue_key, waiting, 1, admitted, deferred)
                    freed |= scan_freed
                if not more:
                    self._ready.discard(queue_key)
                if not waiting:
                    self._parked.pop(queue_key, None)
            if self._ready:              # more may be granted: another free runner comes for it
                more_token = self._mark_ready(next(iter(self._ready)))
        if more_token:
            self._run(TAKE)
        self._go_on(now, admitted, deferred, freed)
        if not admitted:
            return None
        job, step = admitted[0][0], admitted[0][1]
        self._admitted(job, step)
        after = self.steps.index(step) + 1
        if any(later.key(job) is not None for later in self.steps[after:]):
            self.offer(job, after)          # another step after this one: the run queue, from there
            return None
        return job

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
            for (step, _), waiting in self._parked.items():
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
            self._exempt = self._exempt_bytes = 0
            self._due.clear()
            self._woken.clear()
            self._ready.clear()
        self._event.set()
        for job in jobs:
            self.release(job)
        return jobs
