"""``sqlite:///relative/path.db`` and ``sqlite:////absolute/path.db``: the embedded
default broker.  One machine, durable, no server.  docs/brokers.md (SQLite)
explains the delivery semantics.

Schema (created on first use; ``PRAGMA user_version`` = 2).  These are the
table names of the default ``key_prefix`` (``greenq``); under any other prefix
P each table ``t`` is ``P_t`` (``clients.sqlite.Tables``), so apps sharing a
file never share a table::

    messages      one row per message until it is acknowledged
      id          INTEGER PRIMARY KEY AUTOINCREMENT   the delivery token, never reused
      queue       TEXT                                queue name
      priority    INTEGER                             0-9, higher is fetched first
      visible_at  REAL      epoch seconds from which the row may be fetched: the publish
                            time, the eta of a delayed message, or the lease end of a
                            held one (0 after a requeue: front of its priority)
      claimed_by  TEXT      consumer holding it; NULL = never fetched or requeued.
                            Held = claimed_by set and visible_at in the future.
      deliveries  INTEGER   hand-outs so far
      message_id  TEXT, body BLOB
      INDEX messages_fetch (queue, priority, visible_at)

    queues        (name) every queue ever published to or declared
    dead_letters  (id, queue, priority, message_id, body, reason, failed_at)
    results       (task_id, data, final, expires_at)     greenq.transports.sqlite.results
    revocations   (task_id, terminate, expires_at, revoked_at)  greenq.transports.sqlite.results

Fetching is one short ``BEGIN IMMEDIATE`` transaction: select up to ``count``
rows with ``visible_at <= now`` (one index range per queue and priority, so
held and delayed rows are never scanned), then set ``claimed_by``,
``visible_at = now + lease_seconds`` and ``deliveries + 1`` on all of them.
Due delayed messages and expired leases need no mover: the WHERE clause finds
them.  SQLite cannot block, so an empty fetch waits for a wake-up
(``wakeup.py``): a publish or requeue sends a datagram to the sockets of the
fetches waiting on the file (``<file>.wake/``), naming its queues.  Without
one a fetch reads again after ``wakeup.FALLBACK`` (1 s), or when the next
delayed message of its queues is due, whichever is first.  Where the wake-up
directory cannot be used (read-only), and for a second fetch waiting at the
same time in one broker, an empty fetch polls with a sleep growing from 5 ms
to 100 ms, through the driver so the hub keeps running.

Every database call runs through ``Broker._blocking`` (a real thread under
gevent and eventlet).  Connections are pooled rather than kept per thread: a
connection is taken by whichever OS thread runs the call and given back after,
so no connection is used by two threads at once, and nothing depends on
``threading.local`` or thread idents, which are per greenlet once patched.
"""
from __future__ import annotations

import collections
import contextlib
import logging
import os
import socket
import sqlite3
import time
import uuid
from typing import Any, Callable, Collection, Deque, Dict, Iterator, List, Optional, Sequence, Tuple

from .client import Database, Tables, chunks, placeholders, transaction
from .wakeup import FALLBACK, Channel, Waiter, queues_payload, relevant
from ...brokers.base import (PREVIEW_BYTES, Broker, DeadLetter, Delivery, Outgoing, QueueStats, body_limit,
                   oversize_reason)

log = logging.getLogger("greenq.transports.sqlite.broker")

POLL_MIN, POLL_MAX = 0.005, 0.1   # an empty fetch polls with a sleep growing between these


def _arms(columns: str, limit: str) -> str:
    """One index range per priority, highest first, each in visible_at order."""
    arms = [f"SELECT * FROM (SELECT {columns} FROM {{messages}} WHERE queue = :queue AND priority = {p} "
            f"AND visible_at <= :now ORDER BY visible_at, id LIMIT {limit})" for p in range(9, -1, -1)]
    return f"SELECT * FROM ({' UNION ALL '.join(arms)}) LIMIT {limit}"


# (SQL templates: ``Tables.sql`` fills in the table names of the key_prefix)
FETCH_SQL = _arms("id, priority, deliveries, message_id, length(body)", ":count")
PEEK_SQL = _arms("id", "1")
#: the earliest visible_at after now of one queue: one index seek per priority
DUE_SQL = ("SELECT MIN(v) FROM (" + " UNION ALL ".join(
    f"SELECT MIN(visible_at) AS v FROM {{messages}} WHERE queue = :queue AND priority = {p} AND visible_at > :now"
    for p in range(10)) + ")")


SWEEP_INTERVAL = 10.0     # seconds between sweeps for rows the fetch cannot select
SWEEP_SQL = ("SELECT id, priority, visible_at FROM {messages} WHERE queue = ? AND claimed_by IS NULL AND "
             "(typeof(priority) != 'integer' OR priority NOT BETWEEN 0 AND 9 "
             "OR typeof(visible_at) NOT IN ('integer', 'real'))")


@contextlib.contextmanager
def unflushed(conn: sqlite3.Connection, synchronous: str) -> Iterator[None]:
    """Commits inside do not wait for the disk (``synchronous=normal`` for
    them, on a ``full`` file): claims and acks.  A power loss may undo the
    last ones, which hands those messages out again: what at-least-once
    delivery allows (a claim lost that way is a lease ended early, by a
    crash that took its holder too).  In WAL mode the next flushed commit
    (a publish, a result) makes them durable as well.  Set outside a
    transaction: SQLite refuses to change it inside one."""
    if synchronous != "full":
        yield
        return
    conn.execute("PRAGMA synchronous=normal")
    try:
        yield
    finally:
        conn.execute("PRAGMA synchronous=full")


def _delivery(queue: str, row_id: int, priority: Any, deliveries: Any, message_id: Any,
              body: Any) -> Delivery:
    """A fetched row as a Delivery; a column of the wrong type (written by
    something other than greenq) sets ``error`` so the worker dead-letters it."""
    error = None
    if not isinstance(message_id, str):
        error = f"column message_id is {type(message_id).__name__}, not text"
        message_id = repr(message_id)[:100]
    if not isinstance(body, (bytes, str)):
        error = f"column body is {type(body).__name__}, not a blob"
        body = b""
    if type(deliveries) is not int or deliveries < 0:
        error = f"column deliveries {deliveries!r:.40} is not a count"
        deliveries = 0
    return Delivery(queue, body, message_id, deliveries + 1, row_id, priority, error)


def _preview(conn: sqlite3.Connection, table: str, row_id: int) -> bytes:
    """The first PREVIEW_BYTES of a row's body in ``table`` (unquoted), read
    through SQLite's blob handle: only the pages holding them are read
    (``substr`` would load the whole body first)."""
    with conn.blobopen(table, "body", row_id, readonly=True) as blob:
        return blob.read(PREVIEW_BYTES)


#: one statement and the parameter rows it runs with (``executemany``; rows
#: whose order does not matter come as a set)
SQLCall = Tuple[str, Collection[Tuple[Any, ...]]]


def publish_calls(messages: Sequence[Outgoing], tables: Tables, now: float) -> List[SQLCall]:
    """The statements that write ``messages``, run in one transaction: register
    their queues, insert their rows.  A message is visible from its eta when
    that is after ``now``, else from ``now``.  No I/O: ``publish_many`` runs them."""
    rows = [(m.queue, min(9, max(0, int(m.priority))), m.eta if m.eta and m.eta > now else now,
             m.message_id, m.body) for m in messages]
    return [(f"INSERT OR IGNORE INTO {tables.queues} (name) VALUES (?)", {(m.queue,) for m in messages}),
            (f"INSERT INTO {tables.messages} (queue, priority, visible_at, message_id, body) "
             "VALUES (?, ?, ?, ?, ?)", rows)]


class SQLiteBroker(Broker):
    """Messages in one SQLite file, shared by every process on the machine."""


    def __init__(self, url: str, config, driver=None) -> None:
        super().__init__(url, config, driver)
        self._db = Database(url, config.key_prefix)
        #: (message id, reason) of rows dead-lettered inside a database call, logged by the caller
        #: after it: the call may run in another OS thread (patched), where a green lock such as a
        #: logging handler's cannot be waited for (eventlet: "Cannot switch to a different thread")
        self._said: Deque[Tuple[Any, str]] = collections.deque()
        t = self._t = self._db.tables
        self._fetch_sql, self._peek_sql, self._sweep_sql = t.sql(FETCH_SQL), t.sql(PEEK_SQL), t.sql(SWEEP_SQL)
        self._due_sql = t.sql(DUE_SQL)
        self._consumer = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._interrupted = False
        self._next_sweep = 0.0
        self._wake = Channel(self._db.path, config.key_prefix)
        self._waiter: Optional[Waiter] = None
        self._waiter_tried = 0     # the pid that tried to bind a waiter (0: none yet)

    def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            out = self._blocking(self._db.run, fn, *args)
        except BaseException:
            self._said.clear()             # rolled back: nothing was dead-lettered
            raise
        while self._said:
            message_id, reason = self._said.popleft()
            log.warning("message %s dead-lettered: %s", message_id, reason)
        return out

    # -- publishing ----------------------------------------------------------
    def publish_many(self, messages: Sequence[Outgoing]) -> None:
        if not messages:
            return
        self._run(self._write, publish_calls(messages, self._t, time.time()))
        self._wake.notify("m", queues_payload([m.queue for m in messages]))

    def _write(self, conn: sqlite3.Connection, calls: List[SQLCall]) -> None:
        with transaction(conn):
            for sql, rows in calls:
                conn.executemany(sql, rows)

    # -- consuming -----------------------------------------------------------
    def declare(self, queues: Sequence[str]) -> None:
        def insert(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.executemany(f"INSERT OR IGNORE INTO {self._t.queues} (name) VALUES (?)",
                                 [(q,) for q in queues])
        self._run(insert)

    def fetch(self, queues: Sequence[str], count: int, timeout: float, max_bytes: int = 0) -> List[Delivery]:
        deadline = time.monotonic() + timeout
        queues = list(queues)
        waiter = self._take_waiter() if timeout > 0 else None
        if waiter is None:
            return self._fetch_polling(queues, count, deadline, max_bytes)
        try:
            while True:
                waiter.drain()           # before the read: a wake-up sent after it stays for the wait
                out, due = self._run(self._claim_or_due, queues, count, max_bytes)
                if self._ends(out, queues):
                    return out
                now = time.monotonic()
                if now >= deadline:
                    return []
                until = min(deadline, now + FALLBACK)
                if due is not None:
                    until = min(until, now + max(0.0, due - time.time()))
                while True:
                    left = until - time.monotonic()
                    if left <= 0 or not waiter.wait(left):
                        break
                    if relevant(waiter.drain(), queues) or self._interrupted:
                        break
        finally:
            waiter.busy = False

    def _ends(self, out: List[Delivery], queues: List[str]) -> bool:
        """After a claim: sweep when nothing came and a sweep is due; True when
        the fetch returns now (something came, or ``interrupt`` was called)."""
        if not out and time.monotonic() >= self._next_sweep:
            self._next_sweep = time.monotonic() + SWEEP_INTERVAL
            self._run(self._sweep, queues)
        if out or self._interrupted:
            self._interrupted = False
            return True
        return False

    def _take_waiter(self) -> Optional[Waiter]:
        """This broker's bound wake-up socket, made on the first fetch (per
        process), or None: unusable directory, or another fetch of this
        broker is waiting on it (this one polls)."""
        if self._waiter is not None and self._waiter.pid != os.getpid():
            self._waiter = None          # forked: the parent's socket is not ours
        if self._waiter is None and self._waiter_tried != os.getpid():
            self._waiter_tried = os.getpid()
            self._waiter = self._wake.waiter("m", self.driver)
        waiter = self._waiter
        if waiter is None or waiter.busy:
            return None
        waiter.busy = True
        return waiter

    def _fetch_polling(self, queues: List[str], count: int, deadline: float, max_bytes: int) -> List[Delivery]:
        delay = POLL_MIN
        while True:
            out = self._run(self._claim, queues, count, max_bytes) if count > 0 else []
            if self._ends(out, queues):
                return out
            left = deadline - time.monotonic()
            if left <= 0:
                return []
            self._sleep(min(delay, left))
            delay = min(delay * 1.5, POLL_MAX)

    def _claim_or_due(self, conn: sqlite3.Connection, queues: List[str], count: int,
                      max_bytes: int) -> Tuple[List[Delivery], Optional[float]]:
        """``_claim``; when it finds nothing, also the earliest time a row of
        ``queues`` becomes visible (a delayed message, a lease's end), or None."""
        out = self._claim(conn, queues, count, max_bytes) if count > 0 else []
        if out:
            return out, None
        now = time.time()
        due = [conn.execute(self._due_sql, {"queue": q, "now": now}).fetchone()[0] for q in queues]
        times = [d for d in due if isinstance(d, (int, float))]
        return out, min(times) if times else None

    def _claim(self, conn: sqlite3.Connection, queues: List[str], count: int,
               max_bytes: int = 0) -> List[Delivery]:
        """Lease up to ``count`` rows, at most ``max_bytes`` of bodies (0: no
        limit; at least one row): their lengths are read first (SQLite keeps
        a blob's length in the record header), then only the chosen bodies.
        A row over ``body_limit`` is dead-lettered here, in the same
        transaction, with its preview (``_preview``): leasing it would make
        SQLite rewrite the whole row, body included, in memory."""
        limit = body_limit(self.config)
        t = self._t
        now = time.time()
        wanted = [q for q in queues if conn.execute(self._peek_sql, {"queue": q, "now": now}).fetchone()]
        if not wanted:
            return []
        with unflushed(conn, self._db.synchronous), transaction(conn):
            now = time.time()
            chosen: List[Tuple[str, Any]] = []        # (queue, row with the body's length), within max_bytes
            spent, full = 0, False
            for queue in wanted:
                if full or len(chosen) >= count:
                    break
                for row in conn.execute(self._fetch_sql, {"queue": queue, "now": now,
                                                    "count": count - len(chosen)}).fetchall():
                    size = row[4] if type(row[4]) is int else 0
                    cost = 0 if size > limit else size      # an oversized row is not handed out
                    if max_bytes and chosen and spent + cost > max_bytes:
                        full = True
                        break
                    spent += cost
                    chosen.append((queue, row))
            over = {row[0]: row for _, row in chosen if type(row[4]) is int and row[4] > limit}
            for row_id, _, _, message_id, size in over.values():
                self._dead_letter_oversized(conn, row_id, message_id, size, now)
            ids = [row[0] for _, row in chosen if row[0] not in over]
            bodies: Dict[int, bytes] = {}
            for chunk in chunks(ids):
                bodies.update(conn.execute(f"SELECT id, body FROM {t.messages} "
                                           f"WHERE id IN ({placeholders(len(chunk))})", chunk))
            out = [_delivery(queue, row[0], row[1], row[2], row[3], bodies[row[0]]) for queue, row in chosen if row[0] in bodies]
            for chunk in chunks(ids):
                conn.execute(f"UPDATE {t.messages} SET claimed_by = ?, visible_at = ?, "
                             f"deliveries = deliveries + 1 WHERE id IN ({placeholders(len(chunk))})",
                             (self._consumer, now + self.config.lease_seconds, *chunk))
        return out

    def _dead_letter_oversized(self, conn: sqlite3.Connection, row_id: int, message_id: Any, size: int,
                               now: float) -> None:
        """Move a row whose body is over ``body_limit`` to the dead letters
        with its preview and the reason (inside the caller's transaction)."""
        t = self._t
        preview = _preview(conn, t.raw("messages"), row_id)
        reason = oversize_reason(size, self.config.max_message_size, len(preview))
        conn.execute(f"INSERT INTO {t.dead_letters} (queue, priority, message_id, body, reason, failed_at) "
                     f"SELECT queue, priority, CAST(message_id AS TEXT), ?, ?, ? FROM {t.messages} WHERE id = ?",
                     (preview, reason, now, row_id))
        conn.execute(f"DELETE FROM {t.messages} WHERE id = ?", (row_id,))
        self._said.append((message_id, reason))      # logged by _run, in the caller's thread

    def _sweep(self, conn: sqlite3.Connection, queues: List[str]) -> None:
        """Dead-letter rows of ``queues`` that the fetch can never select (a
        priority outside 0-9 or a visible_at that is not a number, written by
        something other than greenq): otherwise they would wait forever."""
        t = self._t
        with transaction(conn):
            for queue in queues:
                for row_id, priority, visible_at in conn.execute(self._sweep_sql, (queue,)).fetchall():
                    reason = (f"bad transport metadata: column priority {priority!r:.40} is not 0-9"
                              if not (type(priority) is int and 0 <= priority <= 9) else
                              f"bad transport metadata: column visible_at {visible_at!r:.40} is not a number")
                    conn.execute(f"INSERT INTO {t.dead_letters} (queue, priority, message_id, body, reason, "
                                 f"failed_at) SELECT queue, 0, CAST(message_id AS TEXT), body, ?, ? "
                                 f"FROM {t.messages} WHERE id = ?", (reason, time.time(), row_id))
                    conn.execute(f"DELETE FROM {t.messages} WHERE id = ?", (row_id,))

    def interrupt(self) -> None:
        self._interrupted = True
        waiter = self._waiter
        if waiter is not None and waiter.pid == os.getpid():
            waiter.poke()

    def _update_held(self, sql: str, first: Sequence[Any], deliveries: Sequence[Delivery]) -> None:
        """Run ``sql ... WHERE claimed_by = me AND id IN (...)`` over every delivery in one transaction."""
        ids = [d.token for d in deliveries]
        if not ids:
            return

        def update(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                for chunk in chunks(ids):
                    conn.execute(f"{sql} WHERE claimed_by = ? AND id IN ({placeholders(len(chunk))})",
                                 (*first, self._consumer, *chunk))
        self._run(update)

    def ack(self, deliveries: Sequence[Delivery]) -> None:
        ids = [d.token for d in deliveries]
        if not ids:
            return

        def delete(conn: sqlite3.Connection) -> None:
            with unflushed(conn, self._db.synchronous), transaction(conn):
                for chunk in chunks(ids):
                    conn.execute(f"DELETE FROM {self._t.messages} WHERE id IN ({placeholders(len(chunk))})", chunk)
        self._run(delete)

    def requeue(self, deliveries: Sequence[Delivery], started: bool = True) -> None:
        sql = f"UPDATE {self._t.messages} SET claimed_by = NULL, visible_at = 0"
        if not started:   # never began: this hand-out does not count
            sql += ", deliveries = MAX(deliveries - 1, 0)"
        self._update_held(sql, (), deliveries)
        if deliveries:
            self._wake.notify("m", queues_payload([d.queue for d in deliveries]))

    def renew(self, deliveries: Sequence[Delivery]) -> None:
        self._update_held(f"UPDATE {self._t.messages} SET visible_at = ?",
                          (time.time() + self.config.lease_seconds,), deliveries)

    def dead_letter(self, delivery: Delivery, reason: str) -> None:
        t = self._t

        def move(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                conn.execute(f"INSERT INTO {t.dead_letters} (queue, priority, message_id, body, reason, "
                             "failed_at) SELECT queue, priority, CAST(message_id AS TEXT), body, ?, ? "
                             f"FROM {t.messages} WHERE id = ?", (reason, time.time(), delivery.token))
                conn.execute(f"DELETE FROM {t.messages} WHERE id = ?", (delivery.token,))
        self._run(move)

    def next_due(self, queues: Sequence[str]) -> Optional[float]:
        queues = list(queues)

        def query(conn: sqlite3.Connection) -> Optional[float]:
            sql = (f"SELECT MIN(visible_at) FROM {self._t.messages} WHERE queue IN ({placeholders(len(queues))}) "
                   f"AND claimed_by IS NULL AND visible_at > ? AND typeof(visible_at) IN ('integer', 'real')")
            return conn.execute(sql, (*queues, time.time())).fetchone()[0]
        return self._run(query) if queues else None

    # -- administration ------------------------------------------------------
    def queue_stats(self, queues: Optional[Sequence[str]] = None) -> List[QueueStats]:
        t = self._t

        def query(conn: sqlite3.Connection) -> List[QueueStats]:
            names = list(queues) if queues is not None else [
                r[0] for r in conn.execute(f"SELECT name FROM {t.queues} UNION SELECT queue FROM {t.dead_letters} "
                                           "ORDER BY 1")]
            stats = {name: QueueStats(name) for name in names}
            now = time.time()
            # the oldest ready row by visible_at (a requeued row's 0 says nothing of when: left out)
            rows = conn.execute(
                "SELECT queue, SUM(visible_at <= :now), SUM(visible_at > :now AND claimed_by IS NULL), "
                "SUM(visible_at > :now AND claimed_by IS NOT NULL), "
                f"MIN(CASE WHEN visible_at <= :now AND visible_at > 0 THEN visible_at END) FROM {t.messages} "
                "GROUP BY queue", {"now": now})
            for name, ready, delayed, held, since in rows:
                if name in stats:
                    stats[name].ready, stats[name].delayed, stats[name].held = ready, delayed, held
                    if ready and isinstance(since, (int, float)):
                        stats[name].oldest_ready_age = max(0.0, now - since)
            for row in stats.values():
                if not row.ready:
                    row.oldest_ready_age = 0.0
            for name, dead in conn.execute(f"SELECT queue, COUNT(*) FROM {t.dead_letters} GROUP BY queue"):
                if name in stats:
                    stats[name].dead = dead
            return [stats[name] for name in names]
        return self._run(query)

    def purge(self, queue: str) -> int:
        def delete(conn: sqlite3.Connection) -> int:
            with transaction(conn):
                return conn.execute(f"DELETE FROM {self._t.messages} WHERE queue = ? AND "
                                    "(claimed_by IS NULL OR visible_at <= ?)", (queue, time.time())).rowcount
        return self._run(delete)

    @staticmethod
    def _dead(row: tuple) -> DeadLetter:
        dead_id, queue, body, reason, message_id, failed_at = row
        if isinstance(body, str):
            body = body.encode()
        return DeadLetter(str(dead_id), str(queue), bytes(body or b""), str(reason), str(message_id or ""),
                          failed_at if isinstance(failed_at, (int, float)) else 0.0)

    def dlq_list(self, limit: int = 100, preview: Optional[int] = None) -> List[DeadLetter]:
        body = "body" if preview is None else f"substr(body, 1, {int(preview)})"

        def query(conn: sqlite3.Connection) -> List[DeadLetter]:
            return [self._dead(r) for r in conn.execute(
                f"SELECT id, queue, {body}, reason, message_id, failed_at FROM {self._t.dead_letters} "
                "ORDER BY id LIMIT ?", (limit,))]
        return self._run(query)

    def dlq_get(self, dead_id: str) -> Optional[DeadLetter]:
        try:
            key = int(dead_id)
        except (TypeError, ValueError):
            return None

        def query(conn: sqlite3.Connection) -> Optional[DeadLetter]:
            row = conn.execute("SELECT id, queue, body, reason, message_id, failed_at "
                               f"FROM {self._t.dead_letters} WHERE id = ?", (key,)).fetchone()
            return self._dead(row) if row else None
        return self._run(query)

    def dlq_requeue(self, dead_ids: Optional[Sequence[str]] = None) -> int:
        if dead_ids is not None:
            keys = [int(i) for i in dead_ids if str(i).isdigit()]
            where = [(f"WHERE id IN ({placeholders(len(chunk))})", chunk) for chunk in chunks(keys)]
        else:
            where = [("", ())]

        t = self._t

        def move(conn: sqlite3.Connection) -> int:
            moved = 0
            with transaction(conn):
                for clause, params in where:
                    moved += conn.execute(
                        f"INSERT INTO {t.messages} (queue, priority, visible_at, message_id, body) "
                        f"SELECT queue, priority, ?, message_id, body FROM {t.dead_letters} {clause} ORDER BY id",
                        (time.time(), *params)).rowcount
                    conn.execute(f"DELETE FROM {t.dead_letters} {clause}", params)
            return moved
        moved = self._run(move)
        if moved:
            self._wake.notify("m")
        return moved

    def dlq_purge(self) -> int:
        def delete(conn: sqlite3.Connection) -> int:
            with transaction(conn):
                return conn.execute(f"DELETE FROM {self._t.dead_letters}").rowcount
        return self._run(delete)

    def close(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None:
            waiter.close()
        self._db.close()
