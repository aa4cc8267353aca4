"""Process-wide in-memory stores shared by the memory broker and backend:
the registry of stores by ``memory://`` name, and waiting without blocking
the hub."""
from __future__ import annotations

import threading
from typing import Any, Callable, Dict, Tuple
from urllib.parse import urlsplit

MAX_WAIT = 0.1   # a blocked caller re-checks at least this often


def store_name(url: str, prefix: str) -> Tuple[str, str]:
    """The store of ``url`` for the app of ``key_prefix`` ``prefix``:
    ``memory://`` -> ``("", prefix)``; ``memory://name`` -> ``("name", prefix)``.
    Apps of other prefixes on one URL never share a store (tasks, results,
    revocations), as on every other broker."""
    parts = urlsplit(url)
    return parts.netloc + parts.path.rstrip("/"), prefix


def waiter_event(driver: Any):
    """An event a blocked caller can wait on without blocking the hub."""
    if driver is not None and driver.green:
        return driver.event()
    return threading.Event()


class Registry:
    """Process-wide stores by ``memory://`` name, made on first use: every
    broker (or backend) with the same name shares one."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        self._factory = factory
        self._stores: Dict[Tuple[str, str], Any] = {}
        self._lock = threading.Lock()

    def get(self, name: Tuple[str, str]) -> Any:
        with self._lock:
            store = self._stores.get(name)
            if store is None:
                store = self._stores[name] = self._factory()
            return store


