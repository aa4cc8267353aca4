"""The result backend interface.

A backend stores each task's result record (bytes made by
``Codec.encode_result``) under its task id for ``config.result_expires``
seconds, lets callers wait for a *final* record, and keeps the set of revoked
task ids that every worker loads at start and re-reads now and then (beside
the control plane's broadcast, greenq/worker/revocations.py).  Every implementation passes the shared
suite in ``tests/integration/test_backend_suite.py``.

Public methods are written once here; implementations fill in the protected
primitives ``_store_many``, ``_get``, ``_forget``, ``_revoke``, ``_revoked``,
``_revocations`` and, where the store can block, ``_wait``.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, TypeVar

from ..drivers.base import UsesDriver

if TYPE_CHECKING:  # pragma: no cover
    from ..brokers.base import Broker
    from ..config import Config
    from ..coordination import Coordination
    from ..drivers.base import Driver

T = TypeVar("T")
#: compare-and-set attempts on a chord's state record before giving up (each
#: failed attempt means another writer changed it: a few at most)
CHORD_ATTEMPTS = 50


class Record(NamedTuple):
    """One result record to store.  ``final`` records (SUCCESS, FAILURE,
    REVOKED) wake waiters; ``reply_to`` is the message's reply address (rpc://)."""
    task_id: str
    data: bytes
    final: bool = True
    reply_to: Optional[str] = None


class Revocation(NamedTuple):
    """One revoked task id, with ``at``: when it was revoked (epoch seconds,
    by the revoking process's clock)."""
    task_id: str
    terminate: bool
    at: float


class ChordCount(NamedTuple):
    """One finished chord member to count (``chord_members_done``): its id,
    its chord's group id and size, and its own result ``record``, to be
    stored first (None: stored already)."""
    group_id: str
    member_id: str
    size: int
    record: Optional[Record] = None


#: the most revocations ``revocations()`` returns (the newest), and a worker keeps
REVOCATIONS_MAX = 50000


class ResultBackend(UsesDriver):
    #: keeps group records and counts chord members (greenq.canvas); rpc:// does not
    stores_groups = False
    #: ``chord_members_done`` stores the members' own records in the same round
    #: trip as it counts them (the worker then hands it those records rather
    #: than storing them beforehand with the rest)
    counts_with_store = False
    #: optional: writes and reads Celery's per-task records (``store_celery``,
    #: ``get_celery``, ``wait_either``); Redis and rpc:// with ``celery_queues``
    celery_records = False
    #: optional: keeps Celery's group records and counts Celery chords
    #: (``save_celery_group``, ``celery_chord_parts``); Redis only
    celery_groups = False

    def __init__(self, url: str, config: "Config", driver: Optional["Driver"] = None) -> None:
        self.url = url
        self.config = config
        self.driver = driver

    def attach_broker(self, broker: "Broker") -> None:
        """Given the app's broker once the backend is made; nothing by default
        (rpc:// replies on a worker's consumer channel)."""

    # -- optional: Celery's records (docs/celery.md) --------------------------
    # A backend that has them sets the flag above and overrides the methods;
    # callers check the flag, so these defaults are never reached.
    def store_celery(self, records: Sequence[Tuple[str, bytes]]) -> None:
        """Store ``(task_id, record)`` pairs in Celery's format (``celery_records``)."""
        raise NotImplementedError(f"{type(self).__name__} does not store Celery's records")

    def get_celery(self, task_id: str) -> Optional[Dict[str, Any]]:
        """The Celery record for ``task_id`` as greenq's meta, or None (``celery_records``)."""
        raise NotImplementedError(f"{type(self).__name__} does not read Celery's records")

    def wait_either(self, task_id: str, timeout: Optional[float]) -> Optional[Tuple[str, Any]]:
        """The first of greenq's or Celery's final record for ``task_id``, with
        which one it is, or None after ``timeout`` (``celery_records``)."""
        raise NotImplementedError(f"{type(self).__name__} does not read Celery's records")

    def save_celery_group(self, group_id: str, member_ids: Sequence[str]) -> None:
        """Celery's group record (``celery-taskset-meta-<id>``; ``celery_groups``)."""
        raise NotImplementedError(f"{type(self).__name__} does not keep Celery's group records")

    def celery_chord_parts(self, parts: Sequence[Tuple[str, str, Any, bytes]]) -> List[Optional[str]]:
        """Count finished members of Celery chords (``celery_groups``)."""
        raise NotImplementedError(f"{type(self).__name__} does not count Celery's chords")

    # -- public API ----------------------------------------------------------
    def reply_to(self) -> Optional[str]:
        """The address results of this process's calls must be sent to, put in
        each message it publishes (rpc://); None for stores keyed by task id."""
        return None

    def store(self, task_id: str, data: bytes, final: bool = True,
              reply_to: Optional[str] = None) -> None:
        self._store_many([Record(task_id, data, final, reply_to)])

    def store_many(self, records: Sequence[Record]) -> None:
        """Store many records in one round trip where possible.  A final record
        (SUCCESS, FAILURE, REVOKED) wakes everyone in ``wait``; others (RETRY)
        only update what ``get`` sees."""
        if records:
            self._store_many(records)

    def get(self, task_id: str) -> Optional[bytes]:
        """The last record stored for ``task_id``, or None."""
        return self._get(task_id)

    def wait(self, task_id: str, timeout: Optional[float]) -> Optional[bytes]:
        """Block until a final record for ``task_id`` exists and return it, or
        return None after ``timeout`` seconds (None = forever).  Must not spin:
        block on the store, or poll with a growing sleep where it cannot block."""
        return self._wait(task_id, timeout)

    def forget(self, task_id: str) -> None:
        self._forget(task_id)

    def revoke(self, task_id: str, terminate: bool = False) -> None:
        """Record that ``task_id`` must not run (and, with ``terminate``, be
        stopped if running).  Kept for ``result_expires`` seconds."""
        self._revoke(task_id, terminate)

    def revoked(self, task_ids: Sequence[str]) -> Dict[str, bool]:
        """Of ``task_ids``, those revoked, each mapped to its terminate flag."""
        if not task_ids:
            return {}
        return self._revoked(task_ids)

    def revocations(self, since: float = 0.0) -> List[Revocation]:
        """The revocations made at or after ``since`` (epoch seconds) and not
        expired, oldest first: at most the newest ``REVOCATIONS_MAX``."""
        return self._revocations(since)

    def close(self) -> None:
        """Release connections."""

    # -- groups and chords (where ``stores_groups``) ----------------------------
    def get_many(self, task_ids: Sequence[str]) -> List[Optional[bytes]]:
        """The last record of each of ``task_ids``, in order (None where none)."""
        return [self._get(t) for t in task_ids]

    def save_group(self, group_id: str, data: bytes) -> None:
        """Keep a group's record (member ids, a chord's callback) for
        ``result_expires`` seconds."""
        raise NotImplementedError

    def load_group(self, group_id: str) -> Optional[bytes]:
        raise NotImplementedError

    def forget_group(self, group_id: str) -> None:
        raise NotImplementedError

    def chord_member_done(self, group_id: str, member_id: str, size: int) -> bool:
        """Count ``member_id`` as finished in chord ``group_id`` of ``size``
        members, atomically and idempotently: a member counted twice (run
        again after its worker died before the ack) counts once.  True for
        exactly one member, the *completer*: the first whose call found all
        ``size`` members counted; the completer asking again gets True again
        until ``chord_sent`` (its worker may have died before sending the
        callback), and every other call gets False.

        Written once, on the store's coordination (greenq/coordination.py):
        the members are an add-once set ``chord:<group id>``; the member that
        finds it full claims the record ``chordstate:<group id>`` (fields
        ``completer``, ``sent``) by compare-and-set, so of members racing
        exactly one writes it.  Both expire with ``result_expires``.  With a
        signing key, members and the record are signed (SignedCoordination):
        a forged member is not counted, a forged record field is ignored."""
        if not self.stores_groups:
            raise NotImplementedError
        members, state = self._chord_names(group_id)
        ttl = self.config.result_expires or None
        coordination = self.coordination
        _, count = self._coordinate(lambda: coordination.add_once(members, member_id, ttl, size), "count chord member")
        if count < size:
            return False
        me = member_id.encode()
        for _ in range(CHORD_ATTEMPTS):
            record = self._coordinate(lambda: coordination.read(state), "count chord member")
            if record.get("sent"):
                return False
            if "completer" in record:
                return record["completer"] == me
            claimed = dict(record, completer=me)
            if self._coordinate(lambda: coordination.compare_and_set(state, record, claimed, ttl),
                                "count chord member"):
                return True
        raise RuntimeError(f"chord {group_id}: its state kept changing under {CHORD_ATTEMPTS} attempts")

    def chord_members_done(self, members: Sequence[ChordCount]) -> List[bool]:
        """Store each member's ``record`` (where given), then count it as
        ``chord_member_done`` does: the answers, in order.  A member's record
        is stored before it is counted, so the completer finds every
        member's result.  Here: one ``store_many``, then one count per
        member; a backend with ``counts_with_store`` does it all at once."""
        records = [m.record for m in members if m.record is not None]
        if records:
            self.store_many(records)
        return [self.chord_member_done(m.group_id, m.member_id, m.size) for m in members]

    def chord_sent(self, group_id: str) -> None:
        """The chord's callback (or its failure) has been sent: from now on
        ``chord_member_done`` returns False for everyone."""
        if not self.stores_groups:
            raise NotImplementedError
        state = self._chord_names(group_id)[1]
        ttl = self.config.result_expires or None
        coordination = self.coordination
        for _ in range(CHORD_ATTEMPTS):
            record = self._coordinate(lambda: coordination.read(state), "mark chord sent")
            if record.get("sent"):
                return
            marked = dict(record, sent=b"1")
            if self._coordinate(lambda: coordination.compare_and_set(state, record, marked, ttl),
                                "mark chord sent"):
                return
        raise RuntimeError(f"chord {group_id}: its state kept changing under {CHORD_ATTEMPTS} attempts")

    # -- the coordination chords count on ---------------------------------------
    @property
    def coordination(self) -> "Coordination":
        """This store's coordination, made on first use (chords only)."""
        made: Optional["Coordination"] = self.__dict__.get("_coordination")
        if made is None:
            from ..coordination import signed_coordination
            made = self._coordination = signed_coordination(self._make_coordination(), self.config)
        return made

    def _make_coordination(self) -> "Coordination":
        from ..coordination import make_coordination
        return make_coordination(self.url, self.config, self.driver)

    def _chord_names(self, group_id: str) -> Tuple[str, str]:
        """The names of a chord's member set and state record."""
        return f"chord:{group_id}", f"chordstate:{group_id}"

    def _coordinate(self, call: Callable[[], T], what: str) -> T:
        """Run one coordination call (backends with a reconnect policy wrap it)."""
        return call()

    def _forget_chord(self, group_id: str) -> None:
        for name in self._chord_names(group_id):
            self.coordination.forget(name)

    def _close_coordination(self) -> None:
        made: Optional["Coordination"] = self.__dict__.pop("_coordination", None)
        if made is not None:
            made.close()

    # -- primitives ----------------------------------------------------------
    def _store_many(self, records: Sequence[Record]) -> None:
        raise NotImplementedError

    def _get(self, task_id: str) -> Optional[bytes]:
        raise NotImplementedError

    def _forget(self, task_id: str) -> None:
        raise NotImplementedError

    def _revoke(self, task_id: str, terminate: bool) -> None:
        raise NotImplementedError

    def _revoked(self, task_ids: Sequence[str]) -> Dict[str, bool]:
        raise NotImplementedError

    def _revocations(self, since: float) -> List[Revocation]:
        raise NotImplementedError

    def _is_final(self, task_id: str) -> Optional[bytes]:
        """The stored record when it is final, else None (used by polling waits)."""
        raise NotImplementedError

    def _wait(self, task_id: str, timeout: Optional[float]) -> Optional[bytes]:
        """Default: poll ``_is_final`` with a sleep growing from 5 ms to 200 ms."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.005
        while True:
            data = self._is_final(task_id)
            if data is not None:
                return data
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                delay = min(delay, left)
            self._sleep(delay)
            delay = min(delay * 1.5, 0.2)
