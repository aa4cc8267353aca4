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

**Its place in line.**  A marker also says since when its process has
waited for a place beyond its floor share (below): its *key*, the lower the
longer.  A new key, after every other, is taken when the process's turn
ends, or when it was granted a permit while nobody else waited.

* host: an empty file ``w.<pid>.<random>`` beside the resource's lock
  files; its mtime is the last refresh, its atime the key, the time the
  wait began (``os.utime``: one system call; both from the host's one clock).
* cluster: one record of the coordination interface,
  ``resource:<name>:waiting``, a field per process (its pool's id) whose
  value is ``"<refreshed> <order>"``: the wall-clock time of its last
  refresh and, as its key, an order number one above the highest in the
  record when its wait began (compare-and-set makes those numbers follow
  the order of the writes, whatever the machines' clocks say; the record
  itself expires ``FORGET`` seconds after its last write).  Read at most
  every ``CLUSTER_READ`` seconds per process.

A marker whose refresh time is not a finite number (``inf``, ``nan``, a
value too large for a float), or lies more than ``FUTURE`` seconds ahead of
the reader's clock, or whose order is not a whole number from 0 to
``MAX_ORDER``, is ignored (and dropped by the next writer, host: removed):
such a marker would otherwise count as waiting for ever, and cap every
process's share.

**The share.**  With ``n`` processes wanting permits (this one and the
others with a live marker) and ``L`` places, a process may hold
``floor(L / n)`` while others wait, and one more if it is among the
``L mod n`` that have waited longest (lowest key; ties by id).  With nobody
else waiting there is no bound.  The shares add up to ``L`` exactly, so
while a place is free some waiting process is under its share and takes
it: no permit stays free for fairness' sake while the processes agree on
who waits and in what order (below).

**Turns.**  A process granted a place beyond its floor share while others
wait (with a limit of 1, any grant then) has its *turn*: it stays first in
line for ``TURN`` seconds from that grant, taking again what it frees (a
hand-over between processes costs the next one's poll, so not one per
task), then goes to the back: its share drops, and its next marker write,
at once, takes a new key.  Nothing moves with the clock but a turn that
has begun: a process that stalls (a loaded machine: no poll for a while)
keeps its key, and when it asks again it is still first in line and takes
the next permit that frees.

**Waking.**  A process that sees others waiting asks for its refused
permits every ``CONTENDED_POLL`` seconds instead of ``REMOTE_POLL`` (the
admission step's wait; greenq/resources/step.py): a place given back to the
scope is taken by the process whose share it is within about that time.

Fairness is between processes, by count of permits held (and turns of
``TURN`` seconds at the places the floor leaves over), and it is
advisory: the limit itself is kept by the lock files and the lease, as
before.  A marker that a process no longer refreshes (it got what it
waited for, or it died) still counts for up to ``MARK_TTL``: meanwhile the
other processes keep to their shares, and permits may stay free for that
long.  Clocks: the host's one clock; in cluster scope the machines' wall
clocks decide only whether a marker is live, and need to agree to well
within ``MARK_TTL`` (the order is the record's own).
"""
from __future__ import annotations

import logging
import math
import os
import time
import uuid
from typing import TYPE_CHECKING, Callable, Dict, Mapping, Optional, Tuple

if TYPE_CHECKING:  # pragma: no cover
    from ..coordination import Coordination

log = logging.getLogger("greenq.resources")

#: seconds a waiting process's marker counts after its last refresh
MARK_TTL = 0.5
#: a marker is refreshed at most this often (a refusal in between changes nothing)
REFRESH = MARK_TTL / 5
#: a marker this old belongs to a process that is gone: removed (host) or dropped (cluster)
FORGET = 30.0
#: seconds a marker's refresh time may lie ahead of the reader's clock (two
#: machines' clocks a little apart); further ahead, it is refused
FUTURE = 1.0
#: the highest order number of a cluster marker (a float holds every whole number up to it)
MAX_ORDER = 2 ** 53
#: seconds a process's turn at the places beyond the floor share lasts from its first grant there
#: (fewer hand-overs between processes: each costs the next one's poll)
TURN = 0.1
#: seconds between two asks of a refused waiter when other processes wait too (else REMOTE_POLL)
CONTENDED_POLL = 0.01
#: seconds between two asks of a refused waiter when nobody else waits
REMOTE_POLL = 0.075
#: seconds a cluster pool reuses its read of the waiters' record
CLUSTER_READ = 0.02
#: seconds a host pool reuses its look at the markers
HOST_READ = 0.002


def share(limit: int, me: str, others: Mapping[str, float], mine: float = math.inf) -> Optional[int]:
    """The permits process ``me`` may hold while ``others`` (id -> key: the
    lower, the longer it has waited) wait for the same ``limit`` places;
    ``mine`` is this process's key.  None (no bound) when nobody else waits,
    else ``floor(limit / n)``, plus one for the ``limit mod n`` processes that
    have waited longest (the shares add up to ``limit`` exactly)."""
    if not others:
        return None
    everyone = dict(others)
    everyone[me] = mine
    floor, extra = divmod(limit, len(everyone))
    if not extra:
        return floor
    ahead = sum(1 for who, key in everyone.items() if (key, who) < (mine, me))
    return floor + 1 if ahead < extra else floor


def live(now: float, at: float, ttl: float) -> bool:
    """Does a marker refreshed at ``at`` count at ``now`` (for ``ttl`` seconds)?
    Never when ``at`` is not finite, or more than ``FUTURE`` seconds ahead."""
    return math.isfinite(at) and -FUTURE <= now - at <= ttl


class Waiters:
    """One process's view of who waits for one resource, and its own marker.
    Subclasses keep the markers (host: files; cluster: a record)."""

    read_every = HOST_READ

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock
        self.me = f"{os.getpid()}.{uuid.uuid4().hex[:8]}"
        self._reset()

    def _reset(self) -> None:
        self._others: Dict[str, float] = {}
        self._read_at = -math.inf
        self._refreshed = -math.inf     # monotonic time of the last attempt to write the marker
        self._written = -math.inf       # ... and of the last write that succeeded
        #: this process's key as its marker shows it (inf: no marker yet)
        self._key = math.inf
        #: at the back of the line since its marker was last written (its turn
        #: ended, or it was granted while nobody else waited): the next write
        #: takes a new key, at once when others wait
        self._behind = True
        #: when (its clock) this process's turn at the places beyond the floor share began
        self._turn: Optional[float] = None

    # -- what the pools ask ------------------------------------------------------------
    def share(self, limit: int) -> Optional[int]:
        """The permits this process may hold now (None: no bound)."""
        others = self.others()
        if self._turn is not None:
            self._end_turn(self.clock(), others)
        return share(limit, self.me, others, math.inf if self._behind else self._key)

    def contended(self) -> bool:
        """Do other processes wait (as of the last look)?"""
        return bool(self.others())

    def others(self) -> Dict[str, float]:
        """The other waiting processes (id -> key), read at most every ``read_every`` seconds."""
        now = time.monotonic()
        if now - self._read_at >= self.read_every:
            self._read_at = now
            try:
                self._others = self._read(self.clock())
            except Exception as exc:            # fairness is advisory: no bound when it cannot be read
                log.debug("resource waiters: reading failed: %s: %s", type(exc).__name__, exc)
                self._others = {}
        return self._others

    def refused(self) -> None:
        """A permit request of this process was refused: it waits (refresh its
        marker; at once when it moved to the back and others wait)."""
        now = time.monotonic()
        every = self.read_every if self._behind and self.others() else REFRESH
        if now - self._refreshed < every:
            return
        self._write(now)

    def granted(self, held: int, limit: int) -> None:
        """A permit request was granted; this process holds ``held`` of the
        scope's ``limit`` places now (see the module docstring: its turn)."""
        others = self._others                   # (as last read: no read on a grant)
        if not others:                          # nobody else waits: whoever comes is first
            self._behind, self._turn = True, None
            return
        if held <= limit // (len(others) + 1):
            return                              # within its floor share
        now = self.clock()
        if self._turn is None:
            self._turn = now                    # its turn at the places beyond the floor share begins
        self._end_turn(now, others)

    def _end_turn(self, now: float, others: Mapping[str, float]) -> None:
        """After ``TURN`` seconds, to the back of the line; told at once if the others see this process waiting."""
        assert self._turn is not None
        if self._turn <= now < self._turn + TURN:
            return
        self._turn, self._behind = None, True
        moment = time.monotonic()
        if others and moment - self._written <= MARK_TTL and moment - self._refreshed >= self.read_every:
            self._write(moment)

    def close(self) -> None:
        try:
            self._unmark()
        except Exception as exc:
            log.debug("resource waiters: unmarking failed: %s: %s", type(exc).__name__, exc)

    def _write(self, now: float) -> None:
        self._refreshed = now
        try:
            self._mark(self.clock(), self._behind)
        except Exception as exc:
            log.debug("resource waiters: marking failed: %s: %s", type(exc).__name__, exc)
            return
        self._written = now
        self._behind = False

    # -- the scope's -------------------------------------------------------------------
    def _read(self, now: float) -> Dict[str, float]:
        """The other processes whose marker is live at ``now``: id -> key."""
        raise NotImplementedError

    def _mark(self, now: float, anew: bool) -> None:
        """Write this process's marker, refreshed at ``now``; with ``anew`` a
        new wait begins (a new key, after every other); sets ``_key``."""
        raise NotImplementedError

    def _unmark(self) -> None:
        raise NotImplementedError


class FileWaiters(Waiters):
    """Host scope: a marker file per waiting process in the resource's directory
    (mtime: the last refresh; atime: when its wait began, the key)."""

    PREFIX = "w."

    def __init__(self, directory: str, clock: Callable[[], float] = time.time) -> None:
        super().__init__(clock)
        self.directory = directory
        self._fd: Optional[int] = None

    def _path(self) -> str:
        return os.path.join(self.directory, self.PREFIX + self.me)

    def _read(self, now: float) -> Dict[str, float]:
        found = {}
        with os.scandir(self.directory) as entries:
            for entry in entries:
                name = entry.name
                if not name.startswith(self.PREFIX) or name == self.PREFIX + self.me:
                    continue
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                at, since = st.st_mtime, st.st_atime
                if live(now, at, MARK_TTL):
                    found[name[len(self.PREFIX):]] = min(since, at) if math.isfinite(since) else at
                elif not live(now, at, FORGET):     # gone long ago, or dated ahead: never to count
                    try:
                        os.unlink(entry.path)
                    except OSError:
                        pass
        return found

    def _mark(self, now: float, anew: bool) -> None:
        since = now if anew or not math.isfinite(self._key) else self._key
        if self._fd is not None:
            try:
                os.utime(self._fd, (since, now))
                if os.path.exists(self._path()):
                    self._key = since
                    return
            except OSError:
                pass
            self._forget()
        path = self._path()
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        os.utime(self._fd, (since, now))
        self._key = since

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
        self._reset()


def parse(value: bytes) -> Optional[Tuple[float, float]]:
    """A cluster marker's ``(refreshed, key)``; key inf for a marker of an
    older version (no order: at the back); None for one that is refused (see
    the module docstring)."""
    try:
        parts = bytes(value).decode("ascii").split()
        if not 1 <= len(parts) <= 2:
            return None
        at = float(parts[0])
        order = int(parts[1]) if len(parts) == 2 else None
    except (ValueError, TypeError, UnicodeDecodeError):
        return None
    if not math.isfinite(at):
        return None
    if order is None:
        return at, math.inf
    if not 0 <= order <= MAX_ORDER:
        return None
    return at, float(order)


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

    def _live(self, record: "Mapping[str, bytes]", now: float, ttl: float) -> "Dict[str, Tuple[float, float]]":
        """The fields of ``record`` refreshed within ``ttl`` of ``now``: field -> (refreshed, key)."""
        found = {}
        for field, value in record.items():
            marker = parse(value)
            if marker is not None and live(now, marker[0], ttl):
                found[field] = marker
        return found

    def _read(self, now: float) -> Dict[str, float]:
        record = self.coordination.read(self.name)
        return {field: key for field, (_, key) in self._live(record, now, MARK_TTL).items() if field != self.me}

    def _mark(self, now: float, anew: bool) -> None:
        for _ in range(2):                      # one retry when another process wrote in between
            record = self.coordination.read(self.name)
            kept = self._live(record, now, FORGET)
            if anew or not math.isfinite(self._key):
                highest = max((key for _, key in kept.values() if math.isfinite(key)), default=0.0)
                order = int(min(highest + 1, MAX_ORDER))
            else:
                order = int(self._key)
            new = {field: record[field] for field in kept}
            new[self.me] = f"{now:.3f} {order}".encode()
            if self.coordination.compare_and_set(self.name, record, new, ttl=FORGET):
                self._marked = True
                self._key = float(order)
                return
        raise RuntimeError("the waiters' record kept changing")

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


__all__ = ["CONTENDED_POLL", "FUTURE", "FileWaiters", "MARK_TTL", "REMOTE_POLL", "RecordWaiters", "TURN", "Waiters",
           "live", "parse", "share"]
