"""The process scope: permits counted in this process's memory.

Exact and free: every greenlet of the worker shares the dict, and a green
driver switches only at I/O, so a check-then-add needs no lock; the threads
driver does switch anywhere, hence the lock (uncontended under gevent).
"""
from __future__ import annotations

import threading
from typing import Any, Set, TYPE_CHECKING

from .base import PermitPool

if TYPE_CHECKING:   # pragma: no cover
    from ..config import Config


class ProcessPool(PermitPool):
    """Permits in memory: a set of holders no larger than the limit in force."""

    def __init__(self, name: str, limit: int, *, app_key: str, config: "Config", driver: Any = None) -> None:
        super().__init__(name, limit, app_key=app_key, config=config, driver=driver)
        self._holders: Set[str] = set()
        self._lock = threading.Lock()

    def try_acquire(self, holder: str) -> bool:
        with self._lock:
            if holder in self._holders:
                return True
            if len(self._holders) >= self.limit:
                return False
            self._holders.add(holder)
            return True

    def release(self, holder: str) -> None:
        with self._lock:
            self._holders.discard(holder)

    def in_use(self) -> int:
        return len(self._holders)

    def close(self) -> None:
        with self._lock:
            self._holders.clear()
