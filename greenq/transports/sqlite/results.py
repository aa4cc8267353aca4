"""``sqlite:///path.db`` result backend: the ``results`` and ``revocations``
tables of the broker's file (the default when the broker is SQLite; the schema
is documented in :mod:`greenq.transports.sqlite.broker`), named after ``key_prefix``
like every table (``clients.sqlite.Tables``).

Rows carry ``expires_at``: expired ones are ignored by every read and deleted
now and then by a write.  ``result_expires = 0`` keeps them forever.  SQLite
cannot block, so a waiting client binds a wake-up socket beside the file
(``wakeup.py``, kind ``r``) and a store of final records sends a datagram to
every such socket; the client reads its record when woken, and every
``wakeup.FALLBACK`` seconds without one.  Where the wake-up directory cannot
be used (read-only), and for a second wait at the same time on one backend,
``wait`` polls with a sleep growing from 5 ms to 200 ms (the base class's
``_wait``), cooperatively under a green driver.
"""
from __future__ import annotations

import os
import sqlite3
import time
from typing import Dict, List, Optional, Sequence

from .client import Database, chunks, placeholders, run_script, transaction
from .wakeup import FALLBACK, Channel, Waiter
from ...backends.base import REVOCATIONS_MAX, Record, Revocation, ResultBackend

#: the table of group records (created on first use, beside the broker's schema);
#: chords count in the coordination tables (greenq/transports/sqlite/coordination.py)
CHORD_SCHEMA = """
CREATE TABLE IF NOT EXISTS {group_records} (
    group_id TEXT PRIMARY KEY, data BLOB NOT NULL, expires_at REAL NOT NULL) WITHOUT ROWID
"""
CLEANUP_EVERY = 60.0   # seconds between deletions of expired rows, per backend instance
FOREVER = 1e300        # expires_at of records kept forever


class SQLiteBackend(ResultBackend):
    """Results in the SQLite file of the embedded broker."""


    def __init__(self, url: str, config, driver=None) -> None:
        super().__init__(url, config, driver)
        self._db = Database(url, config.key_prefix)
        self._t = self._db.tables
        self._next_cleanup = 0.0
        self._chord_tables = False
        self._wake = Channel(self._db.path, config.key_prefix)
        self._waiter: Optional[Waiter] = None
        self._waiter_tried = 0     # the pid that tried to bind a waiter (0: none yet)

    def _run(self, fn, *args):
        return self._blocking(self._db.run, fn, *args)

    def _expires_at(self, now: float) -> float:
        return now + self.config.result_expires if self.config.result_expires else FOREVER

    def _store_many(self, records: Sequence[Record]) -> None:
        now = time.time()
        expires_at = self._expires_at(now)
        rows = [(r.task_id, r.data, int(r.final), expires_at) for r in records]
        cleanup = now >= self._next_cleanup
        if cleanup:
            self._next_cleanup = now + CLEANUP_EVERY
        t = self._t

        def store(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.executemany(f"INSERT OR REPLACE INTO {t.results} (task_id, data, final, expires_at) "
                                 "VALUES (?, ?, ?, ?)", rows)
                if cleanup:
                    conn.execute(f"DELETE FROM {t.results} WHERE expires_at <= ?", (now,))
                    conn.execute(f"DELETE FROM {t.revocations} WHERE expires_at <= ?", (now,))
        self._run(store)
        if any(r.final for r in records):
            self._wake.notify("r")

    def _take_waiter(self) -> Optional[Waiter]:
        """This backend's bound wake-up socket (made on the first wait, per
        process), or None: unusable directory, or in use by another wait."""
        if self._waiter is not None and self._waiter.pid != os.getpid():
            self._waiter = None          # forked: the parent's socket is not ours
        if self._waiter is None and self._waiter_tried != os.getpid():
            self._waiter_tried = os.getpid()
            self._waiter = self._wake.waiter("r", self.driver)
        waiter = self._waiter
        if waiter is None or waiter.busy:
            return None
        waiter.busy = True
        return waiter

    def _wait(self, task_id: str, timeout: Optional[float]) -> Optional[bytes]:
        waiter = self._take_waiter()
        if waiter is None:
            return super()._wait(task_id, timeout)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                waiter.drain()           # before the read: a wake-up sent after it stays for the wait
                data = self._is_final(task_id)
                if data is not None:
                    return data
                left = FALLBACK
                if deadline is not None:
                    left = min(left, deadline - time.monotonic())
                    if left <= 0:
                        return None
                waiter.wait(left)
        finally:
            waiter.busy = False

    def _select(self, sql: str, task_id: str) -> Optional[bytes]:
        def query(conn: sqlite3.Connection) -> Optional[bytes]:
            row = conn.execute(sql, (task_id, time.time())).fetchone()
            return row[0] if row else None
        return self._run(query)

    def _get(self, task_id: str) -> Optional[bytes]:
        return self._select(f"SELECT data FROM {self._t.results} WHERE task_id = ? AND expires_at > ?", task_id)

    def _is_final(self, task_id: str) -> Optional[bytes]:
        return self._select(f"SELECT data FROM {self._t.results} WHERE task_id = ? AND expires_at > ? "
                            "AND final = 1", task_id)

    def _forget(self, task_id: str) -> None:
        def delete(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute(f"DELETE FROM {self._t.results} WHERE task_id = ?", (task_id,))
        self._run(delete)

    def _revoke(self, task_id: str, terminate: bool) -> None:
        now = time.time()
        expires_at = self._expires_at(now)

        def insert(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute(f"INSERT OR REPLACE INTO {self._t.revocations} (task_id, terminate, expires_at, "
                             "revoked_at) VALUES (?, ?, ?, ?)", (task_id, int(terminate), expires_at, now))
        self._run(insert)

    def _revocations(self, since: float) -> List[Revocation]:
        def query(conn: sqlite3.Connection) -> List[Revocation]:
            rows = conn.execute(f"SELECT task_id, terminate, revoked_at FROM {self._t.revocations} "
                                "WHERE revoked_at >= ? AND expires_at > ? ORDER BY revoked_at DESC LIMIT ?",
                                (since, time.time(), REVOCATIONS_MAX)).fetchall()
            return [Revocation(t, bool(terminate), at) for t, terminate, at in reversed(rows)]
        return self._run(query)

    def _revoked(self, task_ids: Sequence[str]) -> Dict[str, bool]:
        ids = list(task_ids)

        def query(conn: sqlite3.Connection) -> Dict[str, bool]:
            now = time.time()
            found: Dict[str, bool] = {}
            for chunk in chunks(ids):
                found.update((task_id, bool(terminate)) for task_id, terminate in conn.execute(
                    f"SELECT task_id, terminate FROM {self._t.revocations} "
                    f"WHERE task_id IN ({placeholders(len(chunk))}) AND expires_at > ?", (*chunk, now)))
            return found
        return self._run(query)

    # -- groups and chords -------------------------------------------------------
    stores_groups = True

    def get_many(self, task_ids: Sequence[str]) -> List[Optional[bytes]]:
        ids = list(task_ids)

        def query(conn: sqlite3.Connection) -> List[Optional[bytes]]:
            found: Dict[str, bytes]
            now, found = time.time(), {}
            for chunk in chunks(ids):
                found.update(conn.execute(
                    f"SELECT task_id, data FROM {self._t.results} WHERE task_id IN ({placeholders(len(chunk))}) "
                    f"AND expires_at > ?", (*chunk, now)))
            return [found.get(t) for t in ids]
        return self._run(query)

    def _chords(self, fn, *args):
        """Run ``fn(conn, *args)`` after making the chord tables (once per instance)."""
        def run(conn: sqlite3.Connection):
            if not self._chord_tables:
                run_script(conn, self._t, CHORD_SCHEMA)
                self._chord_tables = True
            return fn(conn, *args)
        return self._run(run)

    def save_group(self, group_id: str, data: bytes) -> None:
        now = time.time()
        t = self._t

        def insert(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute(f"INSERT OR REPLACE INTO {t.group_records} (group_id, data, expires_at) "
                             "VALUES (?, ?, ?)", (group_id, data, self._expires_at(now)))
                conn.execute(f"DELETE FROM {t.group_records} WHERE expires_at <= ?", (now,))
        self._chords(insert)

    def load_group(self, group_id: str) -> Optional[bytes]:
        def query(conn: sqlite3.Connection) -> Optional[bytes]:
            row = conn.execute(f"SELECT data FROM {self._t.group_records} WHERE group_id = ? AND expires_at > ?",
                               (group_id, time.time())).fetchone()
            return row[0] if row else None
        return self._chords(query)

    def forget_group(self, group_id: str) -> None:
        def delete(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute(f"DELETE FROM {self._t.group_records} WHERE group_id = ?", (group_id,))
        self._chords(delete)
        self._forget_chord(group_id)

    # chord_member_done / chord_sent: ResultBackend's, on SQLiteCoordination (its own
    # connections to the same file; expired members and records are deleted by it)

    def close(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.close()
        self._close_coordination()
        self._db.close()
