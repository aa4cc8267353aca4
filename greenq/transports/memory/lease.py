"""The periodic scheduler's lease on memory (greenq/leases.py tells what a lease is)."""
from __future__ import annotations

import logging
import threading
import time
from typing import Any, Dict, Tuple

from ...leases import Lease

log = logging.getLogger("greenq.beat")

_MEMORY: Dict[Tuple[str, str], Dict[str, Any]] = {}   # (url, key_prefix) -> its lease
_MEMORY_LOCK = threading.Lock()


class MemoryLease(Lease):
    def __init__(self, url: str, config: Any, ttl: float, driver: Any = None) -> None:
        super().__init__(url, config, ttl, driver)
        with _MEMORY_LOCK:
            self._state = _MEMORY.setdefault((url, config.key_prefix), {"holder": None, "until": 0.0, "runs": {}})

    def _holds(self, holder: str) -> bool:
        return self._state["holder"] == holder and self._state["until"] > time.monotonic()

    def acquire(self, holder: str) -> bool:
        with _MEMORY_LOCK:
            if self._holds(holder) or self._state["until"] <= time.monotonic():
                self._state.update(holder=holder, until=time.monotonic() + self.ttl)
                return True
            return False

    def release(self, holder: str) -> None:
        with _MEMORY_LOCK:
            if self._state["holder"] == holder:
                self._state.update(holder=None, until=0.0)

    def last_runs(self) -> Dict[str, float]:
        with _MEMORY_LOCK:
            return dict(self._state["runs"])

    def record(self, holder: str, entry: str, slot: float) -> bool:
        with _MEMORY_LOCK:
            if not self._holds(holder):
                return False
            self._state["runs"][entry] = slot
            return True
