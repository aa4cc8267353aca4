"""The SQLite file shared by the SQLite broker and result backend: its schema
(documented in greenq/transports/sqlite/broker.py), the names of its tables for a
``key_prefix`` (``Tables``), a pool of connections each used by one thread at
a time, and small SQL helpers.  Neither the broker nor the backend imports
the other."""
from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from typing import Any, Callable, Iterator, List, Sequence
from urllib.parse import parse_qs, urlsplit

from ...config import mask_url
from ...exceptions import BrokerError, ConfigError

SCHEMA_VERSION = 2         # 2: revocations.revoked_at
#: (table names in braces: ``Tables.sql`` fills in the key_prefix's)
SCHEMA = """
CREATE TABLE IF NOT EXISTS {messages} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    visible_at REAL NOT NULL,
    claimed_by TEXT,
    deliveries INTEGER NOT NULL DEFAULT 0,
    message_id TEXT NOT NULL,
    body BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS {messages_fetch} ON {messages} (queue, priority, visible_at);
CREATE TABLE IF NOT EXISTS {queues} (name TEXT PRIMARY KEY) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS {dead_letters} (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    priority INTEGER NOT NULL DEFAULT 0,
    message_id TEXT NOT NULL,
    body BLOB NOT NULL,
    reason TEXT NOT NULL,
    failed_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS {results} (
    task_id TEXT PRIMARY KEY,
    data BLOB NOT NULL,
    final INTEGER NOT NULL,
    expires_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS {revocations} (
    task_id TEXT PRIMARY KEY,
    terminate INTEGER NOT NULL,
    expires_at REAL NOT NULL,
    revoked_at REAL NOT NULL DEFAULT 0
);
"""
#: what a file of an older version needs beyond ``SCHEMA`` (its tables exist
#: already).  Such a file was written by a greenq that named tables after no
#: key_prefix: these statements are for the default prefix's (unprefixed) tables.
UPGRADES = {1: ["ALTER TABLE revocations ADD COLUMN revoked_at REAL NOT NULL DEFAULT 0"]}

BUSY_TIMEOUT = 15.0       # seconds a writer waits for the database lock
CHUNK = 500               # ids per IN (...) list, under SQLite's variable limit
SYNCHRONOUS = ("full", "normal", "off")


DEFAULT_PREFIX = "greenq"
#: every table and index greenq makes in a SQLite file (brokers, backends,
#: control, leases): ``Tables`` names no other
TABLE_NAMES = frozenset((
    "messages", "messages_fetch", "queues", "dead_letters", "results", "revocations",
    "group_records", "chord_members", "chord_state",
    "control_commands", "control_replies", "control_replies_to", "control_events",
    "beat_lease", "beat_runs", "leases", "set_members", "records"))


class Tables:
    """The names of greenq's tables for one ``key_prefix`` P, so that apps
    sharing a file never share a table: the default prefix ``greenq`` keeps
    the plain names (files made before prefixes existed), any other P names
    table ``t`` ``P_t``.  ``tables.messages`` (or ``tables["messages"]``) is
    the quoted identifier (``config.validate`` keeps P to letters, digits and
    ``_-.:``), ``raw`` the bare name, ``sql`` fills the ``{table}`` fields of
    an SQL template."""

    messages: str
    messages_fetch: str
    queues: str
    dead_letters: str
    results: str
    revocations: str
    group_records: str
    chord_members: str
    chord_state: str
    control_commands: str
    control_replies: str
    control_replies_to: str
    control_events: str
    beat_lease: str
    beat_runs: str
    leases: str
    set_members: str
    records: str

    def __init__(self, prefix: str = DEFAULT_PREFIX) -> None:
        self.prefix = prefix
        for table in TABLE_NAMES:
            setattr(self, table, '"' + self.raw(table).replace('"', '""') + '"')

    def raw(self, table: str) -> str:
        if table not in TABLE_NAMES:
            raise KeyError(f"greenq has no SQLite table {table!r}")
        return table if self.prefix == DEFAULT_PREFIX else f"{self.prefix}_{table}"

    def __getitem__(self, table: str) -> str:
        self.raw(table)   # a KeyError for a name that is not greenq's
        return getattr(self, table)

    def sql(self, template: str) -> str:
        return template.format_map(self)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "replace")


def chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for i in range(0, len(items), CHUNK):
        yield items[i:i + CHUNK]


def placeholders(n: int) -> str:
    return ",".join("?" * n)


class Database:
    """A SQLite file with a pool of connections, each used by one thread at a time.

    ``run(fn, *args)`` calls ``fn(conn, *args)`` with a connection taken from
    the pool (list ``pop``/``append`` are atomic, so no lock is needed whatever
    the driver); sqlite3 errors become :class:`BrokerError`.
    """

    def __init__(self, url: str, prefix: str = DEFAULT_PREFIX) -> None:
        self.tables = Tables(prefix)
        parts = urlsplit(url)
        path = parts.path[1:] if parts.path.startswith("/") else parts.path
        if parts.netloc or not path or path == ":memory:":
            raise ConfigError(f"sqlite URL {mask_url(url)!r}: expected sqlite:///relative/path.db or "
                              f"sqlite:////absolute/path.db (use memory:// for an in-process broker)")
        options = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        self.synchronous = options.pop("synchronous", "full").lower()
        if self.synchronous not in SYNCHRONOUS or options:
            raise ConfigError(f"sqlite URL {mask_url(url)!r}: the only option is "
                              f"synchronous={'|'.join(SYNCHRONOUS)}")
        self.path = os.path.abspath(path)
        self._idle: List[sqlite3.Connection] = []
        self._schema_ready = False
        self._closed = False

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT, isolation_level=None,
                               check_same_thread=False, cached_statements=64)
        conn.text_factory = _text   # TEXT that is not UTF-8 (a raw write) must not fail a whole fetch
        _wal(conn)
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        if not self._schema_ready:
            self._make_schema(conn)
            self._schema_ready = True
        return conn

    def _make_schema(self, conn: sqlite3.Connection) -> None:
        """Create this prefix's tables when missing, and upgrade a file of an
        older schema version (``PRAGMA user_version``, one per file)."""
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise BrokerError(f"{self.path} has greenq schema version {version}; this greenq knows "
                              f"{SCHEMA_VERSION}: upgrade greenq")
        if version == SCHEMA_VERSION and _exists(conn, self.tables.raw("revocations")):
            return
        with transaction(conn):
            version = conn.execute("PRAGMA user_version").fetchone()[0]   # again, under the lock
            for statement in self.tables.sql(SCHEMA).split(";"):
                if statement.strip():
                    conn.execute(statement)
            for older in range(version, SCHEMA_VERSION) if version else ():
                for statement in UPGRADES.get(older, ()):
                    conn.execute(statement)
            if version < SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

    def run(self, fn: Callable[..., Any], *args: Any) -> Any:
        if self._closed:
            raise BrokerError(f"sqlite database {self.path} is closed")
        try:
            conn = self._idle.pop()
        except IndexError:
            conn = None
        try:
            if conn is None:
                conn = self._connect()
            return fn(conn, *args)
        except sqlite3.Error as exc:
            raise BrokerError(f"sqlite {self.path}: {exc}") from exc
        finally:
            if conn is not None:
                if self._closed:
                    conn.close()
                else:
                    self._idle.append(conn)

    def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()


def _exists(conn: sqlite3.Connection, table: str) -> bool:
    return conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
                        (table,)).fetchone() is not None


def run_script(conn: sqlite3.Connection, tables: Tables, script: str) -> None:
    """Run the ``;``-separated statements of ``script`` (with ``{table}``
    fields) in one write transaction: how each part makes its tables."""
    with transaction(conn):
        for statement in tables.sql(script).split(";"):
            if statement.strip():
                conn.execute(statement)


def _wal(conn: sqlite3.Connection) -> None:
    """Put the file in WAL mode (persistent: later connections find it set).
    Switching needs a moment alone with the file, and SQLite does not wait
    for that: processes opening a new file together retry instead of failing."""
    deadline = time.monotonic() + BUSY_TIMEOUT
    while True:
        try:
            if conn.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                conn.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction: takes the database lock at once (waiting up to BUSY_TIMEOUT)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # never give a connection back to the pool mid-transaction
            conn.execute("ROLLBACK")
        raise


