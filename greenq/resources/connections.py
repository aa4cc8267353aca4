"""Connections that hold permits: ``app.resource_pool`` (docs/resources.md,
recipe "A database pool sized from its permit").

A task with ``resources={"pg": 1}`` holds a permit of ``pg`` while it runs;
a connection it opens would have to be closed when the task ends, since its
permit goes back to the fleet then, and the next holder may be another
process.  ``ResourcePool`` lets an open connection keep the permit instead:

* ``with pool.connection() as conn:`` inside a task holding a permit takes
  an idle connection of this process, or opens one (``open()``).  On leaving
  the block the connection goes back idle (``close(conn)`` instead when the
  block raised, or when it is older than ``max_age``).
* When the task ends, the admission step releases its permit.  If this
  process then has more connections open than permits held, the permit is
  *parked* with the idle connection instead of given back: it stays held in
  the scope's pool (process, host or cluster), and the next task of this
  process that asks for a permit takes the parked one (no round trip to the
  broker for a cluster resource) and, in its body, the idle connection.
* An idle connection is closed after ``idle_seconds`` without use, and a
  parked permit given back for it; so are as many as needed when the limit
  in force falls below the permits this process holds (an adaptive limit
  lowered: each worker's share); when the scope's pool says it holds fewer
  permits than we count (a cluster permit lost after failed renewals), every
  parked permit goes with its connection (which was lost, only it knows).

**The invariant**: connections open in a process (in use plus idle) never
exceed the permits the process holds (held by its tasks plus parked), so
connections open across the fleet never exceed the resource's ``limit``.
It is kept by counting, so it holds whatever the order of events:
``connection()`` refuses (``RuntimeError``) to hand a connection to more
holders than hold permits, and a permit is parked only while a connection
has no other permit to stand on.

``ResourcePool`` is a ``PermitPool`` wrapped around the scope's pool: it is
installed in the app's permit pools (``Resources.pools[name]``) when the
worker builds them, so the admission step and ``app.resource`` take and give
back their permits through it without knowing.  ``in_use()`` counts the
parked permits too: a parked permit is one the next holder takes at once, so
an adaptive limit must see its limit as used (its app-limited guard), and
``inspect stats`` shows the connections the resource costs.
"""
from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Generic, Iterator, List, Optional, Tuple, TypeVar

from .base import PermitPool

if TYPE_CHECKING:  # pragma: no cover
    from .registry import Resources

log = logging.getLogger("greenq.resources")

C = TypeVar("C")

#: seconds an idle connection (and its parked permit) is kept by default
IDLE_SECONDS = 10.0
#: seconds after which a connection is closed on its return by default: its
#: permit goes back to the fleet, so no process keeps its share for ever
MAX_AGE = 300.0
#: an open refused with one of an adaptive resource's ``errors`` (the
#: downstream's "too many clients": how the limit finds a ceiling latency did
#: not show) is tried again this many times before the task sees the error,
#: after OPEN_RETRY_PAUSE seconds, doubled each time (0.02 + 0.04 + 0.08 s):
#: the first refusal cuts the limit, and the connections over it close meanwhile
OPEN_RETRIES = 3
OPEN_RETRY_PAUSE = 0.02


def _close_quietly(close: Callable[[Any], None], conn: Any, name: str) -> None:
    try:
        close(conn)
    except Exception as exc:            # a connection that fails to close is closed for us
        log.debug("resource %s: closing a connection failed: %s: %s", name, type(exc).__name__, exc)


class ResourcePool(PermitPool, Generic[C]):
    """Connections to resource ``name``, each standing on a permit (module docstring).

    ``open()``: a new connection.  ``close(conn)``: closes one (default: its
    ``close()`` method).  ``idle_seconds``: how long an idle connection (and
    the permit it keeps) stays.  ``max_age``: a connection older than this is
    closed on its return.  ``clock``: monotonic seconds (tests pass a fake)."""

    def __init__(self, name: str, open: Callable[[], C], close: Optional[Callable[[C], None]] = None, *,
                 idle_seconds: float = IDLE_SECONDS, max_age: float = MAX_AGE,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if not idle_seconds >= 0.0:
            raise ValueError(f"resource_pool {name!r}: idle_seconds must be >= 0, got {idle_seconds}")
        if not max_age > 0.0:
            raise ValueError(f"resource_pool {name!r}: max_age must be > 0, got {max_age}")
        # the PermitPool attributes are the inner pool's once bound (bind())
        self.name = name
        self.limit = self.shared_limit = 0
        self._open = open
        self._close: Callable[[C], None] = close if close is not None else (lambda conn: conn.close())  # type: ignore[attr-defined]
        self.idle_seconds = float(idle_seconds)
        self.max_age = float(max_age)
        self.clock = clock
        self.inner: Optional[PermitPool] = None
        self._freed: Optional[Callable[[str], None]] = None   # Resources.freed once bound
        self._sample: Optional[Callable[..., None]] = None     # Resources.sample once bound
        self._resources: Optional["Resources"] = None          # once bound (the loop lag's marks)
        self._lock = threading.Lock()
        self._holders: Dict[str, str] = {}            # a holder's id -> the inner pool's holder id it stands on
        self._parked: List[str] = []                  # inner holder ids kept for idle connections
        self._parked_at: Dict[str, float] = {}        # inner holder id -> when it was parked (monotonic)
        self._idle: List[Tuple[C, float, float]] = []  # (connection, opened at, idle since); newest last
        self._out = 0                                 # connections handed out now
        self._opened: Dict[int, float] = {}           # id(connection out) -> when it was opened
        #: connections opened and closed since the start (figures for tests and benchmarks)
        self.opens = 0
        self.closes = 0
        #: opens tried again after a refusal with a listed error (OPEN_RETRIES)
        self.open_retries = 0
        #: parked permits taken by the next holder, and the seconds they stayed parked
        #: in all (a parked permit waits for a free runner's ``take``: see handoffs())
        self.reused = 0
        self.parked_seconds = 0.0

    # -- binding into the app's permit pools --------------------------------------
    def bind(self, resources: "Resources") -> None:
        """Stand between ``resources`` and the scope's pool of ``self.name``
        (the worker's permit pools, or a script's): every permit of it goes
        through this pool from now on.  Binding again to a new ``resources``
        (a worker after a script) drops what was idle."""
        inner = resources.pool(self.name)           # made (adaptive included) if not yet
        if inner is self:
            return
        self._drop_all()
        with resources._lock:
            self.inner = inner
            self.limit, self.shared_limit = inner.limit, inner.shared_limit
            self.app_key, self.config, self.driver = inner.app_key, inner.config, inner.driver
            self._freed = resources.freed
            self._sample = resources.sample
            self._resources = resources
            resources.pools[self.name] = self

    def unbind(self) -> None:
        """The worker is done with its permit pools: idle connections closed, parked permits given back."""
        self._drop_all()
        self.inner = None
        self._freed = None
        self._sample = None
        self._resources = None

    def _pool(self) -> PermitPool:
        inner = self.inner
        if inner is None:
            raise RuntimeError(f"resource_pool {self.name!r} is not bound to the app's permits yet "
                               "(app.resource_pool binds it: use the pool it returned)")
        return inner

    # -- PermitPool: what the admission step and app.resource call -----------------
    def try_acquire(self, holder: str) -> bool:
        self._expire()
        if self._parked:
            self._yield_parked(self._pool().fair_share())
        with self._lock:
            if holder in self._holders:
                return True
            if self._parked and len(self._holders) < self.limit:
                inner_holder = self._parked.pop()
                self._holders[holder] = inner_holder
                parked_at = self._parked_at.pop(inner_holder, None)
                if parked_at is not None:
                    self.reused += 1
                    self.parked_seconds += max(0.0, self.clock() - parked_at)
                return True
        if not self._pool().try_acquire(holder):
            return False
        with self._lock:
            self._holders[holder] = holder
        return True

    def release(self, holder: str) -> None:
        with self._lock:
            inner_holder = self._holders.pop(holder, None)
            if inner_holder is None:
                inner_holder = holder   # (taken before this pool was bound: the scope's pool knows it)
                stale_only = True
            else:
                stale_only = False
        if stale_only:
            self._pool().release(inner_holder)
            return
        bound = self._pool().fair_share()      # other processes wait: keep no more than this process's share
        with self._lock:
            stale: Optional[C] = None
            if self._open_count() > len(self._holders) + len(self._parked):
                kept = len(self._holders) + len(self._parked)
                if kept < self.limit and (bound is None or kept < bound):
                    # a connection stays open without a permit of its own: this one is now its
                    self._parked.append(inner_holder)
                    self._parked_at[inner_holder] = self.clock()
                    return
                if self._idle:      # above a lowered limit or its fair share: the connection goes with the permit
                    stale = self._idle.pop(0)[0]
        if stale is not None:
            self._discard(stale)
        self._pool().release(inner_holder)

    def set_limit(self, limit: int) -> None:
        inner = self._pool()
        inner.set_limit(limit)
        self.limit, self.shared_limit = inner.limit, inner.shared_limit
        self._trim()

    def set_share(self, limit: int) -> None:
        inner = self._pool()
        inner.set_share(limit)
        self.limit = inner.limit
        self._trim()

    def fair_share(self) -> Optional[int]:
        return self._pool().fair_share()

    def poll_interval(self) -> Optional[float]:
        return self._pool().poll_interval()

    def _yield_parked(self, bound: Optional[int]) -> None:
        """Other processes wait for the scope's places and this one holds more
        than ``bound`` (its fair share, greenq/resources/fair.py): give parked
        permits back to the scope, with idle connections, down to it."""
        if bound is None:
            return
        inner = self.inner
        if inner is None:
            return
        closing: List[C] = []
        giving: List[str] = []
        with self._lock:
            held = len(self._holders) + len(self._parked)
            while held > bound and self._parked and self._unpark(held, closing, giving):
                held -= 1
        for conn in closing:
            self._discard(conn)
        for inner_holder in giving:
            inner.release(inner_holder)

    def renew(self) -> None:
        inner = self._pool()
        inner.renew()
        self._expire()
        self._trim()

    def in_use(self) -> int:
        """The permits this process holds: its holders' (tasks, ``app.resource``)
        and the parked ones (each keeps a connection open, and is handed to the
        next holder: an adaptive limit counts it as used)."""
        with self._lock:
            return len(self._holders) + len(self._parked)

    def holders(self) -> int:
        """The permits held by holders only."""
        with self._lock:
            return len(self._holders)

    def parked(self) -> int:
        """Permits kept by idle connections."""
        with self._lock:
            return len(self._parked)

    def handoffs(self) -> Tuple[int, float]:
        """(parked permits the next holder took, the mean seconds they stayed parked)."""
        with self._lock:
            return self.reused, (self.parked_seconds / self.reused if self.reused else 0.0)

    def open_connections(self) -> int:
        """Connections open now (handed out plus idle)."""
        with self._lock:
            return self._open_count()

    def close(self) -> None:
        """The worker's stop: every idle connection closed, every permit given back."""
        self._drop_all()
        inner = self.inner
        if inner is not None:
            inner.close()

    # -- connections ---------------------------------------------------------------
    @contextlib.contextmanager
    def connection(self) -> Iterator[C]:
        """A connection for the block: an idle one, or a new one.  Only for a
        holder of a permit of this resource (a task with ``resources={name: 1}``,
        or inside ``app.resource(name)``): one connection per permit held."""
        conn = self._checkout_retrying()
        ok = False
        error: Optional[BaseException] = None
        resources = self._resources
        mark = resources.lag_begin(self.name) if resources is not None else None
        began = time.monotonic()
        try:
            yield conn
            ok = True
        except BaseException as exc:
            error = exc
            raise
        finally:
            latency = time.monotonic() - began
            self._measured(latency, error, resources.lag_end(mark) if resources is not None else (0.0, 0.0))
            self._checkin(conn, ok)

    #: an adaptive limit of this resource learns from the time each connection
    #: was out (the downstream's time), not the time its task held the permit
    times_connections = True

    def _measured(self, latency: float, error: Optional[BaseException],
                  lag: Tuple[float, float] = (0.0, 0.0)) -> None:
        sample = self._sample
        if sample is not None:
            with self._lock:
                in_flight = max(1, self._out)
                held = len(self._holders) + len(self._parked)
            sample(self.name, latency, in_flight, error, connection=True, held=held, lag=lag)

    def _checkout_retrying(self) -> C:
        """``_checkout``; an open refused with a listed error of an adaptive
        limit is tried again (``OPEN_RETRIES``): only the first refusal is a
        sample (it cuts the limit), and an open has no effect to repeat."""
        asked = time.monotonic()
        attempt = 0
        while True:
            try:
                return self._checkout()
            except Exception as exc:        # "too many clients": an adaptive limit's signal too
                if isinstance(exc, RuntimeError):       # no permit for it: a caller's mistake
                    raise
                if attempt == 0:
                    # its time: an open that began before the limit's last cut does not cut again
                    self._measured(time.monotonic() - asked, exc)
                if attempt >= OPEN_RETRIES or not self._refused(exc):
                    raise
                time.sleep(OPEN_RETRY_PAUSE * 2 ** attempt)    # cooperative in a patched worker
                attempt += 1
                self.open_retries += 1

    def _refused(self, exc: BaseException) -> bool:
        """Is ``exc`` one of the errors this resource's adaptive limit is told of?"""
        resources = self._resources
        adaptive = resources.adaptive.get(self.name) if resources is not None else None
        return adaptive is not None and isinstance(exc, adaptive.errors)

    def _checkout(self) -> C:
        self._expire()
        with self._lock:
            if self._out >= len(self._holders):
                raise RuntimeError(
                    f"resource_pool {self.name!r}: a connection needs a permit of {self.name!r} "
                    f"({self._out} connections out for {len(self._holders)} permits held): give the task "
                    f"resources={{{self.name!r}: 1}}, or hold app.resource({self.name!r}) around the block")
            self._out += 1
            if self._idle:
                conn, opened, _ = self._idle.pop()
                self._opened[id(conn)] = opened
                return conn
        try:
            conn = self._open()
        except BaseException:
            with self._lock:
                self._out -= 1
            raise
        with self._lock:
            self.opens += 1
            self._opened[id(conn)] = self.clock()
        return conn

    def _checkin(self, conn: C, ok: bool) -> None:
        now = self.clock()
        with self._lock:
            self._out -= 1
            opened = self._opened.pop(id(conn), now)
            keep = ok and now - opened < self.max_age and self.inner is not None
            if keep:
                self._idle.append((conn, opened, now))
        if not keep:
            self._discard(conn)
        self._trim()

    # -- keeping connections and permits in step -----------------------------------
    def _unpark(self, held: int, closing: List[C], giving: List[str]) -> bool:
        """Under the lock: take one parked permit out to give back (``giving``),
        and an idle connection to close (``closing``) when the open ones would
        outnumber the ``held`` permits; False when every connection is in use
        (their releases give the permits back)."""
        if self._open_count() >= held:
            if not self._idle:
                return False
            closing.append(self._idle.pop(0)[0])
        giving.append(self._parked.pop())
        self._parked_at.pop(giving[-1], None)
        return True

    def _open_count(self) -> int:
        return self._out + len(self._idle)

    def _discard(self, conn: C) -> None:
        with self._lock:
            self.closes += 1
        _close_quietly(self._close, conn, self.name)

    def _expire(self) -> None:
        """Close the connections idle longer than ``idle_seconds`` (the oldest first)."""
        if not self._idle:
            return
        too_old = self.clock() - self.idle_seconds
        stale: List[C] = []
        with self._lock:
            while self._idle and self._idle[0][2] <= too_old:
                stale.append(self._idle.pop(0)[0])
        for conn in stale:
            self._discard(conn)
        if stale:
            self._trim()

    def _trim(self) -> None:
        """Give back the parked permits no connection stands on, and close
        idle connections (with their permits) while this process holds more
        permits than the limit in force, or more than the scope's pool proves."""
        inner = self.inner
        if inner is None:
            return
        proven = inner.in_use()
        closing: List[C] = []
        giving: List[str] = []
        with self._lock:
            held = len(self._holders) + len(self._parked)
            over = max(held - self.limit, 0)
            if held > proven:
                # the scope's pool lost some (which ones, only it knows): every parked
                # permit goes, with its connection; the next holders open theirs anew
                over = len(self._parked)
            while over > 0 and self._parked and self._unpark(held, closing, giving):
                held -= 1
                over -= 1
            while self._parked and self._open_count() < len(self._holders) + len(self._parked):
                giving.append(self._parked.pop())
                self._parked_at.pop(giving[-1], None)
        for conn in closing:
            self._discard(conn)
        for inner_holder in giving:
            inner.release(inner_holder)
        if giving and self._freed is not None:
            self._freed(self.name)      # the admission step asks its waiters again

    def _drop_all(self) -> None:
        with self._lock:
            idle = [conn for conn, _, _ in self._idle]
            self._idle = []
            parked, self._parked = self._parked, []
            self._parked_at.clear()
        for conn in idle:
            self._discard(conn)
        inner = self.inner
        if inner is not None:
            for inner_holder in parked:
                inner.release(inner_holder)

    def __repr__(self) -> str:
        return (f"<ResourcePool {self.name} held={self.in_use()} parked={self.parked()} "
                f"open={self.open_connections()}/{self.limit}>")


__all__ = ["ResourcePool", "IDLE_SECONDS", "MAX_AGE"]
