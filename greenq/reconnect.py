"""One reconnect state machine per connection pool (DESIGN.md lesson 6).

Every round trip of a broker or backend goes through :meth:`Reconnector.call`.
The machine has two states:

* **up**: the last round trip worked.  A first failure is retried at once (a
  pooled connection may simply be stale, e.g. killed while idle) and does not
  count as an outage.
* **down**: a retry failed too.  The pool's idle connections are dropped
  once (``reset``), the change is logged once, and every caller retries with
  exponential backoff and jitter (capped at :data:`BACKOFF_CAP` seconds) until
  its own deadline.  The first round trip that works again puts the state
  back up, logs the recovery once and runs ``on_recovered`` (e.g. forget
  which consumer groups exist, so they are declared again).

``healthy`` and ``last_ok`` (``time.monotonic()`` of the last successful round
trip, 0.0 before the first) are what /healthz reports.  Nothing here knows
about Redis: the transient exception types are given by the owner.

An error no retry can fix (the owner's ``refused`` says which: a bad
database number, a refused login, a missing permission) is raised at once as
:class:`Refused`, never retried: a worker exits 2 with it, a client's call
raises it, instead of either waiting for a fix that retrying cannot bring.
"""
from __future__ import annotations

import logging
import threading
import time
from typing import Callable, Optional, Tuple, Type, TypeVar

from .backoff import backoff
from .exceptions import BrokerError, ConfigError

T = TypeVar("T")

BACKOFF_BASE = 0.05   # seconds before the first retry while down
BACKOFF_CAP = 5.0     # longest wait between two retries
BACKOFF_JITTER = 0.5  # each wait is half to all of the exponential one

log = logging.getLogger("greenq.brokers")


class Unreachable(BrokerError):
    """The server could not be reached before the caller's deadline."""


class Refused(BrokerError, ConfigError):
    """The server answered and refused us for a reason no retry can fix
    (credentials, database number, virtual host, permissions).  Both a
    BrokerError (code catching broker failures sees it) and a ConfigError
    (the fix is in the configuration: the worker exits 2)."""


def never_refused(exc: BaseException) -> bool:
    """The default ``refused`` classifier: every error may be cured by retrying."""
    return False


def reconnect_delay(attempt: int) -> float:
    """Seconds to wait before retry number ``attempt`` (1-based) while a server is down."""
    return backoff(attempt, BACKOFF_BASE, BACKOFF_CAP, BACKOFF_JITTER)


class Reconnector:
    """Runs round trips, reconnecting with backoff on ``transient`` errors.

    ``name`` is what logs and errors show (a URL with its password masked);
    ``reset`` drops the pool's idle connections; ``failures`` are the
    library's other errors (an error reply from the server), raised as
    BrokerError at once; ``refused(exc)`` is true for an error of either
    kind that no retry can fix, raised as :class:`Refused` at once; ``on_recovered`` runs once after an outage, in the
    first caller whose round trip worked (it must not call back into
    :meth:`call`; if it raises, it is logged and runs again after the next
    successful round trip).
    """

    def __init__(self, name: str, transient: Tuple[Type[BaseException], ...],
                 reset: Callable[[], None], on_recovered: Optional[Callable[[], None]] = None,
                 sleep: Callable[[float], None] = time.sleep,
                 failures: Tuple[Type[BaseException], ...] = (),
                 refused: Callable[[BaseException], bool] = never_refused) -> None:
        self.name = name
        self.refused = refused
        self.transient = transient
        self.failures = failures      # other errors of the library: raised as BrokerError at once
        self._reset = reset
        self._on_recovered = on_recovered
        self._sleep = sleep
        self._lock = threading.Lock()
        self.healthy = True
        self.last_ok = 0.0
        self.down_since: Optional[float] = None
        self._needs_recovery = False   # set while down, cleared once on_recovered worked
        self._recovery_running = False

    def call(self, fn: Callable[[], T], deadline: Optional[float], what: str) -> T:
        """``fn()``, retried through connection failures until ``deadline``
        (``time.monotonic()``; None = for ever), then :class:`Unreachable`.
        Waits out the remaining time before giving up, so a caller looping on
        a short deadline never spins."""
        attempt = 0
        while True:
            try:
                result = fn()
            except self.transient as exc:
                if self.refused(exc):
                    raise Refused(f"{what}: {self.name} refused us: {exc}") from None
                attempt += 1
                if attempt == 1 and self.healthy:
                    continue                     # a stale pooled connection: once, at once
                self._went_down(exc, deadline, what)
                delay = reconnect_delay(attempt)
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= delay:
                        if left > 0:
                            self._sleep(left)
                        raise Unreachable(f"{what}: {self.name} is unreachable ({exc})") from None
                self._sleep(delay)
                continue
            except self.failures as exc:
                if self.refused(exc):
                    raise Refused(f"{what}: {self.name} refused us: {exc}") from None
                raise BrokerError(f"{what}: {self.name}: {exc}") from exc
            self.last_ok = time.monotonic()
            if not self.healthy or self._needs_recovery:
                self._went_up()
            return result

    def _went_down(self, exc: BaseException, deadline: Optional[float], what: str) -> None:
        with self._lock:
            if not self.healthy:
                return
            self.healthy = False
            self._needs_recovery = True
            self.down_since = time.monotonic()
        if deadline is None:
            log.warning("%s: connection lost (%s); reconnecting with backoff", self.name, exc)
        else:    # a client's call: it gives up at its deadline, and says so
            log.warning("%s: connection lost (%s); retrying for %.1f s more, then the %s fails", self.name,
                        exc, max(0.0, deadline - time.monotonic()), what)
        try:
            self._reset()
        except Exception as reset_exc:  # pragma: no cover - tearing down must not fail the caller
            log.debug("%s: reset failed: %s", self.name, reset_exc)

    def _went_up(self) -> None:
        with self._lock:
            if self._recovery_running:
                return                           # another caller is restoring state
            was_down = not self.healthy
            self.healthy = True
            since, self.down_since = self.down_since, None
            self._recovery_running = True
        if was_down:
            log.warning("%s: reconnected after %.1f s", self.name,
                        time.monotonic() - since if since else 0.0)
        restored = True
        try:
            if self._on_recovered is not None:
                self._on_recovered()
        except Exception as exc:
            restored = False
            log.warning("%s: could not restore state after reconnecting (%s); will retry", self.name, exc)
        with self._lock:
            self._recovery_running = False
            if restored:
                self._needs_recovery = False


class Reconnecting:
    """Mixin for a broker or backend whose round trips go through ``self.reconnector``:
    the health facts /healthz reads, and ``_call`` with a time budget."""

    reconnector: Reconnector

    @property
    def healthy(self) -> bool:
        """False while the connection is down and being re-established."""
        return self.reconnector.healthy

    @property
    def last_ok(self) -> float:
        """``time.monotonic()`` of the last successful round trip (0.0: none yet)."""
        return self.reconnector.last_ok

    def _call(self, fn, budget: Optional[float], what: str):
        deadline = None if budget is None else time.monotonic() + budget
        return self.reconnector.call(fn, deadline, what)
