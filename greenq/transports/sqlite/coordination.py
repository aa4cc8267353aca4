"""Coordination in the SQLite file (greenq/coordination.py tells the
contract): three tables beside the broker's, named after the key_prefix like
every table (``P_leases``...; the default prefix keeps the plain names)::

    leases       (name, holder, expires_at)   one row per place held
    set_members  (name, member, expires_at)   one row per member
    records      (name, field, value, expires_at)   one row per field

Every operation is one ``BEGIN IMMEDIATE`` transaction, so operations on one
file run one at a time whatever the number of processes; the work runs in
the driver's thread pool, never on the hub.  Expiry times are epoch seconds
by the clock of the machine (one file: one machine).  A lease row whose
expiry is not a number, or lies more than its ``ttl`` (plus ``CLOCK_SLACK``)
ahead (written by hand, or by a process whose clock was fast), counts as
free.

Files written by greenq before coordination existed kept the scheduler's
last runs in ``beat_runs`` and chord counts in ``chord_members`` /
``chord_state``: when the new tables are made in such a file, those rows are
copied over once (``migrate``), in the same transaction.  The old tables are
left in place (unused; they may be dropped).  A scheduler of the old version
still running on the file at that moment would not see the new lease: stop
every greenq process of a file before upgrading it (they all run on one
machine).
"""
from __future__ import annotations

import sqlite3
import time
from typing import TYPE_CHECKING, Any, Callable, List, Mapping, Optional, Tuple, TypeVar

from ...coordination import CLOCK_SLACK, Coordination, Record
from .client import Database, Tables, transaction

if TYPE_CHECKING:  # pragma: no cover
    from ...config import Config
    from ...drivers.base import Driver

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS {leases} (
    name TEXT NOT NULL, holder TEXT NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (name, holder)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS {set_members} (
    name TEXT NOT NULL, member TEXT NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (name, member)) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS {records} (
    name TEXT NOT NULL, field TEXT NOT NULL, value BLOB NOT NULL, expires_at REAL NOT NULL,
    PRIMARY KEY (name, field)) WITHOUT ROWID
"""
#: copies the rows of the tables used before coordination (see the module docstring)
MIGRATE = """
INSERT OR IGNORE INTO {records} (name, field, value, expires_at)
    SELECT 'beat:runs', entry, CASE typeof(slot) WHEN 'blob' THEN slot ELSE CAST(CAST(slot AS TEXT) AS BLOB) END,
           1e300 FROM {beat_runs};
INSERT OR IGNORE INTO {set_members} (name, member, expires_at)
    SELECT 'chord:' || group_id, member_id, expires_at FROM {chord_members};
INSERT OR IGNORE INTO {records} (name, field, value, expires_at)
    SELECT 'chordstate:' || group_id, 'completer', CAST(completer AS BLOB), expires_at FROM {chord_state}
    WHERE completer IS NOT NULL;
INSERT OR IGNORE INTO {records} (name, field, value, expires_at)
    SELECT 'chordstate:' || group_id, 'sent', CAST('1' AS BLOB), expires_at FROM {chord_state} WHERE sent
"""
#: table used before coordination -> the MIGRATE statements that copy it
LEGACY_STATEMENTS = {"beat_runs": (0,), "chord_members": (1,), "chord_state": (2, 3)}
FOREVER = 1e300
CLEANUP_EVERY = 60.0   # seconds between deletions of expired rows, per instance


def _exists(conn: sqlite3.Connection, table: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                        (table,)).fetchone() is not None


def migrate(conn: sqlite3.Connection, tables: Tables) -> None:
    """Copy the rows of the tables greenq used before coordination (in the
    caller's transaction, right after the new tables were made)."""
    statements = tables.sql(MIGRATE).split(";")
    for legacy, which in LEGACY_STATEMENTS.items():
        if _exists(conn, tables.raw(legacy)):
            for index in which:
                conn.execute(statements[index])


def _expires_at(ttl: Optional[float], now: float) -> float:
    return now + ttl if ttl else FOREVER


class SQLiteCoordination(Coordination):
    def __init__(self, url: str, config: "Config", driver: Optional["Driver"] = None) -> None:
        super().__init__(url, config, driver)
        self._db = Database(url, config.key_prefix)
        self._t = self._db.tables
        self._ready = False
        self._next_cleanup = 0.0

    def _run(self, fn: Callable[[sqlite3.Connection, float], T]) -> T:
        """``fn(conn, now)`` in one write transaction, after making the tables (once)."""
        def run(conn: sqlite3.Connection) -> T:
            if not self._ready:
                self._make_tables(conn)
            with transaction(conn):
                now = time.time()
                if now >= self._next_cleanup:
                    self._next_cleanup = now + CLEANUP_EVERY
                    for table in (self._t.leases, self._t.set_members, self._t.records):
                        conn.execute(f"DELETE FROM {table} WHERE expires_at <= ?", (now,))
                return fn(conn, now)
        result: T = self._blocking(self._db.run, run)
        return result

    def _make_tables(self, conn: sqlite3.Connection) -> None:
        if _exists(conn, self._t.raw("records")):
            self._ready = True
            return
        with transaction(conn):
            fresh = not _exists(conn, self._t.raw("records"))     # again, under the lock
            for statement in self._t.sql(SCHEMA).split(";"):
                conn.execute(statement)
            if fresh:
                migrate(conn, self._t)
        self._ready = True

    # -- counted lease ---------------------------------------------------------------
    def _holders(self, conn: sqlite3.Connection, name: str, now: float, ttl: float) -> List[str]:
        """The holders of live places of ``name``; rows that are expired or
        implausible (see the module docstring) are deleted."""
        conn.execute(f"DELETE FROM {self._t.leases} WHERE name = ? AND NOT (typeof(expires_at) IN "
                     "('real', 'integer') AND expires_at > ? AND expires_at <= ?)",
                     (name, now, now + ttl + CLOCK_SLACK))
        return [row[0] for row in conn.execute(f"SELECT holder FROM {self._t.leases} WHERE name = ?", (name,))]

    def acquire(self, name: str, holder: str, limit: int, ttl: float) -> bool:
        def take(conn: sqlite3.Connection, now: float) -> bool:
            holders = self._holders(conn, name, now, ttl)
            if holder not in holders and len(holders) >= limit:
                return False
            conn.execute(f"INSERT OR REPLACE INTO {self._t.leases} (name, holder, expires_at) VALUES (?, ?, ?)",
                         (name, holder, now + ttl))
            return True
        return self._run(take)

    def renew(self, name: str, holder: str, ttl: float) -> bool:
        def extend(conn: sqlite3.Connection, now: float) -> bool:
            if holder not in self._holders(conn, name, now, ttl):
                return False
            conn.execute(f"UPDATE {self._t.leases} SET expires_at = ? WHERE name = ? AND holder = ?",
                         (now + ttl, name, holder))
            return True
        return self._run(extend)

    def release(self, name: str, holder: str) -> None:
        def give_back(conn: sqlite3.Connection, now: float) -> None:
            conn.execute(f"DELETE FROM {self._t.leases} WHERE name = ? AND holder = ?", (name, holder))
        self._run(give_back)

    # -- add-once set ------------------------------------------------------------------
    def add_once(self, name: str, member: str, ttl: Optional[float] = None,
                 enough: Optional[int] = None) -> Tuple[bool, int]:
        def add(conn: sqlite3.Connection, now: float) -> Tuple[bool, int]:
            t = self._t
            conn.execute(f"DELETE FROM {t.set_members} WHERE name = ? AND expires_at <= ?", (name, now))
            added = conn.execute(f"INSERT OR IGNORE INTO {t.set_members} (name, member, expires_at) "
                                 "VALUES (?, ?, ?)", (name, member, _expires_at(ttl, now))).rowcount == 1
            conn.execute(f"UPDATE {t.set_members} SET expires_at = ? WHERE name = ?", (_expires_at(ttl, now), name))
            count = conn.execute(f"SELECT COUNT(*) FROM {t.set_members} WHERE name = ?", (name,)).fetchone()[0]
            return added, int(count)
        return self._run(add)

    def members(self, name: str) -> List[str]:
        def select(conn: sqlite3.Connection, now: float) -> List[str]:
            return sorted(str(row[0]) for row in conn.execute(
                f"SELECT member FROM {self._t.set_members} WHERE name = ? AND expires_at > ?", (name, now)))
        return self._run(select)

    def holders(self, name: str, limit: int) -> List[str]:
        def select(conn: sqlite3.Connection, now: float) -> List[str]:
            return [str(row[0]) for row in conn.execute(
                f"SELECT holder FROM {self._t.leases} WHERE name = ? AND typeof(expires_at) IN ('real', 'integer') "
                "AND expires_at > ?", (name, now))]
        return self._run(select)

    # -- compare-and-set record ------------------------------------------------------
    def _record(self, conn: sqlite3.Connection, name: str, now: float) -> Record:
        rows = conn.execute(f"SELECT field, value FROM {self._t.records} WHERE name = ? AND expires_at > ?",
                            (name, now))
        return {str(field): _bytes(value) for field, value in rows}

    def read(self, name: str) -> Record:
        return self._run(lambda conn, now: self._record(conn, name, now))

    def compare_and_set(self, name: str, expected: Mapping[str, bytes], new: Mapping[str, bytes],
                        ttl: Optional[float] = None) -> bool:
        def swap(conn: sqlite3.Connection, now: float) -> bool:
            if self._record(conn, name, now) != dict(expected):
                return False
            conn.execute(f"DELETE FROM {self._t.records} WHERE name = ?", (name,))
            conn.executemany(f"INSERT INTO {self._t.records} (name, field, value, expires_at) VALUES (?, ?, ?, ?)",
                             [(name, field, bytes(value), _expires_at(ttl, now)) for field, value in new.items()])
            return True
        return self._run(swap)

    def forget(self, name: str) -> None:
        def delete(conn: sqlite3.Connection, now: float) -> None:
            conn.execute(f"DELETE FROM {self._t.set_members} WHERE name = ?", (name,))
            conn.execute(f"DELETE FROM {self._t.records} WHERE name = ?", (name,))
        self._run(delete)

    def close(self) -> None:
        self._db.close()


def _bytes(value: Any) -> bytes:
    """A stored value as bytes (a row written by hand may hold text or a number)."""
    if isinstance(value, bytes):
        return value
    return str(value).encode("utf-8", "replace")
