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
from typing import TYPE_CHECKING, Dict, List, NamedTuple, Optional, Sequence

from ..drivers.base import UsesDriver

if TYPE_CHECKING:  # pragma: no cover
    from ..config import Config
    from ..drivers.base import Driver


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


#: the most revocations ``revocations()`` returns (the newest), and a worker keeps
REVOCATIONS_MAX = 50000


class ResultBackend(UsesDriver):
    #: keeps group records and counts chord members (greenq.canvas); rpc:// does not
    stores_groups = False

    def __init__(self, url: str, config: "Config", driver: Optional["Driver"] = None) -> None:
        self.url = url
        self.config = config
        self.driver = driver

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
        callback), and every other call gets False."""
        raise NotImplementedError

    def chord_sent(self, group_id: str) -> None:
        """The chord's callback (or its failure) has been sent: from now on
        ``chord_member_done`` returns False for everyone."""
        raise NotImplementedError

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
