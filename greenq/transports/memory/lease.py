"""The periodic scheduler's lease on memory: greenq.leases.CoordinatedLease on
MemoryCoordination (greenq/leases.py tells what a lease is)."""
from __future__ import annotations

from typing import Any

from ...leases import CoordinatedLease


class MemoryLease(CoordinatedLease):
    def __init__(self, url: str, config: Any, ttl: float, driver: Any = None) -> None:
        from .coordination import MemoryCoordination
        super().__init__(url, config, ttl, driver, MemoryCoordination(url, config, driver))
