"""The admission step of tasks with ``resources={"pg": 1}``: all their permits, or wait.

``Permits`` concerns the tasks whose ``resources`` option names something.
They all wait in one queue (``KEY``), and what each waits for (its *needs*,
``AdmissionStep.needs``) is the resources it names: the chain serves that
queue in order of priority then arrival *per resource*, so a task is not
asked while one before it waits for one of the resources it names, whatever
else either needs (greenq/worker/admission.py, ``Admission._scan``).

``admit`` takes every permit the task names, or none (what it took is given
back at once): two tasks each holding part of what they need would wait for
each other for ever.  When it cannot, the task WAITs, parked by the chain
without a runner slot, and it keeps the resources it names from the tasks
after it; a release wakes the queue, so the first waiters are asked again at
once.  A host or cluster pool is also freed by other processes, which cannot
wake us: their waiters are asked again every ``REMOTE_POLL`` seconds too.

The step ``reserves_runner``: in a worker its permits are granted only in a
runner that is free and runs the task at once (``Admission.take``), so a
permit is never held by a task queued for a runner.  Tasks that call
``with app.resource(...)`` inside their runner slot then cannot hold every
runner while admitted tasks hold the permits they wait for (the deadlock of
mixing the two ways on one resource).

The step ``frees_room``: its waiters count against neither the worker's
``prefetch`` nor its ``prefetch_bytes``, so tasks needing no permit are still
fetched and run while others wait; instead at most ``prefetch`` of them (and
``prefetch_bytes`` bytes of their bodies) wait per resource (the next one
goes back to the broker for a worker that has permits).  It orders its
waiters ``by_priority``: a higher message priority first, then arrival.

The chain times each wait (``waited``): the step keeps, per resource, how
long the tasks that got its permits had waited (greenq/resources/observe.py,
for ``inspect stats`` and ``/metrics``), and with ``wait_warning`` seconds
(``[worker] resource_wait_warning``) logs a warning, once per task, for a
task parked longer.

Release covers every ending because the runner calls the chain's release
after any outcome (success, failure, retry, time limits, revoke with
terminate, a stop's kill), and a parked job is released when it is returned.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Hashable, List, Optional, Tuple

from ..worker.admission import RUN, AdmissionStep, Decision, wait
from . import fair
from .base import PermitPool
from .observe import WaitTimes

if TYPE_CHECKING:  # pragma: no cover
    from ..worker.jobs import Job
    from .registry import Resources

log = logging.getLogger("greenq.resources")

#: seconds between two asks of a waiter whose permits come from a host or cluster pool
#: (fair.CONTENDED_POLL while other processes wait for them too)
REMOTE_POLL = fair.REMOTE_POLL
#: the one wait queue of the step (what each task waits for is its needs: the resources it names)
KEY = "permits"


def task_resources(job: "Job") -> Optional[Dict[str, int]]:
    """The ``resources`` option of ``job``'s task ({name: count}), or None."""
    task = job.task
    if task is None:
        return None
    wanted = task.option("resources")
    return wanted or None


class Permits(AdmissionStep):
    """Take every permit a task names before it gets a runner slot; give them back when it ends."""

    name = "permits"
    task_options = ("resources",)
    by_priority = True
    frees_room = True
    reserves_runner = True

    def __init__(self, resources: "Resources", clock: Callable[[], float] = time.monotonic,
                 wait_warning: float = 0.0) -> None:
        super().__init__()
        self.resources = resources
        self.clock = clock
        self.wait_warning = wait_warning
        #: how long the tasks that got permits of each resource had waited (observe.py)
        self.waits: Dict[str, WaitTimes] = {}
        self._held: Dict[int, List[Tuple[PermitPool, str, str]]] = {}   # id(job) -> (pool, resource, holder)
        self._since: Dict[int, float] = {}                              # id(job) -> when it took them
        self._lag: Dict[int, Any] = {}       # id(job) -> its runner's loop-lag mark (adaptive resources)
        resources.on_release(self._released)

    def key(self, job: "Job") -> Optional[Hashable]:
        return KEY if task_resources(job) else None

    def needs(self, job: "Job", key: Hashable) -> Tuple[Hashable, ...]:
        """The resources ``job`` names: it is served in order among the waiters of each."""
        return tuple(sorted(task_resources(job) or ()))

    def admit(self, job: "Job") -> Decision:
        wanted = task_resources(job)
        if not wanted:                          # (its option changed while it waited)
            return RUN
        assert job.msg is not None, "admission sees decoded messages only"
        taken: List[Tuple[PermitPool, str, str]] = []
        for name in sorted(wanted):
            pool = self.resources.pool(name)
            for index in range(wanted[name]):
                holder = f"{job.msg.id}#{id(job):x}:{name}:{index}"
                if not pool.try_acquire(holder):
                    for other, _, other_holder in reversed(taken):   # all or none
                        other.release(other_holder)
                    poll = self._poll(wanted)
                    return wait(None if poll is None else self.clock() + poll)
                taken.append((pool, name, holder))
        self._held[id(job)] = taken
        self._since[id(job)] = self.clock()
        if self.resources.lag is not None:
            self._lag_begin(job, wanted)
        return RUN

    def _lag_begin(self, job: "Job", wanted: Dict[str, int]) -> None:
        """Measure the worker's own delay in the task's sample of an adaptive
        resource (greenq/resources/lag.py): the green thread measured is the
        one granting, the runner that runs the task (``take``)."""
        resources = self.resources
        for name in wanted:
            if name in resources.adaptive and not getattr(resources.pools.get(name), "times_connections", False):
                mark = resources.lag_begin(name)
                if mark is not None:
                    self._lag[id(job)] = mark
                return

    def _poll(self, wanted: Dict[str, int]) -> Optional[float]:
        """Seconds until a task refused permits of ``wanted`` is asked again
        without a release here: host and cluster permits are freed by other
        processes too (every ``REMOTE_POLL`` seconds; ``fair.CONTENDED_POLL``
        while other processes wait for them); None for process scope."""
        polls = [poll for poll in (self.resources.pool(name).poll_interval() for name in wanted)
                 if poll is not None]
        return min(polls) if polls else None

    def release(self, job: "Job") -> None:
        taken = self._held.pop(id(job), None)
        since = self._since.pop(id(job), None)
        mark = self._lag.pop(id(job), None) if self._lag else None
        if not taken:
            return
        if since is not None and job.started:    # what the downstream took: adaptive limits learn from it
            latency = self.clock() - since
            lag = self.resources.lag_end(mark)   # the worker's own delay in it (0 from another runner)
            for name in {name for _, name, _ in taken}:
                pool = self.resources.pool(name)
                self.resources.sample(name, latency, pool.in_use(), job.exc, lag=lag)
        freed = set()
        for pool, name, holder in reversed(taken):
            pool.release(holder)
            freed.add(name)
        for name in freed:
            self._released(name)

    def waited(self, job: "Job", seconds: float) -> None:
        """``job`` got its permits after ``seconds`` parked: a wait of each resource it names."""
        for name in task_resources(job) or ():
            times = self.waits.get(name)
            if times is None:
                times = self.waits[name] = WaitTimes()
            times.observe(seconds)

    def waiting_long(self, job: "Job", seconds: float) -> None:
        """The warning of a task parked past ``wait_warning`` (once per task)."""
        names = sorted(task_resources(job) or ())
        task = f"{job.msg.task}[{job.msg.id}]" if job.msg is not None else "a task"
        held = ", ".join(f"{name} {self._in_use(name)}/{self._limit(name)} in use" for name in names)
        log.warning("task %s has waited %.1f s for a permit of %s (%s); [worker] resource_wait_warning "
                    "= %g s: the resource is saturated (its permits are all held) or these tasks queue "
                    "behind higher priorities",
                    task, seconds, ", ".join(names), held, self.wait_warning)

    def _in_use(self, name: str) -> int:
        pool = self.resources.pools.get(name)
        return pool.in_use() if pool is not None else 0

    def _limit(self, name: str) -> int:
        pool = self.resources.pools.get(name)
        return pool.limit if pool is not None else self.resources.settings[name].limit

    def held(self) -> int:
        """Jobs holding permits now."""
        return len(self._held)

    def _released(self, name: str) -> None:
        """A permit of ``name`` came back (here or through ``app.resource``): ask the waiters again."""
        self.wake(KEY)
