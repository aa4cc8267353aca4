"""The periodic scheduler's lease on sqlite (greenq/leases.py tells what a lease is)."""
from __future__ import annotations

import logging
import time
from typing import Any, Dict, Optional

from ...leases import CLOCK_SLACK, Lease, encode_slot

log = logging.getLogger("greenq.beat")

SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS {beat_lease} (name TEXT PRIMARY KEY, holder TEXT NOT NULL,
                                         expires_at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS {beat_runs} (entry TEXT PRIMARY KEY, slot REAL NOT NULL) WITHOUT ROWID
"""


class SQLiteLease(Lease):
    NAME = "beat"

    def __init__(self, url: str, config: Any, ttl: float, driver: Any = None) -> None:
        super().__init__(url, config, ttl, driver)
        from .client import Database
        self._db = Database(url, config.key_prefix)
        self._t = self._db.tables
        self._ready = False

    def _run(self, fn: Any, *args: Any) -> Any:
        from .client import transaction

        def run(conn: Any) -> Any:
            with transaction(conn):
                if not self._ready:
                    for statement in self._t.sql(SQLITE_SCHEMA).split(";"):
                        conn.execute(statement)
                    self._ready = True
                return fn(conn, *args)
        return self._blocking(self._db.run, run)

    def _holder(self, conn: Any, now: float) -> Optional[str]:
        """The holder of an unexpired lease; a lease whose expiry is not a
        number or lies more than ttl + CLOCK_SLACK ahead counts as expired."""
        row = conn.execute(f"SELECT holder FROM {self._t.beat_lease} WHERE name = ? AND typeof(expires_at) IN "
                           "('real', 'integer') AND expires_at > ? AND expires_at <= ?",
                           (SQLiteLease.NAME, now, now + self.ttl + CLOCK_SLACK)).fetchone()
        return row[0] if row else None

    def acquire(self, holder: str) -> bool:
        def take(conn: Any) -> bool:
            now = time.time()
            current = self._holder(conn, now)
            if current not in (None, holder):
                return False
            conn.execute(f"INSERT OR REPLACE INTO {self._t.beat_lease} (name, holder, expires_at) "
                         "VALUES (?, ?, ?)", (self.NAME, holder, now + self.ttl))
            return True
        return self._run(take)

    def release(self, holder: str) -> None:
        self._run(lambda conn: conn.execute(f"DELETE FROM {self._t.beat_lease} WHERE name = ? AND holder = ?",
                                            (self.NAME, holder)))

    def last_runs(self) -> Dict[str, float]:
        return self._runs(self._run(lambda conn: conn.execute(f"SELECT entry, slot FROM {self._t.beat_runs}")
                                    .fetchall()))

    def record(self, holder: str, entry: str, slot: float) -> bool:
        def write(conn: Any) -> bool:
            if self._holder(conn, time.time()) != holder:
                return False
            value = encode_slot(self.signer, entry, slot) if self.signer else float(slot)
            conn.execute(f"INSERT OR REPLACE INTO {self._t.beat_runs} (entry, slot) VALUES (?, ?)", (entry, value))
            return True
        return self._run(write)

    def close(self) -> None:
        self._db.close()
