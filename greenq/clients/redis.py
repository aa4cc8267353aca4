"""Redis connections of the broker and the result backend.

One pool per broker or backend instance (per process: the app makes new ones
after a fork).  Connections are opened on demand, up to a cap, and closed
again after ``IDLE_CLOSE`` seconds unused, so a web process holds about as
many connections as it recently needed, not as many as it ever needed.  The
cap is small in a client (``CLIENT_CONNECTIONS``); a worker's broker raises
it to its concurrency plus room for the control plane when it starts
consuming.  ``[redis] max_connections`` fixes the cap for a process instead.

A client's publish gives up within ``[redis] connect_timeout`` seconds
(default 2) while Redis is unreachable, the address in the error; each
connection attempt may take half of that (a refused connection is retried
with backoff for the rest).  A worker's calls keep retrying (see
``greenq.clients.reconnect``).
"""
from __future__ import annotations

import os
import re
import threading
import time
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..config import Config, mask_url
from ..exceptions import BrokerError

TRANSIENT = (redis.ConnectionError, redis.TimeoutError)
FAILURES = (redis.RedisError,)
#: error replies no retry can fix, by their text (redis-py has no class for them)
REFUSED_REPLIES = ("DB index is out of range", "invalid DB index")
CLIENT_CONNECTIONS = 10           # cap of a client's pool (grows on demand up to it)
CONTROL_CONNECTIONS = 10          # a worker's broker: concurrency + these (fetch, acks, renewals, ...)
IDLE_CLOSE = 60.0                 # seconds before an unused pooled connection is closed


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
    around the event loop for every Redis call."""

    def __init__(self, count: int) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._free = count
        self._waiting = 0

    def acquire(self) -> None:
        with self._cond:
            while self._free <= 0:
                self._waiting += 1
                try:
                    self._cond.wait()
                finally:
                    self._waiting -= 1
            self._free -= 1

    def release(self, count: int = 1) -> None:
        with self._cond:
            self._free += count
            if self._waiting:
                self._cond.notify(count)


class Pool(redis.ConnectionPool):
    """redis-py's pool (a connection is made only when no idle one is free)
    where callers over the cap wait for a connection instead of failing,
    connections left unused for ``idle_close`` seconds are closed (checked
    whenever one comes back), and ``grow`` raises the cap.  Built on the
    pool's documented-by-use attributes (``_available_connections``,
    ``_created_connections``, ``_lock``), the same since redis-py 4."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.idle_close = IDLE_CLOSE
        self._last_check = 0.0
        self._slots = _Slots(self.max_connections)
        self._held: set = set()
        self._held_lock = threading.Lock()

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        self._slots.acquire()
        try:
            connection = super().get_connection(*args, **kwargs)
        except BaseException:
            self._slots.release()
            raise
        with self._held_lock:
            self._held.add(connection)
        return connection

    def release(self, connection: Any) -> None:
        now = time.monotonic()
        connection.greenq_idle_since = now
        with self._held_lock:
            held = connection in self._held
            self._held.discard(connection)
        try:
            super().release(connection)
        finally:
            if held:
                self._slots.release()
        if now - self._last_check >= self.idle_close / 4:
            self._last_check = now
            self._close_idle(now)

    def _close_idle(self, now: float) -> None:
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
            socket_timeout=timeout, socket_connect_timeout=connect, socket_keepalive=True,
            health_check_interval=opts["health_check_interval"],
            client_name=client_name(config.key_prefix, role), retry=Retry(NoBackoff(), 0))
    except (ValueError, TypeError) as exc:
        raise BrokerError(f"bad Redis URL {mask_url(url)}: {exc}") from None
    return redis.Redis(connection_pool=pool)
