"""Fair shares of a host or cluster resource between the processes waiting for it.

Without this, a process whose own waiters take a permit as it frees keeps
it (the release and the next take are one step in that process), while
another process only learns of a free permit when it asks again: under a
steady stream one process ran all the work.  So the processes that wait
for a resource say so, in the scope's shared place, and a process that
holds its share while others wait gives a permit it frees back to the
scope instead of handing it to its own next waiter.

**Who waits.**  A process is *waiting* for a resource while its permit
requests are refused: each refusal refreshes its *marker* (at most every
``REFRESH`` seconds), and a marker counts for ``MARK_TTL`` seconds after it
was last refreshed.  So a process that stops waiting, or dies (kill -9),
stops counting within ``MARK_TTL`` with nothing to clean up; a dead
process's marker is removed by the next process that reads the markers
(host) or rewrites them (cluster) once it is ``FORGET`` seconds old.

* host: an empty file ``w.<pid>.<random>`` beside the resource's lock
  files; its mtime is the last refresh (``os.utime``: one system call).
* cluster: one record of the coordination interface,
  ``resource:<name>:waiting``, a field per process (its pool's id) whose
  value is the wall-clock time of its last refresh (compare-and-set; the
  record itself expires ``FORGET`` seconds after its last write).  Read at
  most every ``CLUSTER_READ`` seconds per process.

**The share.**  With ``n`` processes wanting permits (this one and the
others with a live marker) and ``L`` places, a process may hold
``floor(L / n)`` while others wait, and one more when it is its *turn*: the
processes' ids sorted, the ``L mod n`` places left over go to ``L mod n`` of
them, starting at one that moves round them every ``SLICE`` seconds of the
wall clock (so a limit of 1 alternates between two processes slice by
slice).  With nobody else waiting there is no bound.  The shares add up to
``L`` exactly, so while a place is free some waiting process is under its
share and takes it: no permit stays free for fairness' sake while the
processes agree on who waits (below).

**Waking.**  A process that sees others waiting asks for its refused
permits every ``CONTENDED_POLL`` seconds instead of ``REMOTE_POLL`` (the
admission step's wait; greenq/resources/step.py): a place given back to the
scope is taken by the process whose share it is within about that time.

Fairness is between processes, by count of permits held, and it is
advisory: the limit itself is kept by the lock files and the lease, as
before.  A marker that a process no longer refreshes (it got what it
waited for, or it died) still counts for up to ``MARK_TTL``: meanwhile the
other processes keep to their shares, and permits may stay free for that
long.  Clocks: the host's one clock; in cluster scope the machines' wall
clocks, which only need to agree to well within ``SLICE`` (a skew moves the
turn, it does not break the limit).
"""
from __future__ import annotations

import logging
import math
import os
import time
import uuid
from typing import TYPE_CHECKING, Callable, List, Optional

if TYPE_CHECKING:  # pragma: no cover
    from ..coordination import Coordination

log = logging.getLogger("greenq.resources")

#: seconds a waiting process's marker counts after its last refresh
MARK_TTL = 0.5
#: a marker is refreshed at most this often (a refusal in between changes nothing)
REFRESH = MARK_TTL / 5
#: a marker this old belongs to a process that is gone: removed (host) or dropped (cluster)
FORGET = 30.0
#: seconds of the wall clock each process's turn lasts (the permits left over by the shares' floor)
SLICE = 0.2
#: seconds between two asks of a refused waiter when other processes wait too (else REMOTE_POLL)
CONTENDED_POLL = 0.01
#: seconds between two asks of a refused waiter when nobody else waits
REMOTE_POLL = 0.075
#: seconds a cluster pool reuses its read of the waiters' record
CLUSTER_READ = 0.02
#: seconds a host pool reuses its look at the markers
HOST_READ = 0.002


def share(limit: int, me: str, others: List[str], now: float) -> Optional[int]:
    """The permits process ``me`` may hold while ``others`` wait for the same
    ``limit`` places: None (no bound) when nobody else waits, else
    ``floor(limit / n)``, plus one for the ``limit mod n`` processes whose
    turn it is (the shares add up to ``limit`` exactly)."""
    if not others:
        return None
    everyone = sorted({me, *others})
    n = len(everyone)
    floor, extra = divmod(limit, n)
    if not extra:
        return floor
    # the ``extra`` places left over go to ``extra`` processes in turn, from the slice's first
    first = int(math.floor(now / SLICE)) % n
    return floor + 1 if (everyone.index(me) - first) % n < extra else floor


class Waiters:
    """One process's view of who waits for one resource, and its own marker.
    Subclasses keep the markers (host: files; cluster: a record)."""

    read_every = HOST_READ

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.me = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self._others: List[str] = []
        self._read_at = -math.inf
        self._refreshed = -math.inf

    # -- what the pools ask ------------------------------------------------------------
    def share(self, limit: int) -> Optional[int]:
        """The permits this process may hold now (None: no bound)."""
        return share(limit, self.me, self.others(), self.clock())

    def contended(self) -> bool:
        """Do other processes wait (as of the last look)?"""
        return bool(self.others())

    def others(self) -> List[str]:
        now = time.monotonic()
        if now - self._read_at >= self.read_every:
            self._read_at = now
            try:
                self._others = self._read(self.clock())
            except Exception as exc:            # fairness is advisory: no bound when it cannot be read
                log.debug("resource waiters: reading failed: %s: %s", type(exc).__name__, exc)
                self._others = []
        return self._others

    def refused(self) -> None:
        """A permit request of this process was refused: it waits (refresh its marker)."""
        now = time.monotonic()
        if now - self._refreshed < REFRESH:
            return
        self._refreshed = now
        try:
            self._mark(self.clock())
        except Exception as exc:
            log.debug("resource waiters: marking failed: %s: %s", type(exc).__name__, exc)

    def close(self) -> None:
        try:
            self._unmark()
        except Exception as exc:
            log.debug("resource waiters: unmarking failed: %s: %s", type(exc).__name__, exc)

    # -- the scope's -------------------------------------------------------------------
    def _read(self, now: float) -> List[str]:
        """The ids of the other processes whose marker is live at ``now``."""
        raise NotImplementedError

    def _mark(self, now: float) -> None:
        raise NotImplementedError

    def _unmark(self) -> None:
        raise NotImplementedError


class FileWaiters(Waiters):
    """Host scope: a marker file per waiting process in the resource's directory."""

    PREFIX = "w."

    def __init__(self, directory: str, clock: Callable[[], float] = time.time) -> None:
        super().__init__(clock)
        self.directory = directory
        self._fd: Optional[int] = None

    def _path(self) -> str:
        return os.path.join(self.directory, self.PREFIX + self.me)

    def _read(self, now: float) -> List[str]:
        found = []
        with os.scandir(self.directory) as entries:
            for entry in entries:
                name = entry.name
                if not name.startswith(self.PREFIX) or name == self.PREFIX + self.me:
                    continue
                try:
                    age = now - entry.stat(follow_symlinks=False).st_mtime
                except OSError:
                    continue
                if age <= MARK_TTL:
                    found.append(name[len(self.PREFIX):])
                elif age > FORGET:
                    try:
                        os.unlink(entry.path)
                    except OSError:
                        pass
        return found

    def _mark(self, now: float) -> None:
        if self._fd is not None:
            try:
                os.utime(self._fd, (now, now))
                if os.path.exists(self._path()):
                    return
            except OSError:
                pass
            self._forget()
        path = self._path()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.utime(self._fd, (now, now))

    def _forget(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            try:
                os.close(fd)
            except OSError:
                pass

    def _unmark(self) -> None:
        if self._fd is not None:
            self._forget()
            try:
                os.unlink(self._path())
            except OSError:
                pass

    def forget_in_child(self) -> None:
        """A forked child: the marker is the parent's (closed, not removed); the child gets its own id."""
        self._forget()
        self.me = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self._others, self._read_at, self._refreshed = [], -math.inf, -math.inf


class RecordWaiters(Waiters):
    """Cluster scope: a record of the coordination interface, a field per waiting process."""

    read_every = CLUSTER_READ

    def __init__(self, coordination: "Coordination", name: str, me: str,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(clock)
        self.coordination = coordination
        self.name = name
        self.me = me
        self._marked = False

    def _live(self, record: "dict[str, bytes]", now: float, ttl: float) -> "dict[str, bytes]":
        live = {}
        for field, value in record.items():
            try:
                at = float(value)
            except ValueError:
                continue
            if now - at <= ttl:
                live[field] = value
        return live

    def _read(self, now: float) -> List[str]:
        record = self.coordination.read(self.name)
        return [field for field in self._live(record, now, MARK_TTL) if field != self.me]

    def _mark(self, now: float) -> None:
        for _ in range(2):                      # one retry when another process wrote in between
            record = self.coordination.read(self.name)
            new = self._live(record, now, FORGET)
            new[self.me] = f"{now:.3f}".encode()
            if self.coordination.compare_and_set(self.name, record, new, ttl=FORGET):
                self._marked = True
                return

    def _unmark(self) -> None:
        if not self._marked:
            return
        for _ in range(2):
            record = self.coordination.read(self.name)
            if self.me not in record:
                return
            new = {k: v for k, v in record.items() if k != self.me}
            if self.coordination.compare_and_set(self.name, record, new, ttl=FORGET):
                return


__all__ = ["CONTENDED_POLL", "FileWaiters", "MARK_TTL", "REMOTE_POLL", "RecordWaiters", "SLICE", "Waiters",
           "share"]
