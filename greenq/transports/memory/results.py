"""``memory://`` result backend: in-process, for users' unit tests.

Every backend made for the same URL in one process shares one store, so a
worker running in the test process and the test's client see the same
results.  ``wait`` blocks on an event (the driver's own under gevent or
eventlet) that a final record for its task sets.
"""
from __future__ import annotations

import threading
import time
from typing import Dict, List, Optional, Sequence, Tuple

from .coordination import MemoryCoordination
from .client import MAX_WAIT as _MAX_WAIT, Registry, store_name, waiter_event
from ...backends.base import REVOCATIONS_MAX, Record, Revocation, ResultBackend


_CLEANUP_EVERY = 30.0  # seconds between sweeps of expired records


class _ResultStore:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.results: Dict[str, Tuple[bytes, bool, float]] = {}   # id -> (data, final, expires_at)
        self.revoked: Dict[str, Tuple[bool, float, float]] = {}  # id -> (terminate, at, expires_at)
        self.waiters: Dict[str, List] = {}
        self.groups: Dict[str, Tuple[bytes, float]] = {}          # id -> (data, expires_at)
        self.next_cleanup = 0.0

    def sweep(self, now: float) -> None:
        if now < self.next_cleanup:
            return
        self.next_cleanup = now + _CLEANUP_EVERY
        for table in (self.results, self.revoked, self.groups):
            for key in [k for k, v in table.items() if v[-1] <= now]:
                del table[key]



_STORES = Registry(_ResultStore)


class MemoryBackend(ResultBackend):
    """Results shared by every ``MemoryBackend`` of the same URL in the process."""


    def __init__(self, url: str, config, driver=None) -> None:
        super().__init__(url, config, driver)
        self._store = _STORES.get(store_name(url, config.key_prefix))

    def _expires_at(self, now: float) -> float:
        """``result_expires = 0`` keeps records forever."""
        return now + self.config.result_expires if self.config.result_expires else float("inf")

    def _store_many(self, records: Sequence[Record]) -> None:
        store = self._store
        now = time.time()
        expires_at = self._expires_at(now)
        with store.lock:
            for r in records:
                store.results[r.task_id] = (bytes(r.data), r.final, expires_at)
                if r.final:
                    for event in store.waiters.pop(r.task_id, ()):
                        event.set()
            store.sweep(now)

    def _live(self, task_id: str) -> Optional[Tuple[bytes, bool, float]]:
        entry = self._store.results.get(task_id)
        if entry is not None and entry[2] > time.time():
            return entry
        return None

    def _get(self, task_id: str) -> Optional[bytes]:
        with self._store.lock:
            entry = self._live(task_id)
        return entry[0] if entry else None

    def _is_final(self, task_id: str) -> Optional[bytes]:
        with self._store.lock:
            entry = self._live(task_id)
        return entry[0] if entry and entry[1] else None

    def _wait(self, task_id: str, timeout: Optional[float]) -> Optional[bytes]:
        store = self._store
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with store.lock:
                entry = self._live(task_id)
                if entry is not None and entry[1]:
                    return entry[0]
                event = waiter_event(self.driver)
                store.waiters.setdefault(task_id, []).append(event)
            wait = _MAX_WAIT
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._drop_waiter(task_id, event)
                    return None
                wait = min(wait, left)
            event.wait(wait)
            self._drop_waiter(task_id, event)

    def _drop_waiter(self, task_id: str, event) -> None:
        with self._store.lock:
            events = self._store.waiters.get(task_id)
            if events is not None and event in events:
                events.remove(event)
                if not events:
                    del self._store.waiters[task_id]

    def _forget(self, task_id: str) -> None:
        with self._store.lock:
            self._store.results.pop(task_id, None)

    def _revoke(self, task_id: str, terminate: bool) -> None:
        now = time.time()
        with self._store.lock:
            self._store.revoked.pop(task_id, None)          # re-revoked: newest last
            self._store.revoked[task_id] = (bool(terminate), now, self._expires_at(now))

    def _revoked(self, task_ids: Sequence[str]) -> Dict[str, bool]:
        now = time.time()
        with self._store.lock:
            found = ((t, self._store.revoked.get(t)) for t in task_ids)
            return {t: entry[0] for t, entry in found if entry is not None and entry[-1] > now}

    def _revocations(self, since: float) -> List[Revocation]:
        now = time.time()
        with self._store.lock:
            found = [Revocation(t, terminate, at) for t, (terminate, at, expires_at)
                     in self._store.revoked.items() if at >= since and expires_at > now]
        return found[-REVOCATIONS_MAX:]

    # -- groups and chords -------------------------------------------------------
    stores_groups = True

    def save_group(self, group_id: str, data: bytes) -> None:
        with self._store.lock:
            self._store.groups[group_id] = (bytes(data), self._expires_at(time.time()))

    def load_group(self, group_id: str) -> Optional[bytes]:
        with self._store.lock:
            entry = self._store.groups.get(group_id)
        return entry[0] if entry and entry[1] > time.time() else None

    def forget_group(self, group_id: str) -> None:
        with self._store.lock:
            self._store.groups.pop(group_id, None)
        self._forget_chord(group_id)

    # chord_member_done / chord_sent: ResultBackend's, on MemoryCoordination

    def reset(self) -> None:
        """Forget every result and revocation of this URL (between users' tests)."""
        with self._store.lock:
            self._store.results.clear()
            self._store.revoked.clear()
            self._store.groups.clear()
        coordination = getattr(self.coordination, "inner", self.coordination)   # under SignedCoordination
        if isinstance(coordination, MemoryCoordination):
            coordination.reset()
