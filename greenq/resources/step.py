"""The admission step of tasks with ``resources={"pg": 1}``: all their permits, or wait.

``Permits`` concerns the tasks whose ``resources`` option names something;
its wait key is the sorted tuple of the resource names, so tasks needing the
same resources queue together.  ``admit`` takes every permit the task names,
or none (what it took is given back at once): two tasks each holding half of
what they need would wait for each other for ever.  When it cannot, the task
WAITs, parked by the admission chain without a runner slot; a release wakes
the keys that name the freed resource, so the head waiter is asked again at
once.  A host or cluster pool is also freed by other processes, which cannot
wake us: their waiters are asked again every ``REMOTE_POLL`` seconds too.

The step ``frees_room`` (greenq/worker/admission.py): its waiters do not count
against the worker's prefetch, so tasks needing no permit are still fetched
and run while others wait, and at most ``prefetch`` of them wait per key
(the next one goes back to the broker for a worker that has permits).  It
orders its waiters ``by_priority``: a higher message priority first, then
arrival order.

Release covers every ending because the runner calls the chain's release
after any outcome (success, failure, retry, time limits, revoke with
terminate, a stop's kill), and a parked job is released when it is returned.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Callable, Dict, Hashable, List, Optional, Set, Tuple

from ..worker.admission import RUN, AdmissionStep, Decision, wait
from .base import PermitPool
from .process import ProcessPool

if TYPE_CHECKING:  # pragma: no cover
    from ..worker.jobs import Job
    from .registry import Resources

#: seconds between two asks of a waiter whose permits come from a host or cluster pool
REMOTE_POLL = 0.075


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

    def __init__(self, resources: "Resources", clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.resources = resources
        self.clock = clock
        self._held: Dict[int, List[Tuple[PermitPool, str, str]]] = {}   # id(job) -> (pool, resource, holder)
        self._since: Dict[int, float] = {}                              # id(job) -> when it took them
        self._keys: Dict[str, Set[Tuple[str, ...]]] = {}                # resource -> the wait keys naming it
        resources.on_release(self._released)

    def key(self, job: "Job") -> Optional[Hashable]:
        wanted = task_resources(job)
        if not wanted:
            return None
        key = tuple(sorted(wanted))
        for name in key:
            keys = self._keys.get(name)
            if keys is None:
                keys = self._keys[name] = set()
            keys.add(key)
        return key

    def admit(self, job: "Job") -> Decision:
        wanted = task_resources(job)
        if not wanted:                          # (its option changed while it waited)
            return RUN
        assert job.msg is not None, "admission sees decoded messages only"
        taken: List[Tuple[PermitPool, str, str]] = []
        remote = False
        for name in sorted(wanted):
            pool = self.resources.pool(name)
            remote = remote or not isinstance(pool, ProcessPool)
            for index in range(wanted[name]):
                holder = f"{job.msg.id}#{id(job):x}:{name}:{index}"
                if not pool.try_acquire(holder):
                    for other, _, other_holder in reversed(taken):   # all or none
                        other.release(other_holder)
                    return wait(self.clock() + REMOTE_POLL if remote or self._remote(wanted) else None)
                taken.append((pool, name, holder))
        self._held[id(job)] = taken
        self._since[id(job)] = self.clock()
        return RUN

    def _remote(self, wanted: Dict[str, int]) -> bool:
        return any(not isinstance(self.resources.pool(name), ProcessPool) for name in wanted)

    def release(self, job: "Job") -> None:
        taken = self._held.pop(id(job), None)
        since = self._since.pop(id(job), None)
        if not taken:
            return
        if since is not None and job.started:    # what the downstream took: adaptive limits learn from it
            latency = self.clock() - since
            for name in {name for _, name, _ in taken}:
                pool = self.resources.pool(name)
                self.resources.sample(name, latency, pool.in_use(), job.exc)
        freed = set()
        for pool, name, holder in reversed(taken):
            pool.release(holder)
            freed.add(name)
        for name in freed:
            self._released(name)

    def held(self) -> int:
        """Jobs holding permits now."""
        return len(self._held)

    def _released(self, name: str) -> None:
        """A permit of ``name`` came back (here or through ``app.resource``): ask its waiters again."""
        for key in list(self._keys.get(name, ())):
            self.wake(key)
