"""The worker's own copy of the revoked task ids.

A revoke (``AsyncResult.revoke``, ``greenq revoke``) is recorded in the result
backend, which keeps it for ``result_expires``, and then broadcast over the
control plane (greenq/control/).  Each worker:

* loads the backend's revocations before it takes its first message, so a
  worker started after a revoke knows it;
* adds what the control plane broadcasts (``revoke`` command) at once, and
  kills the running tasks revoked with ``terminate=True``;
* re-reads the revocations made since shortly before the newest one it
  read from the backend, every ``SYNC_PUSHED`` seconds while the control
  plane is connected (a safety net for a broadcast missed during a
  reconnect), and every ``SYNC_POLLED`` seconds while it is not (a broker
  without a control plane, or one that is away).

Each ``at`` is the revoking process's clock.  The re-read cursor (``newest``)
moves only with what the backend returned, and never past this worker's own
clock: a broadcast, or a revoker whose clock is ahead, cannot make the next
re-reads skip the revocations recorded after it.  An ``at`` more than
``CLOCK_SKEW`` seconds ahead of this worker's clock is taken as now (the
``revoke`` command does the same), so such an entry still expires after
``result_expires`` and does not hold the oldest-first trimming back.

Checking a message is then a dict look-up in the worker, not a call to the
backend per fetched batch.  The copy keeps the newest ``REVOCATIONS_MAX`` ids
and forgets those older than ``result_expires``.
"""
from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, List, Tuple

from ..backends.base import REVOCATIONS_MAX, Revocation
from ..exceptions import describe

if TYPE_CHECKING:  # pragma: no cover
    from ..drivers.base import Driver

log = logging.getLogger("greenq.worker")

SYNC_PUSHED = 30.0      # seconds between re-reads while the control plane delivers revokes
SYNC_POLLED = 1.0       # ... while it does not
SYNC_OVERLAP = 60.0     # re-read from this long before the newest revoke read (clocks differ)
CLOCK_SKEW = 60.0       # an ``at`` further ahead of this worker's clock is taken as now


def plausible_at(at: float, now: float) -> float:
    """``at``, or ``now`` when it is more than ``CLOCK_SKEW`` seconds ahead of
    ``now`` (or not a number): a clock far ahead, or a garbled command."""
    return at if at <= now + CLOCK_SKEW else now      # NaN compares false: now


class Revocations:
    """``backend()``: the result backend; ``expires()``: ``result_expires``
    (read when used: a test may change it); ``terminate(ids)``: kill the
    running tasks among ``ids`` (the reaper's); ``stopped``: the worker's
    event that ends the loop."""

    def __init__(self, driver: "Driver", backend: Callable[[], Any], expires: Callable[[], float],
                 terminate: Callable[[List[str]], None], stopped: Any) -> None:
        self._backend = backend
        self._expires = expires
        self._terminate = terminate
        self.stopped = stopped
        self.ids: Dict[str, Tuple[bool, float]] = {}     # task id -> (terminate, revoked at), oldest first
        self.newest = 0.0            # the re-read cursor: the latest ``at`` read from the backend,
                                     # at most this worker's clock then; the next re-read starts before it
        self.loaded = False          # the backend was read at least once
        self.pushed = False          # set by the control agent while it is listening
        self._wake = driver.event()
        self._lock = driver.lock()

    def __contains__(self, task_id: object) -> bool:
        return task_id in self.ids

    def terminates(self, task_id: str) -> bool:
        entry = self.ids.get(task_id)
        return bool(entry and entry[0])

    def add(self, found: Iterable[Revocation]) -> List[str]:
        """Merge revocations in; return the ids newly revoked with terminate.
        Never moves the re-read cursor: ``sync`` does, from what it read."""
        terminate: List[str] = []
        now = time.time()
        oldest = self._oldest(now)
        with self._lock:              # the control greenlet and the re-read loop both add
            ids = self.ids
            for r in found:
                at = plausible_at(r.at, now)
                if at < oldest:       # expired already
                    continue
                known = ids.get(r.task_id)
                if known is None or (r.terminate and not known[0]):
                    ids[r.task_id] = (r.terminate, at)
                    if r.terminate:
                        terminate.append(r.task_id)
            self._trim(oldest)
        return terminate

    def _oldest(self, now: float) -> float:
        expires = self._expires()
        return now - expires if expires else 0.0

    def _trim(self, oldest: float) -> None:
        """Forget the oldest beyond ``REVOCATIONS_MAX`` and the expired."""
        ids = self.ids
        while ids:
            first = next(iter(ids))
            if len(ids) <= REVOCATIONS_MAX and ids[first][1] >= oldest:
                break
            del ids[first]

    def sync(self) -> None:
        """Read the revocations made since shortly before the newest one read;
        terminate the running tasks among them.  Raises what the backend raises."""
        since = max(0.0, self.newest - SYNC_OVERLAP) if self.loaded else 0.0
        asked = time.time()
        found = self._backend().revocations(since)
        self.loaded = True
        # the cursor: the newest ``at`` read, but not past this worker's clock
        # when it asked (a revoker's clock ahead would skip later revokes)
        newest = min(max((r.at for r in found), default=0.0), asked)
        if newest > self.newest:
            self.newest = newest
        self._terminate(self.add(found))

    def received(self, task_ids: Iterable[str], terminate: bool, at: float) -> int:
        """A ``revoke`` broadcast (control greenlet): known at once.  Its ``at``
        (the sender's clock) is kept for expiry only, never as the re-read cursor."""
        found = [Revocation(t, terminate, at) for t in task_ids]
        self._terminate(self.add(found))
        return len(found)

    def resync(self) -> None:
        """Re-read soon (the control plane reconnected: it may have missed some)."""
        self._wake.set()

    # -- the loop -------------------------------------------------------------
    def first_load(self) -> None:
        """Before the first fetch: one attempt, so a worker started after a
        revoke skips the task; an unreachable backend is retried by the loop."""
        try:
            self.sync()
            log.debug("revocations: %d known", len(self.ids))
        except Exception as exc:
            log.warning("could not read revocations: %s; retrying every %.0f s", describe(exc), SYNC_POLLED)

    def loop(self) -> None:
        while not self.stopped.is_set():
            self._wake.wait(SYNC_PUSHED if self.pushed and self.loaded else SYNC_POLLED)
            self._wake.clear()
            if self.stopped.is_set():
                break
            try:
                self.sync()
            except Exception as exc:
                log.warning("could not read revocations: %s", describe(exc))

    def stop(self) -> None:
        self._wake.set()
