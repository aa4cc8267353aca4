"""The cluster scope: permits shared by every worker of the app on its broker.

A resource is one counted lease of the coordination interface
(greenq/coordination.py, docs/coordination.md) named ``resource:<name>``,
of ``limit`` places, kept by the broker's transport under ``[greenq]
key_prefix`` (so apps with different prefixes never share one); a permit
is a place held for ``[greenq] lease_seconds`` (the ttl) and renewed by
``renew``, which the worker calls every few seconds.  The broker is the only
judge: a permit exists when ``acquire`` said so, and no pool counts on
its own what the broker did not confirm.

* **A killed holder** stops renewing: its places run out within the ttl
  (RabbitMQ: when the broker declares its connection dead, about the ttl
  plus a second, see below) and other workers take them.
* **A partitioned holder** cannot renew.  A permit counts as held only
  while the pool can prove it: until its last successful acquire or renewal
  is one ttl old (measured from *before* that call, so never later than the
  broker's own expiry), and not after a renewal that failed or that the
  broker answered "gone".  Such a permit is *lost*: it leaves ``in_use``
  (logged), the task that holds it runs on, and its ``release`` still tells
  the broker (in case the place is still its own).  A pool that cannot
  reach the broker hands out nothing (``try_acquire`` says False: it cannot
  prove a place), so a cut-off worker never runs more new holders than the
  broker granted.  The window every lease with a ttl has stays: the broker
  may give a lost place to another worker while the cut-off task still runs.
* Each place's holder id is this pool's own (host, pid, a random part) plus
  the caller's holder, so that one task id seen by two workers (a message
  delivered twice) still makes two holders.

On RabbitMQ (no other server) a lease of N places is N exclusive queues
``P.lease.resource:<name>.<i>``, each belonging to the connection that
declared it and deleted by the broker when that connection closes or dies.
The holder is the pool's connection, not a place: ``renew`` can only ask
whether the connection is up, and a killed worker's places come back when
RabbitMQ misses its heartbeats (half the ttl, at least 1 s), so within about
the ttl plus a second.  The worker must call ``renew`` at least every
``lease_seconds / 2`` seconds (py-amqp sends heartbeats only when called).
A full lease costs up to ``limit`` round trips per ``try_acquire``: fine for
limits in the hundreds.

Lowering the limit (``set_limit``) is the broker's: Redis and RabbitMQ try
places ``0 .. limit-1`` only, SQLite and memory count every live place, so
a holder above the new limit keeps its permit and no new one is handed out
until enough are given back.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Set

from ..coordination import Coordination, make_coordination
from .base import PermitPool
from .fair import CONTENDED_POLL, REMOTE_POLL, RecordWaiters

if TYPE_CHECKING:   # pragma: no cover
    from ..config import Config

log = logging.getLogger("greenq.resources")


class ClusterPool(PermitPool):
    """Permits as places of the counted lease ``resource:<name>`` (see the module docstring)."""

    def __init__(self, name: str, limit: int, *, app_key: str, config: "Config", driver: Any = None) -> None:
        super().__init__(name, limit, app_key=app_key, config=config, driver=driver)
        self.ttl = float(config.lease_seconds)
        self.lease = f"resource:{name}"
        self.coordination: Coordination = make_coordination(config.broker_url, config, driver)
        self._me = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._proven: Dict[str, float] = {}   # holder -> monotonic time before its last confirmed acquire/renew
        self._lost: Set[str] = set()          # holders whose permit this pool can no longer prove
        self._lock = threading.Lock()
        self._unreachable = False             # the last call failed (warned once, not at every try)
        #: who else waits for these places (a record beside the lease): fair shares
        self.waiters = RecordWaiters(self.coordination, f"{self.lease}:waiting", self._me)

    def _place_holder(self, holder: str) -> str:
        return f"{self._me}:{holder}"

    def try_acquire(self, holder: str) -> bool:
        self._drop_lapsed()
        with self._lock:
            if holder in self._proven:
                return True
            if len(self._proven) >= self.limit:
                return False                  # this pool alone fills the limit: no need to ask
            held = len(self._proven)
        bound = self.waiters.share(self.shared_limit)
        if bound is not None and held >= bound:
            self.waiters.refused()            # others wait: a place free now is theirs
            return False
        asked = time.monotonic()
        try:
            granted = self.coordination.acquire(self.lease, self._place_holder(holder), self.shared_limit,
                                                self.ttl)
        except Exception as exc:
            self._failed("acquire", exc)
            return False
        self._reached()
        if granted:
            with self._lock:
                self._proven[holder] = asked
                self._lost.discard(holder)
                held = len(self._proven)
            self.waiters.granted(held, self.shared_limit)   # its wait is over (fair.py)
        else:
            self.waiters.refused()
        return granted

    def fair_share(self) -> Optional[int]:
        return self.waiters.share(self.shared_limit)

    def poll_interval(self) -> Optional[float]:
        return CONTENDED_POLL if self.waiters.contended() else REMOTE_POLL

    def release(self, holder: str) -> None:
        with self._lock:
            known = self._proven.pop(holder, None) is not None or holder in self._lost
            self._lost.discard(holder)
        if not known:
            return
        try:
            self.coordination.release(self.lease, self._place_holder(holder))
        except Exception as exc:              # its place runs out within the ttl anyway
            self._failed("release", exc)

    def renew(self) -> None:
        """Renew every permit held; drop (log) those the broker says are gone,
        and all that are left when a renewal fails (the broker is out of reach)."""
        self._drop_lapsed()
        with self._lock:
            holders = list(self._proven)
        for n, holder in enumerate(holders):
            asked = time.monotonic()
            try:
                renewed = self.coordination.renew(self.lease, self._place_holder(holder), self.ttl)
            except Exception as exc:
                self._failed("renew", exc)
                self._lose(holders[n:], "its renewal failed")
                return
            if renewed:
                with self._lock:
                    if holder in self._proven:     # not released meanwhile
                        self._proven[holder] = asked
            else:
                self._lose([holder], "the broker says its place is gone")
        self._reached()

    def in_use(self) -> int:
        self._drop_lapsed()
        return len(self._proven)

    def close(self) -> None:
        with self._lock:
            holders = list(self._proven) + list(self._lost)
            self._proven.clear()
            self._lost.clear()
        try:
            for holder in holders:
                self.coordination.release(self.lease, self._place_holder(holder))
        except Exception as exc:              # the places run out within the ttl
            self._failed("release", exc)
        finally:
            self.waiters.close()
            self.coordination.close()

    # -- what can be proven ------------------------------------------------------
    def _drop_lapsed(self) -> None:
        """Permits not confirmed for a whole ttl may be another's by now: lost."""
        too_old = time.monotonic() - self.ttl
        lapsed = [holder for holder, asked in list(self._proven.items()) if asked <= too_old]
        if lapsed:
            self._lose(lapsed, f"it was not renewed for {self.ttl:g} s (lease_seconds)")

    def _lose(self, holders: List[str], why: str) -> None:
        with self._lock:
            lost = [holder for holder in holders if self._proven.pop(holder, None) is not None]
            self._lost.update(lost)
        for holder in lost:
            log.warning("resource %s: the permit of %s no longer counts as held: %s; "
                        "its task runs on, and this worker takes no permit the broker does not grant",
                        self.name, holder, why)

    def _failed(self, what: str, exc: BaseException) -> None:
        if not self._unreachable:
            log.warning("resource %s: %s on the broker failed (%s: %s); no permit is handed out "
                        "until it answers", self.name, what, type(exc).__name__, exc)
        self._unreachable = True

    def _reached(self) -> None:
        if self._unreachable:
            log.info("resource %s: the broker answers again", self.name)
        self._unreachable = False


__all__ = ["ClusterPool"]
