"""Coordination on RabbitMQ without another server (greenq/coordination.py
tells the contract; docs/coordination.md the design and its limits).

RabbitMQ stores messages, not values, but it does one thing a lock needs: an
*exclusive* queue belongs to one connection, a second connection declaring
it is refused (RESOURCE_LOCKED), and the broker deletes it when that
connection closes or dies (missed heartbeats).  Names (``P`` is
``[greenq] key_prefix``, in the broker's vhost)::

    P.lease.<name>.<i>   i = 0 .. limit-1: the places of a counted lease, each
                         an exclusive queue; a holder holds the place its
                         connection declared.
    P.mutex.<name>       an exclusive queue: whoever declared it may change
                         the set or record ``name``; deleted when done.
    P.state.<name>       a durable queue holding the set's or record's
                         current value: one JSON message with a version.

A change takes the mutex, takes every message of ``P.state.<name>``
unacknowledged, keeps the highest version, publishes the new value
(confirmed) and only then acknowledges the old ones, and deletes the mutex.
A writer dying anywhere in between leaves the old value, or both (the next
reader keeps the higher version), and its mutex disappears with its
connection.  A ``ttl`` is the message's own expiration.

Limits, honestly:

* A holder is its *connection*: a place is lost when RabbitMQ declares the
  connection dead, after about two missed heartbeats.  The connection's
  heartbeat is half the ``ttl`` of the first ``acquire`` (at least 1 s), so a
  killed holder's place returns within about ``ttl`` plus a second; a holder
  must call ``renew`` (or ``acquire``) at least every ``ttl / 2`` seconds,
  which is what sends its heartbeats.  ``renew`` can only say whether the
  connection is still up: a holder cut off from the broker learns it at its
  next renewal or heartbeat, while RabbitMQ may already have handed its
  place to another (the same window as any lease with a ttl).
* ``acquire`` tries the places one by one: up to ``limit`` round trips when
  the lease is full.  Leases of a few hundred places are fine; more are slow.
* Sets and records cost a mutex and several round trips per operation and
  keep their members in one message: for chord-sized sets and small
  records, not for counters written thousands of times a second.  A state
  queue stays (empty) after its record expires, until ``forget``.
"""
from __future__ import annotations

import base64
import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Set, Tuple

from ...coordination import Coordination, Record

if TYPE_CHECKING:  # pragma: no cover
    from ...config import Config
    from ...drivers.base import Driver

log = logging.getLogger("greenq.coordination")

MUTEX_WAIT = 30.0        # seconds an operation waits for a set's or record's mutex
DEFAULT_HEARTBEAT = 10   # seconds, for a connection opened before any acquire


class AMQPCoordination(Coordination):
    """See the module docstring.  One connection per instance; its calls
    are serialised by a lock (an instance may be shared by greenlets)."""

    def __init__(self, url: str, config: "Config", driver: Optional["Driver"] = None) -> None:
        super().__init__(url, config, driver)
        from .common import connection_params
        self.params = connection_params(url)
        self.prefix = config.key_prefix
        self.conn: Any = None
        self.channel: Any = None
        self._heartbeat = DEFAULT_HEARTBEAT
        self._held: Dict[Tuple[str, str], int] = {}      # (name, holder) -> the place its connection declared
        self._lock = threading.Lock()

    # -- connection ------------------------------------------------------------------
    def _connect(self) -> None:
        from .common import open_connection
        self.conn = open_connection(self.params, heartbeat=self._heartbeat, role="coordination")
        self._new_channel()

    def _new_channel(self) -> None:
        self.channel = self.conn.channel()
        self.channel.confirm_select()

    def _drop(self) -> None:
        """Forget the connection: every place it held is gone with it."""
        from .adapter import close_quietly
        close_quietly(self.conn)
        self.conn = self.channel = None
        self._held.clear()

    def _alive(self) -> bool:
        """Serve the connection's heartbeats; False (dropped) when it is dead."""
        from .common import AMQP_ERRORS, serve_heartbeats
        if self.conn is None:
            return False
        try:
            serve_heartbeats(self.conn)
            return True
        except (OSError,) + AMQP_ERRORS:
            self._drop()
            return False

    def _ready(self) -> None:
        if self.conn is None or not self._alive():
            self._connect()

    def _declare_exclusive(self, queue: str) -> bool:
        """Declare ``queue`` exclusive to this connection; False when another holds it."""
        import amqp
        try:
            self.channel.queue_declare(queue, exclusive=True, auto_delete=False)
            return True
        except amqp.exceptions.ResourceLocked:
            self._new_channel()                       # the refusal closed the channel
            return False

    # -- counted lease -------------------------------------------------------------
    def _place(self, name: str, i: int) -> str:
        return f"{self.prefix}.lease.{name}.{i}"

    def acquire(self, name: str, holder: str, limit: int, ttl: float) -> bool:
        with self._lock:
            if (name, holder) in self._held:
                return self._alive()
            if self.conn is None:
                self._heartbeat = max(1, int(ttl / 2))
            self._ready()
            mine = {i for (n, _), i in self._held.items() if n == name}
            for i in range(limit):
                if i not in mine and self._declare_exclusive(self._place(name, i)):
                    self._held[(name, holder)] = i
                    return True
            return False

    def renew(self, name: str, holder: str, ttl: float) -> bool:
        with self._lock:
            return (name, holder) in self._held and self._alive()

    def release(self, name: str, holder: str) -> None:
        from .common import AMQP_ERRORS
        with self._lock:
            place = self._held.pop((name, holder), None)
            if place is None or self.channel is None:
                return
            try:
                self.channel.queue_delete(self._place(name, place))
            except (OSError,) + AMQP_ERRORS:
                self._drop()

    # -- sets and records: a value in P.state.<name>, changed under P.mutex.<name> --
    def _change(self, name: str, change: Any, ttl: Optional[float]) -> Any:
        """Under the mutex: ``change(value) -> (new value or None: unchanged, answer)``."""
        import amqp
        with self._lock:
            self._ready()
            mutex, state = f"{self.prefix}.mutex.{name}", f"{self.prefix}.state.{name}"
            deadline, pause = time.monotonic() + MUTEX_WAIT, 0.005
            while not self._declare_exclusive(mutex):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"coordination: {mutex} stayed locked for {MUTEX_WAIT:.0f} s")
                self._sleep(pause)
                pause = min(pause * 2, 0.1)
            try:
                self.channel.queue_declare(state, durable=True, auto_delete=False)
                tags, value, version = [], None, 0
                while True:
                    msg = self.channel.basic_get(state, no_ack=False)
                    if msg is None:
                        break
                    tags.append(msg.delivery_tag)
                    found = _decode(msg.body)
                    if found is not None and found[0] >= version:
                        version, value = found
                new, answer = change(value)
                if new is not None:
                    props: Dict[str, Any] = {"delivery_mode": 2}
                    if ttl:
                        props["expiration"] = str(max(1, int(ttl * 1000)))
                    body = json.dumps({"v": version + 1, "value": new}).encode()
                    self.channel.basic_publish(amqp.Message(body, **props), exchange="", routing_key=state)
                    for tag in tags:
                        self.channel.basic_ack(tag)
                else:
                    for tag in tags:
                        self.channel.basic_reject(tag, requeue=True)
                return answer
            finally:
                self.channel.queue_delete(mutex)

    def add_once(self, name: str, member: str, ttl: Optional[float] = None,
                 enough: Optional[int] = None) -> Tuple[bool, int]:
        def add(value: Any) -> Tuple[Any, Tuple[bool, int]]:
            members: Set[str] = set(value) if isinstance(value, list) else set()
            added = member not in members
            members.add(member)
            return sorted(members), (added, len(members))
        answer: Tuple[bool, int] = self._change(name, add, ttl)
        return answer

    def members(self, name: str) -> List[str]:
        found: List[str] = self._change(name, lambda value: (None, sorted(str(m) for m in value)
                                                             if isinstance(value, list) else []), None)
        return found

    # holders(): none stored, a place is its connection (the module docstring)

    def read(self, name: str) -> Record:
        record: Record = self._change(name, lambda value: (None, _record(value)), None)
        return record

    def compare_and_set(self, name: str, expected: Mapping[str, bytes], new: Mapping[str, bytes],
                        ttl: Optional[float] = None) -> bool:
        def swap(value: Any) -> Tuple[Any, bool]:
            if _record(value) != dict(expected):
                return None, False
            return {f: base64.b64encode(bytes(v)).decode() for f, v in new.items()}, True
        wrote: bool = self._change(name, swap, ttl)
        return wrote

    def forget(self, name: str) -> None:
        with self._lock:
            self._ready()
            self.channel.queue_delete(f"{self.prefix}.state.{name}")

    def close(self) -> None:
        with self._lock:
            self._drop()


def _decode(body: Any) -> Optional[Tuple[int, Any]]:
    """(version, value) of a state message; None for one that is not ours."""
    try:
        doc = json.loads(bytes(body) if not isinstance(body, str) else body)
    except (ValueError, TypeError, RecursionError):
        return None
    if not isinstance(doc, dict) or not isinstance(doc.get("v"), int):
        return None
    return doc["v"], doc.get("value")


def _record(value: Any) -> Record:
    """A stored value as a record ({} when it is not one)."""
    if not isinstance(value, dict):
        return {}
    try:
        return {str(f): base64.b64decode(v, validate=True) for f, v in value.items()}
    except (ValueError, TypeError):
        return {}


__all__ = ["AMQPCoordination"]
