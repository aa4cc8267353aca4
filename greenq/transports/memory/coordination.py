"""Coordination in one process (``memory://``; greenq/coordination.py tells
the contract).  Every instance made for the same URL and key_prefix shares
one store, guarded by one lock; a holder that stops renewing loses its place
``ttl`` seconds (monotonic clock) after its last renewal."""
from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Dict, List, Mapping, Optional, Set, Tuple

from ...coordination import Coordination, Record

if TYPE_CHECKING:  # pragma: no cover
    from ...config import Config
    from ...drivers.base import Driver


class _Store:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.leases: Dict[str, Dict[str, float]] = {}                # name -> holder -> until
        self.sets: Dict[str, Tuple[Set[str], float]] = {}            # name -> (members, until)
        self.records: Dict[str, Tuple[Record, float]] = {}           # name -> (record, until)
        self.next_sweep = 0.0

    def sweep(self, now: float) -> None:
        """Drop expired sets and records now and then (they are ignored meanwhile)."""
        if now < self.next_sweep:
            return
        self.next_sweep = now + SWEEP_EVERY
        for name in [n for n, (_, until) in self.sets.items() if until <= now]:
            del self.sets[name]
        for name in [n for n, (_, until) in self.records.items() if until <= now]:
            del self.records[name]

    def live_holders(self, name: str, now: float) -> Dict[str, float]:
        holders = self.leases.setdefault(name, {})
        for holder in [h for h, until in holders.items() if until <= now]:
            del holders[holder]
        return holders


_STORES: Dict[Tuple[str, str], _Store] = {}
_STORES_LOCK = threading.Lock()
FOREVER = float("inf")
SWEEP_EVERY = 30.0     # seconds between sweeps of expired sets and records


def _until(ttl: Optional[float], now: float) -> float:
    return now + ttl if ttl else FOREVER


class MemoryCoordination(Coordination):
    def __init__(self, url: str, config: "Config", driver: Optional["Driver"] = None) -> None:
        super().__init__(url, config, driver)
        with _STORES_LOCK:
            self._store = _STORES.setdefault((url, config.key_prefix), _Store())

    def acquire(self, name: str, holder: str, limit: int, ttl: float) -> bool:
        with self._store.lock:
            now = time.monotonic()
            holders = self._store.live_holders(name, now)
            if holder not in holders and len(holders) >= limit:
                return False
            holders[holder] = now + ttl
            return True

    def renew(self, name: str, holder: str, ttl: float) -> bool:
        with self._store.lock:
            now = time.monotonic()
            holders = self._store.live_holders(name, now)
            if holder not in holders:
                return False
            holders[holder] = now + ttl
            return True

    def release(self, name: str, holder: str) -> None:
        with self._store.lock:
            self._store.leases.get(name, {}).pop(holder, None)

    def add_once(self, name: str, member: str, ttl: Optional[float] = None,
                 enough: Optional[int] = None) -> Tuple[bool, int]:
        with self._store.lock:
            now = time.monotonic()
            self._store.sweep(now)
            members, until = self._store.sets.get(name, (set(), FOREVER))
            if until <= now:
                members = set()
            added = member not in members
            members.add(member)
            self._store.sets[name] = (members, _until(ttl, now))
            return added, len(members)

    def members(self, name: str) -> List[str]:
        with self._store.lock:
            members, until = self._store.sets.get(name, (set(), FOREVER))
            return sorted(members) if until > time.monotonic() else []

    def holders(self, name: str, limit: int) -> List[str]:
        with self._store.lock:
            return list(self._store.live_holders(name, time.monotonic()))

    def read(self, name: str) -> Record:
        with self._store.lock:
            return dict(self._current(name))

    def _current(self, name: str) -> Record:
        record, until = self._store.records.get(name, ({}, FOREVER))
        return record if until > time.monotonic() else {}

    def compare_and_set(self, name: str, expected: Mapping[str, bytes], new: Mapping[str, bytes],
                        ttl: Optional[float] = None) -> bool:
        with self._store.lock:
            if self._current(name) != dict(expected):
                return False
            if new:
                self._store.records[name] = ({k: bytes(v) for k, v in new.items()},
                                             _until(ttl, time.monotonic()))
            else:
                self._store.records.pop(name, None)
            return True

    def forget(self, name: str) -> None:
        with self._store.lock:
            self._store.sets.pop(name, None)
            self._store.records.pop(name, None)

    def reset(self) -> None:
        """Forget everything of this URL and prefix (between users' tests)."""
        with self._store.lock:
            self._store.leases.clear()
            self._store.sets.clear()
            self._store.records.clear()
