"""The scheduler's lease and its record of runs sent, kept in the broker
(greenq/beat.py).  Each implementation opens connections of its own:

* ``memory://`` -- in-process (schedulers in one process: users' tests);
* ``sqlite://`` -- tables ``beat_lease`` (name, holder, expires_at) and
  ``beat_runs`` (entry, slot) in the broker's file, changed in short
  ``BEGIN IMMEDIATE`` transactions;
* ``redis://`` -- ``P:beat:lease`` (the holder, ``SET NX PX``, renewed by a
  script only by its holder) and ``P:beat:runs`` (hash entry -> slot, written
  by a script only while the writer holds the lease);
* ``amqp://`` -- the lease is the exclusive queue ``P.beat.lock``: only
  one connection can hold it, and RabbitMQ deletes it when that connection
  dies (heartbeats of ``ttl / 2`` seconds find a dead holder within about
  ``ttl``).  Runs sent live in the durable queue ``P.beat.state`` as
  JSON messages that the holder takes unacknowledged; each change publishes
  a new one (confirmed) before acknowledging the old, so a holder dying
  leaves at least one behind and the next holder merges what it finds.

``acquire(holder)`` takes the lease when free or expired and renews it when
``holder`` has it; True while ``holder`` holds it.  ``record`` writes only
while the writer holds the lease (a fenced write) and says whether it did.
``P`` is ``[greenq] key_prefix`` (default ``greenq``).
"""
from __future__ import annotations

import json
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, Optional

from .brokers import scheme_of
from .drivers.base import UsesDriver
from .exceptions import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    from .app import GreenQ


class Lease(UsesDriver):
    """One named lease and the runs its holders sent."""

    def __init__(self, url: str, config: Any, ttl: float, driver: Any = None) -> None:
        self.url = url
        self.config = config
        self.ttl = ttl
        self.driver = driver

    def acquire(self, holder: str) -> bool:
        raise NotImplementedError

    def release(self, holder: str) -> None:
        raise NotImplementedError

    def last_runs(self) -> Dict[str, float]:
        raise NotImplementedError

    def record(self, holder: str, entry: str, slot: float) -> bool:
        raise NotImplementedError

    def close(self) -> None:
        """Release connections."""


# -- memory ------------------------------------------------------------------------
_MEMORY: Dict[str, Dict[str, Any]] = {}
_MEMORY_LOCK = threading.Lock()


class MemoryLease(Lease):
    def __init__(self, url: str, config: Any, ttl: float, driver: Any = None) -> None:
        super().__init__(url, config, ttl, driver)
        with _MEMORY_LOCK:
            self._state = _MEMORY.setdefault(url, {"holder": None, "until": 0.0, "runs": {}})

    def _holds(self, holder: str) -> bool:
        return self._state["holder"] == holder and self._state["until"] > time.monotonic()

    def acquire(self, holder: str) -> bool:
        with _MEMORY_LOCK:
            if self._holds(holder) or self._state["until"] <= time.monotonic():
                self._state.update(holder=holder, until=time.monotonic() + self.ttl)
                return True
            return False

    def release(self, holder: str) -> None:
        with _MEMORY_LOCK:
            if self._state["holder"] == holder:
                self._state.update(holder=None, until=0.0)

    def last_runs(self) -> Dict[str, float]:
        with _MEMORY_LOCK:
            return dict(self._state["runs"])

    def record(self, holder: str, entry: str, slot: float) -> bool:
        with _MEMORY_LOCK:
            if not self._holds(holder):
                return False
            self._state["runs"][entry] = slot
            return True


# -- sqlite --------------------------------------------------------------------------
SQLITE_SCHEMA = """
CREATE TABLE IF NOT EXISTS beat_lease (name TEXT PRIMARY KEY, holder TEXT NOT NULL,
                                       expires_at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS beat_runs (entry TEXT PRIMARY KEY, slot REAL NOT NULL) WITHOUT ROWID
"""


class SQLiteLease(Lease):
    NAME = "beat"

    def __init__(self, url: str, config: Any, ttl: float, driver: Any = None) -> None:
        super().__init__(url, config, ttl, driver)
        from .clients.sqlite import Database
        self._db = Database(url)
        self._ready = False

    def _run(self, fn: Any, *args: Any) -> Any:
        from .clients.sqlite import transaction

        def run(conn: Any) -> Any:
            with transaction(conn):
                if not self._ready:
                    for statement in SQLITE_SCHEMA.split(";"):
                        conn.execute(statement)
                    self._ready = True
                return fn(conn, *args)
        return self._blocking(self._db.run, run)

    @staticmethod
    def _holder(conn: Any, now: float) -> Optional[str]:
        row = conn.execute("SELECT holder FROM beat_lease WHERE name = ? AND expires_at > ?",
                           (SQLiteLease.NAME, now)).fetchone()
        return row[0] if row else None

    def acquire(self, holder: str) -> bool:
        def take(conn: Any) -> bool:
            now = time.time()
            current = self._holder(conn, now)
            if current not in (None, holder):
                return False
            conn.execute("INSERT OR REPLACE INTO beat_lease (name, holder, expires_at) VALUES (?, ?, ?)",
                         (self.NAME, holder, now + self.ttl))
            return True
        return self._run(take)

    def release(self, holder: str) -> None:
        self._run(lambda conn: conn.execute("DELETE FROM beat_lease WHERE name = ? AND holder = ?",
                                            (self.NAME, holder)))

    def last_runs(self) -> Dict[str, float]:
        return self._run(lambda conn: dict(conn.execute("SELECT entry, slot FROM beat_runs")))

    def record(self, holder: str, entry: str, slot: float) -> bool:
        def write(conn: Any) -> bool:
            if self._holder(conn, time.time()) != holder:
                return False
            conn.execute("INSERT OR REPLACE INTO beat_runs (entry, slot) VALUES (?, ?)", (entry, slot))
            return True
        return self._run(write)

    def close(self) -> None:
        self._db.close()


# -- redis ---------------------------------------------------------------------------
_REDIS_ACQUIRE = """
local current = redis.call('GET', KEYS[1])
if not current then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
if current == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""
_REDIS_RECORD = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
return 1
"""
_REDIS_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('DEL', KEYS[1]) end
return 1
"""


class RedisLease(Lease):
    def __init__(self, url: str, config: Any, ttl: float, driver: Any = None) -> None:
        super().__init__(url, config, ttl, driver)
        import redis
        timeout = config.section("redis")["socket_timeout"] or None
        self.client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout,
                                           socket_keepalive=True)
        prefix = config.key_prefix
        self.keys = [f"{prefix}:beat:lease", f"{prefix}:beat:runs"]
        self._acquire = self.client.register_script(_REDIS_ACQUIRE)
        self._record = self.client.register_script(_REDIS_RECORD)
        self._release = self.client.register_script(_REDIS_RELEASE)

    def acquire(self, holder: str) -> bool:
        return bool(self._acquire(keys=self.keys[:1], args=[holder, int(self.ttl * 1000)]))

    def release(self, holder: str) -> None:
        self._release(keys=self.keys[:1], args=[holder])

    def last_runs(self) -> Dict[str, float]:
        return {k.decode(): float(v) for k, v in self.client.hgetall(self.keys[1]).items()}

    def record(self, holder: str, entry: str, slot: float) -> bool:
        return bool(self._record(keys=self.keys, args=[holder, entry, repr(float(slot))]))

    def close(self) -> None:
        self.client.close()


# -- RabbitMQ --------------------------------------------------------------------------
class AMQPLease(Lease):
    """See the module docstring.  One connection, used by the scheduler's
    greenlet only."""

    def __init__(self, url: str, config: Any, ttl: float, driver: Any = None) -> None:
        super().__init__(url, config, ttl, driver)
        from .brokers.amqp_common import connection_params
        self.params = connection_params(url)
        self.lock_queue = f"{config.key_prefix}.beat.lock"
        self.state_queue = f"{config.key_prefix}.beat.state"
        self.conn: Any = None
        self.channel: Any = None
        self.held = False
        self._runs: Dict[str, float] = {}
        self._tags: list = []            # the state messages we hold unacknowledged

    def _connect(self) -> None:
        from .brokers.amqp_common import open_connection
        self.conn = open_connection(self.params, heartbeat=max(2, int(self.ttl / 2)), role="beat")
        self.channel = self.conn.channel()
        self.channel.confirm_select()
        self.channel.queue_declare(self.state_queue, durable=True, auto_delete=False)

    def _drop(self) -> None:
        from .brokers.amqp_common import close_quietly
        close_quietly(self.conn)
        self.conn = self.channel = None
        self.held = False
        self._tags = []

    def acquire(self, holder: str) -> bool:
        from .brokers.amqp_common import AMQP_ERRORS
        import amqp
        try:
            if self.conn is None:
                self._connect()
            if self.held:                               # still ours while the connection lives
                try:
                    self.conn.drain_events(timeout=0)
                except socket.timeout:
                    pass
                self.conn.heartbeat_tick()
                return True
            try:
                self.channel.queue_declare(self.lock_queue, exclusive=True, auto_delete=True)
            except amqp.exceptions.ResourceLocked:      # another scheduler's connection holds it
                self.channel = self.conn.channel()
                self.channel.confirm_select()
                return False
            self.held = True
            self._take_state()
            return True
        except (OSError,) + AMQP_ERRORS:
            self._drop()
            return False

    def _take_state(self) -> None:
        """Take every state message (left by the holders before us) and merge them."""
        runs: Dict[str, float] = {}
        while True:
            msg = self.channel.basic_get(self.state_queue, no_ack=False)
            if msg is None:
                break
            self._tags.append(msg.delivery_tag)
            try:
                for entry, slot in json.loads(msg.body).items():
                    runs[entry] = max(float(slot), runs.get(entry, float("-inf")))
            except (ValueError, AttributeError, TypeError):
                pass                                    # not ours: dropped at the next write
        self._runs = runs

    def release(self, holder: str) -> None:
        self._drop()

    def last_runs(self) -> Dict[str, float]:
        return dict(self._runs) if self.held else {}

    def record(self, holder: str, entry: str, slot: float) -> bool:
        from .brokers.amqp_common import AMQP_ERRORS
        import amqp
        if not self.held:
            return False
        runs = dict(self._runs, **{entry: slot})
        try:
            self.channel.basic_publish(amqp.Message(json.dumps(runs), delivery_mode=2),
                                       exchange="", routing_key=self.state_queue)
            old, self._tags = self._tags, []
            for tag in old:
                self.channel.basic_ack(tag)
            msg = self.channel.basic_get(self.state_queue, no_ack=False)
            while msg is not None:                      # our own new state: hold it
                self._tags.append(msg.delivery_tag)
                msg = self.channel.basic_get(self.state_queue, no_ack=False)
        except (OSError,) + AMQP_ERRORS:
            self._drop()
            return False
        self._runs = runs
        return True

    def close(self) -> None:
        self._drop()


LEASES = {"memory": MemoryLease, "sqlite": SQLiteLease, "redis": RedisLease, "rediss": RedisLease,
          "amqp": AMQPLease, "pyamqp": AMQPLease, "amqps": AMQPLease}


def make_lease(app: "GreenQ", ttl: float) -> Lease:
    """The lease in ``app``'s broker."""
    url = app.config.broker_url
    cls = LEASES.get(scheme_of(url))
    if cls is None:
        raise ConfigError(f"periodic tasks: no scheduler lease for broker {url.split(':', 1)[0]}://")
    return cls(url, app.config, ttl, app.driver)
