"""The periodic scheduler's lease on sqlite: greenq.leases.CoordinatedLease on
SQLiteCoordination, rows ``beat:lease`` and ``beat:runs`` of the ``leases`` and
``records`` tables (greenq/leases.py tells what a lease is)."""
from __future__ import annotations

from typing import Any

from ...leases import CoordinatedLease


class SQLiteLease(CoordinatedLease):
    def __init__(self, url: str, config: Any, ttl: float, driver: Any = None) -> None:
        from .coordination import SQLiteCoordination
        super().__init__(url, config, ttl, driver, SQLiteCoordination(url, config, driver))
