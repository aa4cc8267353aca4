"""The periodic scheduler's leadership on sqlite: greenq.leadership.CoordinatedLeadership on
SQLiteCoordination, rows ``beat:lease`` and ``beat:runs`` of the ``leases`` and
``records`` tables (greenq/leadership.py tells what leadership is)."""
from __future__ import annotations

from typing import Any

from ...leadership import CoordinatedLeadership


class SQLiteLeadership(CoordinatedLeadership):
    def __init__(self, url: str, config: Any, ttl: float, driver: Any = None) -> None:
        from .coordination import SQLiteCoordination
        super().__init__(url, config, ttl, driver, SQLiteCoordination(url, config, driver))
