"""The control plane on the SQLite broker: three tables of its own in the
broker's database file.

    control_commands  (id, created, body)           every command; each worker
                                                    reads the rows past the last
                                                    id it saw
    control_replies   (id, reply_to, created, body) replies, read by reply_to
                                                    (32 hex digits)
    control_events    (id, created, body)           one row per event batch

SQLite cannot block, so a reader waits for a wake-up (wakeup.py: the writer
of a command, a reply or an event batch sends a datagram to the sockets of
the readers of that kind, ``c``, ``p`` or ``e``, beside the file) and reads
again every ``wakeup.FALLBACK`` seconds without one; where the wake-up
directory cannot be used, readers poll every 0.1 s, through the driver, off
the hub.  Old rows are deleted by the writers: commands and replies after a
minute, events past the last EVENTS_KEPT batches.

The table names derive from ``key_prefix`` like every table of the file
(``clients.sqlite.Tables``): apps sharing a file never see each other's
commands, replies or events (docs/operations.md, "Apps apart").
"""
from __future__ import annotations

import os
import sqlite3
import time
from typing import Any, Dict, List, Optional

from .client import Database, Tables, run_script, transaction
from .wakeup import FALLBACK, Channel, Waiter
from ...drivers.base import UsesDriver
from ...events import decode_batch
from ...control.base import Document, Transport

SCHEMA = """
CREATE TABLE IF NOT EXISTS {control_commands} (
    id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS {control_replies} (
    id INTEGER PRIMARY KEY AUTOINCREMENT, reply_to TEXT NOT NULL, created REAL NOT NULL, body TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS {control_replies_to} ON {control_replies} (reply_to, id);
CREATE TABLE IF NOT EXISTS {control_events} (
    id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL, body TEXT NOT NULL);
"""
POLL = 0.1
KEEP_SECONDS = 60.0
EVENTS_KEPT = 1000          # event batches (of at most 500 events) kept for readers that start later
CLEAN_EVERY = 10.0


class SQLiteTransport(UsesDriver, Transport):
    def __init__(self, url: str, config: Any, driver: Any = None) -> None:
        Transport.__init__(self, url, config, driver)
        self._db: Optional[Database] = None
        self._t = Tables(config.key_prefix)
        self._last_command = 0
        self._last_event = 0
        self._last_reply = 0
        self._next_clean = 0.0
        self._wake: Optional[Channel] = None
        self._waiters: Dict[str, Optional[Waiter]] = {}
        self._waiters_pid = 0

    def _channel(self) -> Channel:
        if self._wake is None:
            self._wake = Channel(Database(self.url, self.config.key_prefix).path, self.config.key_prefix)
        return self._wake

    def _notify(self, kind: str) -> None:
        self._channel().notify(kind)

    def _take_waiter(self, kind: str) -> Optional[Waiter]:
        """This transport's bound wake-up socket of ``kind`` (made on its
        first wait), or None: unusable directory, or in use by another wait."""
        if self._waiters_pid != os.getpid():          # new, or forked: the parent's are not ours
            self._waiters, self._waiters_pid = {}, os.getpid()
        if kind not in self._waiters:
            self._waiters[kind] = self._channel().waiter(kind, self.driver)
        waiter = self._waiters[kind]
        if waiter is None or waiter.busy:
            return None
        waiter.busy = True
        return waiter

    def _run(self, fn: Any, *args: Any) -> Any:
        if self._db is None:
            self._db = Database(self.url, self.config.key_prefix)
            self._db.run(run_script, self._t, SCHEMA)
        return self._blocking(self._db.run, fn, *args)

    def _poll(self, fn: Any, timeout: float, kind: str) -> List[Document]:
        deadline = time.monotonic() + timeout
        waiter = self._take_waiter(kind) if timeout > 0 else None
        if waiter is not None:
            try:
                while True:
                    waiter.drain()       # before the read: a wake-up sent after it stays for the wait
                    found = self._run(fn)
                    left = deadline - time.monotonic()
                    if found or left <= 0:
                        return found
                    waiter.wait(min(FALLBACK, left))
            finally:
                waiter.busy = False
        while True:
            found = self._run(fn)
            if found or time.monotonic() >= deadline:
                return found
            self._sleep(min(POLL, max(0.0, deadline - time.monotonic())))

    # -- worker side -----------------------------------------------------------
    def listen(self, name: str) -> None:
        self._last_command = self._run(lambda c: c.execute(
            f"SELECT coalesce(max(id), 0) FROM {self._t.control_commands}").fetchone()[0])

    def receive(self, timeout: float) -> List[Any]:
        def read(conn: sqlite3.Connection) -> List[Any]:
            rows = conn.execute(f"SELECT id, body FROM {self._t.control_commands} WHERE id > ? ORDER BY id",
                                (self._last_command,)).fetchall()
            if rows:
                self._last_command = rows[-1][0]
            return [body for _, body in rows]
        return self._poll(read, timeout, "c")

    def where(self) -> str:
        return f"{self.url} table {self._t.control_commands}"

    def reply(self, reply_to: str, body: str) -> None:
        self._run(lambda c: c.execute(f"INSERT INTO {self._t.control_replies} (reply_to, created, body) "
                                      "VALUES (?, ?, ?)", (reply_to, time.time(), body)))
        self._notify("p")

    def send_events(self, body: str) -> None:
        now = time.time()
        clean = now >= self._next_clean
        if clean:
            self._next_clean = now + CLEAN_EVERY

        t = self._t

        def write(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                cur = conn.execute(f"INSERT INTO {t.control_events} (created, body) VALUES (?, ?)", (now, body))
                if clean:
                    assert cur.lastrowid is not None, "an INSERT sets it"
                    conn.execute(f"DELETE FROM {t.control_events} WHERE id <= ?", (cur.lastrowid - EVENTS_KEPT,))
                    conn.execute(f"DELETE FROM {t.control_commands} WHERE created < ?", (now - KEEP_SECONDS,))
                    conn.execute(f"DELETE FROM {t.control_replies} WHERE created < ?", (now - KEEP_SECONDS,))
        self._run(write)
        self._notify("e")

    # -- admin side ------------------------------------------------------------
    def broadcast(self, body: str) -> None:
        self._run(lambda c: c.execute(f"INSERT INTO {self._t.control_commands} (created, body) VALUES (?, ?)",
                                      (time.time(), body)))
        self._last_reply = 0
        self._notify("c")

    def replies(self, reply_to: str, timeout: float) -> List[Any]:
        def read(conn: sqlite3.Connection) -> List[Any]:
            rows = conn.execute(f"SELECT id, body FROM {self._t.control_replies} WHERE reply_to = ? AND id > ? "
                                "ORDER BY id", (reply_to, self._last_reply)).fetchall()
            if rows:
                self._last_reply = rows[-1][0]
            return [body for _, body in rows]
        return self._poll(read, timeout, "p")

    def subscribe(self, history: int = 0) -> None:
        last = self._run(lambda c: c.execute(f"SELECT coalesce(max(id), 0) FROM {self._t.control_events}")
                         .fetchone()[0])
        self._last_event = max(0, last - history)

    def events(self, timeout: float) -> List[Document]:
        def read(conn: sqlite3.Connection) -> List[Document]:
            rows = conn.execute(f"SELECT id, body FROM {self._t.control_events} WHERE id > ? ORDER BY id "
                                "LIMIT 1000", (self._last_event,)).fetchall()
            if rows:
                self._last_event = rows[-1][0]
            out: List[Document] = []
            for _, body in rows:
                out.extend(decode_batch(body))
            return out
        return self._poll(read, timeout, "e")

    def reset(self) -> None:
        waiters, self._waiters = self._waiters, {}
        if self._waiters_pid == os.getpid():
            for waiter in waiters.values():
                if waiter is not None:
                    waiter.close()
        db, self._db = self._db, None
        if db is not None:
            db.close()
