"""The periodic scheduler's leadership on redis: greenq.leadership.CoordinatedLeadership on
RedisCoordination, keys ``P:beat:lease`` and ``P:beat:runs`` (greenq/leadership.py
tells what a lease is)."""
from __future__ import annotations

from typing import Any, List

from ...leadership import CoordinatedLeadership


class RedisLeadership(CoordinatedLeadership):
    @property
    def keys(self) -> List[str]:
        """The lease's key and the runs' key."""
        key = getattr(self.coordination, "key")
        return [key(self.LEASE), key(self.RUNS)]

    def __init__(self, url: str, config: Any, ttl: float, driver: Any = None) -> None:
        from .coordination import RedisCoordination
        super().__init__(url, config, ttl, driver, RedisCoordination(url, config, driver))
