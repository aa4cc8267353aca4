"""The periodic scheduler's leadership on memory: greenq.leadership.CoordinatedLeadership on
MemoryCoordination (greenq/leadership.py tells what leadership is)."""
from __future__ import annotations

from typing import Any

from ...leadership import CoordinatedLeadership


class MemoryLeadership(CoordinatedLeadership):
    def __init__(self, url: str, config: Any, ttl: float, driver: Any = None) -> None:
        from .coordination import MemoryCoordination
        super().__init__(url, config, ttl, driver, MemoryCoordination(url, config, driver))
