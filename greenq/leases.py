"""The scheduler's lease and its record of runs sent, kept in the broker
(greenq/beat.py).  Each implementation opens connections of its own:

* ``memory://`` -- in-process (schedulers in one process: users' tests);
* ``sqlite://`` -- tables ``beat_lease`` (name, holder, expires_at) and
  ``beat_runs`` (entry, slot) in the broker's file (``P_beat_lease``...
  under a key_prefix P other than ``greenq``), changed in short
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

What is read back is checked, never trusted: a lease whose expiry lies more
than its duration (plus ``CLOCK_SLACK``) ahead -- written by a scheduler whose
clock was fast, or by hand without an expiry -- counts as expired; a last-run
value that is not finite epoch seconds is logged and counts as absent for
that entry alone.  With ``signing_key``, each last-run record is signed
(``greenq.signing.Signer``, domain ``schedule``, bound to its entry's name)
and a record unsigned or forged is logged and ignored.
"""
from __future__ import annotations

import json
import logging
import socket
import threading
import time
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple

from . import validation
from .brokers import scheme_of
from .drivers.base import UsesDriver
from .exceptions import ConfigError, MessageError
from .signing import Signer

if TYPE_CHECKING:  # pragma: no cover
    from .app import GreenQ

log = logging.getLogger("greenq.beat")

#: seconds by which a lease's expiry may exceed ``now + ttl`` (clocks of two
#: schedulers a little apart) before the lease counts as implausible
CLOCK_SLACK = 1.0
#: the signing domain of scheduler records
DOMAIN = "schedule"


def check_slot(entry: str, value: Any) -> Optional[float]:
    """``value`` as a slot (finite epoch seconds), or None, logged, when it
    is anything else: one garbage record never stops the other entries."""
    try:
        number = float(value)
        return validation.epoch("slot", number)
    except (TypeError, ValueError, OverflowError) as exc:
        log.warning("scheduler: last-run record of %r is not a time (%s): ignored", entry, exc)
        return None


def encode_slot(signer: Signer, entry: str, slot: float) -> bytes:
    """The stored form of a last-run record: the slot's text; signed (and
    bound to ``entry``, so it cannot be copied onto another entry) with a key."""
    text = repr(float(slot)).encode()
    return signer.wrap(DOMAIN, entry.encode() + b"\0" + text) if signer else text


def decode_slot(signer: Signer, entry: str, raw: Any) -> Optional[float]:
    """The slot of a stored last-run record, or None (logged) when it is
    garbage, unsigned or forged (with a key), or signed for another entry."""
    data = raw if isinstance(raw, bytes) else str(raw).encode("utf-8", "replace")
    try:
        payload = signer.unwrap(DOMAIN, data, f"last-run record of {entry!r}")
    except MessageError as exc:
        log.warning("scheduler: %s: ignored", exc)
        return None
    owner, sep, text = payload.rpartition(b"\0")
    if sep and owner != entry.encode():
        log.warning("scheduler: last-run record of %r is signed for another entry: ignored", entry)
        return None
    return check_slot(entry, text.decode("ascii", "replace"))


def entry_name(raw: Any) -> Optional[str]:
    """A stored entry name as text; None (logged) when it is not UTF-8."""
    if isinstance(raw, str):
        return raw
    try:
        return bytes(raw).decode("utf-8")
    except (UnicodeDecodeError, TypeError, ValueError):
        log.warning("scheduler: a last-run record names no entry (%r): ignored", raw)
        return None


class Lease(UsesDriver):
    """One named lease and the runs its holders sent."""

    def __init__(self, url: str, config: Any, ttl: float, driver: Any = None) -> None:
        self.url = url
        self.config = config
        self.ttl = ttl
        self.driver = driver
        self.signer = Signer(getattr(config, "signing_key", ""))

    def _runs(self, rows: Any) -> Dict[str, float]:
        """``{entry: slot}`` of stored ``(entry, value)`` rows, each checked
        by decode_slot; a bad row is left out alone."""
        runs: Dict[str, float] = {}
        for raw_entry, raw_slot in rows:
            entry = entry_name(raw_entry)
            slot = None if entry is None else decode_slot(self.signer, entry, raw_slot)
            if slot is not None:
                runs[entry] = slot
        return runs

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
_MEMORY: Dict[Tuple[str, str], Dict[str, Any]] = {}   # (url, key_prefix) -> its lease
_MEMORY_LOCK = threading.Lock()


class MemoryLease(Lease):
    def __init__(self, url: str, config: Any, ttl: float, driver: Any = None) -> None:
        super().__init__(url, config, ttl, driver)
        with _MEMORY_LOCK:
            self._state = _MEMORY.setdefault((url, config.key_prefix), {"holder": None, "until": 0.0, "runs": {}})

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
CREATE TABLE IF NOT EXISTS {beat_lease} (name TEXT PRIMARY KEY, holder TEXT NOT NULL,
                                         expires_at REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS {beat_runs} (entry TEXT PRIMARY KEY, slot REAL NOT NULL) WITHOUT ROWID
"""


class SQLiteLease(Lease):
    NAME = "beat"

    def __init__(self, url: str, config: Any, ttl: float, driver: Any = None) -> None:
        super().__init__(url, config, ttl, driver)
        from .transports.sqlite.client import Database
        self._db = Database(url, config.key_prefix)
        self._t = self._db.tables
        self._ready = False

    def _run(self, fn: Any, *args: Any) -> Any:
        from .transports.sqlite.client import transaction

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


# -- redis ---------------------------------------------------------------------------
# A lease key that is not a string, has no expiry, or expires later than the
# lease's duration (ARGV[3] ms: ttl + CLOCK_SLACK) from now was not written by
# a scheduler's renewal: it counts as free.
_REDIS_ACQUIRE = """
local ttl = redis.call('PTTL', KEYS[1])
if redis.call('TYPE', KEYS[1]).ok ~= 'string' or ttl == -1 or ttl > tonumber(ARGV[3]) then
  redis.call('DEL', KEYS[1])
end
local current = redis.call('GET', KEYS[1])
if not current then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
if current == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""
_REDIS_RECORD = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
local kind = redis.call('TYPE', KEYS[2]).ok
if kind ~= 'hash' and kind ~= 'none' then redis.call('DEL', KEYS[2]) end
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
        return bool(self._acquire(keys=self.keys[:1], args=[holder, int(self.ttl * 1000),
                                                            int((self.ttl + CLOCK_SLACK) * 1000)]))

    def release(self, holder: str) -> None:
        self._release(keys=self.keys[:1], args=[holder])

    def last_runs(self) -> Dict[str, float]:
        import redis
        try:
            rows = self.client.hgetall(self.keys[1]).items()
        except redis.ResponseError as exc:          # not a hash: replaced at the next record
            log.warning("scheduler: %s is not a hash of last runs (%s): ignored", self.keys[1], exc)
            return {}
        return self._runs(rows)

    def record(self, holder: str, entry: str, slot: float) -> bool:
        return bool(self._record(keys=self.keys, args=[holder, entry, encode_slot(self.signer, entry, slot)]))

    def close(self) -> None:
        self.client.close()


# -- RabbitMQ --------------------------------------------------------------------------
class AMQPLease(Lease):
    """See the module docstring.  One connection, used by the scheduler's
    greenlet only."""

    def __init__(self, url: str, config: Any, ttl: float, driver: Any = None) -> None:
        super().__init__(url, config, ttl, driver)
        from .transports.amqp.common import connection_params
        self.params = connection_params(url)
        self.lock_queue = f"{config.key_prefix}.beat.lock"
        self.state_queue = f"{config.key_prefix}.beat.state"
        self.conn: Any = None
        self.channel: Any = None
        self.held = False
        self._state: Dict[str, float] = {}
        self._tags: list = []            # the state messages we hold unacknowledged

    def _connect(self) -> None:
        from .transports.amqp.common import open_connection
        self.conn = open_connection(self.params, heartbeat=max(2, int(self.ttl / 2)), role="beat")
        self.channel = self.conn.channel()
        self.channel.confirm_select()
        self.channel.queue_declare(self.state_queue, durable=True, auto_delete=False)

    def _drop(self) -> None:
        from .transports.amqp.adapter import close_quietly
        close_quietly(self.conn)
        self.conn = self.channel = None
        self.held = False
        self._tags = []

    def acquire(self, holder: str) -> bool:
        from .transports.amqp.common import AMQP_ERRORS
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
            self._tags.append(msg.delivery_tag)    # garbage or forged: dropped at the next write
            for entry, slot in self._read_state(msg.body).items():
                runs[entry] = max(slot, runs.get(entry, slot))
        self._state = runs

    def _read_state(self, body: Any) -> Dict[str, float]:
        """The runs of one state message, each checked; {} (logged) for one
        that is not a JSON object, or is unsigned or forged with a key."""
        from .transports.amqp.meta import as_bytes
        try:
            doc = json.loads(self.signer.unwrap(DOMAIN, as_bytes(body), f"scheduler state in {self.state_queue}"))
        except MessageError as exc:
            log.warning("scheduler: %s: ignored", exc)
            return {}
        except (ValueError, RecursionError):
            doc = None
        if not isinstance(doc, dict):
            log.warning("scheduler: a message in %s is not a JSON object of last runs: ignored", self.state_queue)
            return {}
        return {entry: slot for entry, slot in ((e, check_slot(e, v)) for e, v in doc.items()) if slot is not None}

    def release(self, holder: str) -> None:
        self._drop()

    def last_runs(self) -> Dict[str, float]:
        return dict(self._state) if self.held else {}

    def record(self, holder: str, entry: str, slot: float) -> bool:
        from .transports.amqp.common import AMQP_ERRORS
        import amqp
        if not self.held:
            return False
        runs = dict(self._state, **{entry: slot})
        body = self.signer.wrap(DOMAIN, json.dumps(runs).encode())
        try:
            self.channel.basic_publish(amqp.Message(body, delivery_mode=2),
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
        self._state = runs
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
