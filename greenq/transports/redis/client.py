"""Redis connections of the broker and the result backend.

One pool per broker or backend instance (per process: the app makes new ones
after a fork).  Connections are opened on demand, up to a cap, and closed
again after ``[redis] idle_timeout`` seconds unused (default ``IDLE_CLOSE``),
so a web process holds about as many connections as it recently needed, not
as many as it ever needed.  The closing runs on a timer (one daemon thread
per process, a greenlet when the process is patched: ``_IdleCloser``), so a
process that stops calling Redis altogether lets its connections go too.  The
cap is small in a client (``CLIENT_CONNECTIONS``); a worker's broker raises
it to its concurrency plus room for the control plane when it starts
consuming.  ``[redis] max_connections`` fixes the cap for a process instead.

A client's publish gives up within ``[redis] connect_timeout`` seconds
(default 2) while Redis is unreachable, the address in the error; each
connection attempt may take half of that (a refused connection is retried
with backoff for the rest).  A worker's calls keep retrying (see
``greenq.reconnect``).
"""
from __future__ import annotations

import os
import re
import select
import sys
import threading
import time
import weakref
from typing import Any, Optional

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ...config import Config, mask_url
from ...exceptions import BrokerError

try:        # what the cheaper checkout (Pool._take) relies on: redis-py 8's
    from redis._parsers import _RESP2Parser, _RESP3Parser
    from redis.event import AfterConnectionReleasedEvent, ReAuthConnectionListener
    from redis.observability import recorder as _recorder
    _PY_PARSERS: tuple = (_RESP2Parser, _RESP3Parser)   # redis-py's own; their ``_buffer`` is a SocketBuffer
except ImportError:     # pragma: no cover - an older redis-py: its own checkout, always
    _recorder = None  # type: ignore[assignment]
    _PY_PARSERS = ()

TRANSIENT = (redis.ConnectionError, redis.TimeoutError)
FAILURES = (redis.RedisError,)
#: error replies no retry can fix, by their text (redis-py has no class for them)
REFUSED_REPLIES = ("DB index is out of range", "invalid DB index")
CLIENT_CONNECTIONS = 10           # cap of a client's pool (grows on demand up to it)
CONTROL_CONNECTIONS = 10          # a worker's broker: concurrency + these (fetch, acks, renewals, ...)
IDLE_CLOSE = 60.0                 # seconds before an unused pooled connection is closed
IDLE_CHECK_MIN_PERIOD = 0.05      # the idle closer never wakes more often than this


def worker_pool_size(config: Config) -> int:
    """The cap of a consuming broker's pool: ``[redis] max_connections``, or
    when 0 the worker concurrency plus room for the control plane, so
    greenlets wait for a connection rather than fail."""
    return config.section("redis")["max_connections"] or \
        config.worker["concurrency"] + CONTROL_CONNECTIONS


def client_name(prefix: str, role: str) -> str:
    """What CLIENT LIST shows for our connections: ``greenq-<prefix>-<pid>[-role]``."""
    safe = re.sub(r"[^A-Za-z0-9_.:-]", "_", prefix)
    return f"greenq-{safe}-{os.getpid()}" + (f"-{role}" if role else "")


class _Slots:
    """A counting semaphore that wakes a waiter only when one is waiting.
    ``threading.Semaphore.release`` notifies its condition every time, and
    under gevent's patched locks each notify yields to the hub: a trip
    around the event loop for every Redis call.  A free slot is taken under
    the plain lock alone (no Condition method runs unless a caller waits)."""

    def __init__(self, count: int) -> None:
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._free = count
        self._waiting = 0

    def acquire(self) -> None:
        with self._lock:
            if self._free > 0:
                self._free -= 1
                return
            self._waiting += 1
            try:
                while self._free <= 0:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._free -= 1

    def release(self, count: int = 1) -> None:
        with self._lock:
            self._free += count
            if self._waiting:
                self._cond.notify(count)


class _IdleCloser:
    """Closes the idle connections of every live :class:`Pool` of this
    process, on a timer: every quarter of the shortest ``idle_close`` (never
    more often than IDLE_CHECK_MIN_PERIOD), so a connection unused for
    ``idle_close`` seconds is closed within a quarter of that more.  One
    daemon thread (a greenlet when patched), started with the first pool and
    ended when no pool is left; pools are held weakly.  A forked child starts
    afresh: its parent's pools are never touched (``reset``)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._pools: "weakref.WeakSet[Pool]" = weakref.WeakSet()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def watch(self, pool: "Pool") -> None:
        """Close the idle connections of ``pool`` too; wake the timer so it follows ``pool``'s idle time."""
        with self._lock:
            self._pools.add(pool)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="greenq-redis-idle", daemon=True)
                self._thread.start()
        self._wake.set()

    def _period(self) -> Optional[float]:
        """Seconds until the next round; None (and the thread forgotten) when
        no pool closes idle connections any more."""
        with self._lock:
            times = [p.idle_close for p in list(self._pools) if p.idle_close > 0]
            if not times:
                self._thread = None
                return None
        return max(IDLE_CHECK_MIN_PERIOD, min(times) / 4)

    def _run(self) -> None:
        while True:
            period = self._period()
            if period is None:
                return
            self._wake.wait(period)
            self._wake.clear()
            now = time.monotonic()
            for pool in list(self._pools):
                if pool.idle_close > 0:
                    try:
                        pool.close_idle(now)
                    except Exception:  # pragma: no cover - never lose the timer
                        pass


_IDLE_CLOSER = _IdleCloser()
os.register_at_fork(after_in_child=_IDLE_CLOSER.reset)


def _unpatched_select() -> Any:
    """``select.select`` as the operating system gives it: gevent's and
    eventlet's patched ones go through their hub (eventlet's yields to it
    even with a timeout of 0), and ``Pool._take`` only asks whether a socket
    has anything to read right now."""
    gevent_monkey = sys.modules.get("gevent.monkey")
    if gevent_monkey is not None and gevent_monkey.is_module_patched("select"):
        return gevent_monkey.get_original("select", "select")
    patcher = sys.modules.get("eventlet.patcher")
    if patcher is not None and patcher.is_monkey_patched("select"):
        return patcher.original("select").select
    return select.select


def _metrics_off() -> bool:
    """True while redis-py records no metrics (observability not set up,
    and its recorder has looked that up already)."""
    return _recorder._metrics_collector is None and _recorder._collector_resolved


def _plain(pool: "Pool") -> bool:
    """Whether ``pool`` may take the cheaper checkout (see Pool.__init__;
    the parser is checked on each connection).  Never with a redis-py older
    than 8, whose internals differ."""
    if _recorder is None or not hasattr(redis.Connection, "should_reconnect"):
        return False
    listeners = getattr(getattr(pool, "_event_dispatcher", None), "_event_listeners_mapping", {})
    released = listeners.get(AfterConnectionReleasedEvent, None)
    return (pool.connection_class is redis.Connection and getattr(pool, "cache", None) is None
            and released is not None and all(type(x) is ReAuthConnectionListener for x in released)
            and hasattr(_recorder, "_metrics_collector") and hasattr(_recorder, "_collector_resolved"))


class Pool(redis.ConnectionPool):
    """redis-py's pool (a connection is made only when no idle one is free)
    where callers over the cap wait for a connection instead of failing,
    connections left unused for ``idle_close`` seconds are closed (on the
    process's timer, ``_IdleCloser``, and whenever one comes back), and ``grow``
    raises the cap.  Built on the pool's documented-by-use attributes
    (``_available_connections``, ``_created_connections``, ``_lock``), the
    same since redis-py 4."""

    def __init__(self, idle_close: float = IDLE_CLOSE, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._idle_close = idle_close
        self._last_check = 0.0
        self._slots = _Slots(self.max_connections)
        self._held: set = set()
        #: the cheaper checkout and checkin (``_take``, ``_put_back``) apply:
        #: redis-py's plain connection (and its Python parser: checked per
        #: connection), no client-side cache, the default event listeners
        self._plain = _plain(self)
        self._select = _unpatched_select()
        _IDLE_CLOSER.watch(self)

    def reset(self) -> None:
        forked = hasattr(self, "_slots") and self.pid != os.getpid()
        super().reset()
        if forked:                          # a forked child: the parent's checkouts are not its own,
            self._slots = _Slots(self.max_connections)   # and a lock its threads held stays held here
            self._held = set()

    @property
    def idle_close(self) -> float:
        """Seconds an unused connection stays open; 0 = until the pool closes."""
        return self._idle_close

    @idle_close.setter
    def idle_close(self, seconds: float) -> None:
        self._idle_close = seconds
        _IDLE_CLOSER.watch(self)

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        if self.pid != os.getpid():
            self._checkpid()                # a forked child: redis-py resets the pool, ``reset`` the slots
        self._slots.acquire()
        try:
            connection = self._take() if self._plain else None
            if connection is None:
                connection = super().get_connection(*args, **kwargs)
        except BaseException:
            self._slots.release()
            raise
        self._held.add(connection)
        return connection

    def _take(self) -> Any:
        """An idle connection ready to send, the way redis-py's
        ``get_connection`` hands one out, for less: one lock, and a
        connection with nothing pending checked by one ``select`` instead of
        two ``settimeout`` calls around a failing ``recv``.  None when there
        is no idle connection or when redis-py's metrics are being recorded
        (redis-py's own path then makes one or records)."""
        if not _metrics_off():
            return None
        with self._lock:
            idle = self._available_connections
            if not idle:
                return None
            connection = idle.pop()
            self._in_use_connections.add(connection)
        try:
            sock, parser = connection._sock, connection._parser
            if sock is None or type(parser) not in _PY_PARSERS or parser._buffer is None \
                    or parser._buffer.unread_bytes() or self._select((sock,), (), (), 0)[0]:
                # closed, another parser, or the server said something (data
                # left over, an EOF, a push notification): redis-py's own
                # check, which reconnects, refuses it or applies the notification
                self.ensure_connection(connection)
        except BaseException:
            super().release(connection)
            raise
        return connection

    def release(self, connection: Any) -> None:
        now = time.monotonic()
        connection.greenq_idle_since = now
        try:
            self._held.remove(connection)      # one call: atomic under the GIL, and never switches
            held = True
        except KeyError:
            held = False
        try:
            if not (self._plain and self._put_back(connection)):
                super().release(connection)
        finally:
            if held:
                self._slots.release()
        if self._idle_close and now - self._last_check >= self._idle_close / 4:
            self._last_check = now
            self.close_idle(now)

    def _put_back(self, connection: Any) -> bool:
        """redis-py's ``release`` of a connection this process took from this
        pool, without its metrics (while none are recorded) or its re-auth
        event (while the connection has no token to re-authenticate with);
        False, nothing done, for any other case."""
        if self.pid != os.getpid() or connection.pid != self.pid or connection._re_auth_token is not None \
                or not _metrics_off():
            return False
        with self._lock:
            try:
                self._in_use_connections.remove(connection)
            except KeyError:
                return True                 # not this pool's (redis-py ignores it too)
            if connection.should_reconnect():
                connection.disconnect()
            self._available_connections.append(connection)
        return True

    def close_idle(self, now: float) -> None:
        """Close the connections unused for more than ``idle_close`` seconds."""
        if not self._idle_close:
            return
        with self._lock:
            idle = [c for c in self._available_connections
                    if now - getattr(c, "greenq_idle_since", now) > self.idle_close]
            for conn in idle:
                self._available_connections.remove(conn)
            self._created_connections -= len(idle)
        for conn in idle:                  # out of the pool: nobody else can take them now
            conn.disconnect()

    def grow(self, size: int) -> None:
        """Raise the cap to ``size`` connections (never lowers it)."""
        with self._lock:
            more = size - self.max_connections
            if more <= 0:
                return
            self.max_connections = size
        self._slots.release(more)


def refused(exc: BaseException) -> bool:
    """True for a Redis error that retrying cannot fix: a refused login
    (WRONGPASS, NOAUTH, invalid password), a missing ACL permission (NOPERM),
    a database number the server does not have."""
    if isinstance(exc, (redis.AuthenticationError, redis.exceptions.NoPermissionError,
                        redis.exceptions.AuthenticationWrongNumberOfArgsError)):
        return True
    return isinstance(exc, redis.ResponseError) and any(text in str(exc) for text in REFUSED_REPLIES)


def make_client(url: str, config: Config, role: str = "", extra: int = 0) -> "redis.Redis":
    """A client on a :class:`Pool` capped at ``[redis] max_connections`` (or
    CLIENT_CONNECTIONS) plus ``extra``, set up from ``[redis]``.  redis-py's
    own retries are off: the owner's Reconnector decides."""
    opts = config.section("redis")
    timeout = opts["socket_timeout"] or None
    # half the budget per attempt: a first attempt and its immediate retry
    # (for a stale pooled connection) both fit in a client's connect_timeout
    connect = min((opts["connect_timeout"] or timeout or 2.0) / 2, timeout or float("inf"))
    try:
        pool = Pool.from_url(
            url, max_connections=(opts["max_connections"] or CLIENT_CONNECTIONS) + extra,
            idle_close=opts["idle_timeout"],
            socket_timeout=timeout, socket_connect_timeout=connect, socket_keepalive=True,
            health_check_interval=opts["health_check_interval"],
            client_name=client_name(config.key_prefix, role), retry=Retry(NoBackoff(), 0))
    except (ValueError, TypeError) as exc:
        raise BrokerError(f"bad Redis URL {mask_url(url)}: {exc}") from None
    return redis.Redis(connection_pool=pool)
