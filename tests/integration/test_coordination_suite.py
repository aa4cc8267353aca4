"""The coordination contract (greenq/coordination.py), run against every
transport (``broker_env``: memory, sqlite, redis, amqp) and, through
test_green_drivers.py, patched for gevent and eventlet.

Each test gets fresh instances sharing one namespace of its own.  A holder
that dies is a real process killed with SIGKILL (coordination_holder.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, List

import pytest

from greenq.coordination import Coordination, make_coordination
from tests.conftest import own_prefix

TTL = 1.0
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


@pytest.fixture
def coordination(broker_env):
    """A factory of coordinations sharing this test's namespace."""
    config = broker_env.config(key_prefix=own_prefix()) if broker_env.kind == "amqp" else broker_env.config()
    made: List[Coordination] = []

    def make(signing_key: str = "") -> Coordination:
        """A coordination; with ``signing_key``, the signed one (SignedCoordination)."""
        own = config if not signing_key else broker_env.config(key_prefix=config.key_prefix, signing_key=signing_key)
        made.append(make_coordination(broker_env.broker_url, own, broker_env.driver))
        return made[-1]
    make.config = config          # type: ignore[attr-defined]
    yield make
    for c in made:
        c.close()


def name() -> str:
    return f"t-{uuid.uuid4().hex[:8]}"


# -- counted lease ---------------------------------------------------------------

def test_a_counted_lease_admits_limit_holders(coordination):
    a, b = coordination(), coordination()
    lease = name()
    assert a.acquire(lease, "h1", 2, TTL) is True
    assert b.acquire(lease, "h2", 2, TTL) is True
    assert b.acquire(lease, "h3", 2, TTL) is False          # full
    assert a.acquire(lease, "h1", 2, TTL) is True           # a holder asking again keeps its place
    assert a.renew(lease, "h1", TTL) is True
    assert b.renew(lease, "h3", TTL) is False               # holds nothing
    a.release(lease, "h1")
    assert b.acquire(lease, "h3", 2, TTL) is True           # a released place is free at once
    assert a.renew(lease, "h1", TTL) is False
    a.release(lease, "nobody")                              # releasing nothing is no error
    assert b.acquire(name(), "h1", 1, TTL) is True          # leases are counted apart


def test_a_holder_that_stops_renewing_loses_its_place_after_ttl(broker_env, coordination):
    if broker_env.kind == "amqp":
        pytest.skip("RabbitMQ: a place lives as long as its holder's connection (the kill test below)")
    a, b = coordination(), coordination()
    lease = name()
    assert a.acquire(lease, "old", 1, 0.3)
    assert b.acquire(lease, "new", 1, 0.3) is False
    deadline = time.monotonic() + 3
    while not b.acquire(lease, "new", 1, 0.3):
        assert time.monotonic() < deadline, "the place never came back"
        time.sleep(0.05)
    assert a.renew(lease, "old", 0.3) is False               # too late: the place is another's


@pytest.mark.parametrize("signing_key", ["", "suite-key"])
def test_concurrent_acquirers_never_exceed_the_limit(coordination, signing_key):
    """Holders in threads (each its own instance) acquire, hold a moment and
    release, many times over: at no moment do more than ``limit`` hold.
    Signed too: a full lease's holders are checked, and good ones stay."""
    limit, workers, rounds = 3, 8, 15
    lease, instances = name(), [coordination(signing_key) for _ in range(workers)]
    holding, most, errors = [0], [0], []
    lock, start = threading.Lock(), threading.Barrier(workers)

    def work(n: int) -> None:
        try:
            start.wait()
            got = 0
            while got < rounds:
                if instances[n].acquire(lease, f"h{n}", limit, 10):
                    with lock:
                        holding[0] += 1
                        most[0] = max(most[0], holding[0])
                    time.sleep(0.002)
                    with lock:
                        holding[0] -= 1
                    instances[n].release(lease, f"h{n}")
                    got += 1
                else:
                    time.sleep(0.001)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(n,)) for n in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert 1 <= most[0] <= limit


def holder_process(broker_env, config: Any, lease: str, limit: int, ttl: float) -> subprocess.Popen:
    """A real process that takes a place of ``lease`` and renews it until killed."""
    env = dict(os.environ, PYTHONPATH=ROOT, HYPOTHESIS_NO_PLUGINS="1")
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "coordination_holder.py"), broker_env.broker_url,
                             config.key_prefix, lease, str(limit), str(ttl)],
                            env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip() == "HOLDING", f"{line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
    return proc


def test_a_killed_holder_gives_its_place_back_within_ttl(broker_env, coordination):
    """SIGKILL a process holding one of two places: while it lived, the
    lease stayed full; within ttl (plus the detection of RabbitMQ's
    heartbeats) of its death, its place is free, and the limit still holds."""
    if broker_env.kind == "memory":
        pytest.skip("memory:// lives in one process")
    ttl, lease = 4.0, name()   # (a holder starved of CPU for a whole ttl under a loaded CI would lose its place)
    me = coordination()
    assert me.acquire(lease, "survivor", 2, ttl)
    proc = holder_process(broker_env, coordination.config, lease, 2, ttl)
    try:
        assert me.acquire(lease, "waiting", 2, ttl) is False      # full: the process holds the other place
        until = time.monotonic() + ttl * 1.5                      # it renews: still full after ttl
        while time.monotonic() < until:
            assert me.renew(lease, "survivor", ttl)
            assert me.acquire(lease, "waiting", 2, ttl) is False
            time.sleep(ttl / 4)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        killed = time.monotonic()
        while not me.acquire(lease, "waiting", 2, ttl):
            me.renew(lease, "survivor", ttl)
            assert time.monotonic() - killed < ttl * 3 + 1, "the killed holder's place never came back"
            time.sleep(0.05)
        assert me.acquire(lease, "third", 2, ttl) is False        # the limit still holds
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# -- add-once set --------------------------------------------------------------------

def test_add_once_returns_added_and_count(coordination):
    a, b = coordination(), coordination()
    members = name()
    assert a.add_once(members, "m1") == (True, 1)
    assert b.add_once(members, "m1") == (False, 1)           # again, from another instance
    assert b.add_once(members, "m2", 60) == (True, 2)
    assert a.add_once(name(), "m1") == (True, 1)            # sets are counted apart
    a.forget(members)
    assert b.add_once(members, "m2") == (True, 1)           # forgotten: counted afresh


def test_racing_adds_count_each_member_once(coordination):
    members, instances = name(), [coordination() for _ in range(4)]
    answers: List[Any] = []
    start = threading.Barrier(len(instances))

    def add(n: int) -> None:
        start.wait()
        for i in range(20):
            answers.append((i, instances[n].add_once(members, f"m{i}")))
    threads = [threading.Thread(target=add, args=(n,)) for n in range(len(instances))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(answers) == 80
    assert sorted(i for i, (added, _) in answers if added) == list(range(20))   # each added once
    assert max(count for _, (_, count) in answers) == 20
    assert instances[0].add_once(members, "m0") == (False, 20)


def test_a_set_with_a_ttl_expires(broker_env, coordination):
    a = coordination()
    members = name()
    a.add_once(members, "m1", 0.3)
    time.sleep(0.6)
    assert a.add_once(members, "m2") == (True, 1)


# -- compare-and-set record --------------------------------------------------------

def test_compare_and_set_writes_only_over_what_was_read(coordination):
    a, b = coordination(), coordination()
    record = name()
    assert a.read(record) == {}
    assert a.compare_and_set(record, {}, {"x": b"1", "y": bytes(range(256))}) is True
    seen = b.read(record)
    assert seen == {"x": b"1", "y": bytes(range(256))}
    assert a.compare_and_set(record, {}, {"x": b"2"}) is False          # not what it is now
    assert a.compare_and_set(record, {"x": b"1"}, {"x": b"2"}) is False  # a part of it is not enough
    assert b.compare_and_set(record, seen, dict(seen, x=b"2")) is True
    assert a.compare_and_set(record, seen, {"x": b"3"}) is False        # stale: b wrote meanwhile
    assert a.read(record)["x"] == b"2"
    assert a.compare_and_set(record, a.read(record), {}) is True        # {}: deleted
    assert b.read(record) == {}
    a.compare_and_set(record, {}, {"x": b"1"})
    b.forget(record)
    assert a.read(record) == {}


def test_racing_writers_from_one_read_have_one_winner(coordination):
    record, instances = name(), [coordination() for _ in range(4)]
    instances[0].compare_and_set(record, {}, {"n": b"0"})
    wins: List[int] = []
    start = threading.Barrier(len(instances))

    def write(n: int) -> None:
        start.wait()
        if instances[n].compare_and_set(record, {"n": b"0"}, {"n": str(n + 1).encode()}):
            wins.append(n)
    threads = [threading.Thread(target=write, args=(n,)) for n in range(len(instances))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(wins) == 1
    assert instances[1].read(record) == {"n": str(wins[0] + 1).encode()}


def test_a_record_with_a_ttl_expires(coordination):
    a = coordination()
    record = name()
    assert a.compare_and_set(record, {}, {"x": b"1"}, ttl=0.3)
    time.sleep(0.6)
    assert a.read(record) == {}
    assert a.compare_and_set(record, {}, {"x": b"2"})


def test_sqlite_rows_of_the_tables_before_coordination_are_copied_once(tmp_path):
    """A file whose scheduler runs and chord counts were kept in beat_runs,
    chord_members and chord_state (before coordination) keeps them."""
    import sqlite3
    from tests.conftest import make_config
    path = tmp_path / "old.sqlite3"
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE beat_runs (entry TEXT PRIMARY KEY, slot REAL NOT NULL)")
        conn.execute("INSERT INTO beat_runs VALUES ('tick', 1000.0)")
        conn.execute("CREATE TABLE chord_members (group_id TEXT, member_id TEXT, expires_at REAL)")
        conn.execute("INSERT INTO chord_members VALUES ('g', 'a', 1e300), ('g', 'b', 1e300)")
        conn.execute("CREATE TABLE chord_state (group_id TEXT, completer TEXT, sent INTEGER, expires_at REAL)")
        conn.execute("INSERT INTO chord_state VALUES ('g', 'b', 1, 1e300)")
    conn.close()
    url = f"sqlite:///{path}"
    c = make_coordination(url, make_config(broker_url=url))
    try:
        assert c.read("beat:runs") == {"tick": b"1000.0"}
        assert c.add_once("chord:g", "a") == (False, 2)
        assert c.read("chordstate:g") == {"completer": b"b", "sent": b"1"}
    finally:
        c.close()


# -- with a signing key: what a forger writes straight into the broker is refused ------

class Forger:
    """Writes sets, records and lease places straight into the transport's
    store, by the store's own means (Redis commands, SQLite rows, a state
    message published to RabbitMQ, the memory store's dicts), as someone
    with write access to the broker but no signing key could."""

    def __init__(self, broker_env: Any, plain: Coordination) -> None:
        self.kind, self.plain = broker_env.kind, plain
        self.url, self.prefix = broker_env.broker_url, plain.config.key_prefix
        plain.read(name())                 # the transport's tables / queues exist from here on

    def member(self, set_name: str, member: str) -> None:
        if self.kind == "redis":
            with self._redis() as r:
                r.sadd(f"{self.prefix}:{set_name}", member)
        elif self.kind == "sqlite":
            with self._sqlite() as (db, t):
                db.execute(f"INSERT INTO {t.set_members} (name, member, expires_at) VALUES (?, ?, 1e300)",
                           (set_name, member))
        elif self.kind == "amqp":
            found = self.plain.members(set_name)
            self._amqp_state(set_name, sorted(set(found) | {member}))
        else:
            store = getattr(self.plain, "_store")
            members, until = store.sets.get(set_name, (set(), float("inf")))
            store.sets[set_name] = (members | {member}, until)

    def record(self, record_name: str, fields: dict) -> None:
        """Set these fields of the record (others stay)."""
        if self.kind == "redis":
            with self._redis() as r:
                r.hset(f"{self.prefix}:{record_name}", mapping=fields)
        elif self.kind == "sqlite":
            with self._sqlite() as (db, t):
                for field, value in fields.items():
                    db.execute(f"INSERT OR REPLACE INTO {t.records} (name, field, value, expires_at) "
                               "VALUES (?, ?, ?, 1e300)", (record_name, field, value))
        elif self.kind == "amqp":
            import base64
            record = dict(self.plain.read(record_name), **fields)
            self._amqp_state(record_name, {f: base64.b64encode(v).decode() for f, v in record.items()})
        else:
            store = getattr(self.plain, "_store")
            record, until = store.records.get(record_name, ({}, float("inf")))
            store.records[record_name] = (dict(record, **fields), until)

    def holder(self, lease: str, holder: str, ttl: float) -> None:
        """Take place 0 of ``lease`` for ``holder`` for ``ttl`` seconds."""
        if self.kind == "redis":
            with self._redis() as r:
                r.set(f"{self.prefix}:{lease}", holder, px=int(ttl * 1000))
        elif self.kind == "sqlite":
            with self._sqlite() as (db, t):
                db.execute(f"INSERT INTO {t.leases} (name, holder, expires_at) VALUES (?, ?, ?)",
                           (lease, holder, time.time() + ttl))
        else:
            store = getattr(self.plain, "_store")
            store.leases.setdefault(lease, {})[holder] = time.monotonic() + ttl

    # -- the stores -----------------------------------------------------------------
    def _redis(self) -> Any:
        import redis
        return redis.Redis.from_url(self.url)

    def _sqlite(self) -> Any:
        import contextlib
        import sqlite3

        @contextlib.contextmanager
        def opened() -> Any:
            db = sqlite3.connect(self.url[len("sqlite:///"):], timeout=30)
            try:
                with db:
                    yield db, getattr(self.plain, "_t")
            finally:
                db.close()
        return opened()

    def _amqp_state(self, state_name: str, value: Any) -> None:
        """Publish a state message of a version above any writer's (the newest wins)."""
        import json

        import amqp
        conn = amqp.Connection(**_amqp_params(self.url))
        conn.connect()
        try:
            channel = conn.channel()
            queue = f"{self.prefix}.state.{state_name}"
            channel.queue_declare(queue, durable=True, auto_delete=False)
            body = json.dumps({"v": 10 ** 9 + int(time.time() * 1000) % 10 ** 6, "value": value}).encode()
            channel.basic_publish(amqp.Message(body, delivery_mode=2), exchange="", routing_key=queue)
            channel.close()
        finally:
            conn.close()


def _amqp_params(url: str) -> Any:
    from urllib.parse import unquote, urlparse
    u = urlparse(url)
    return {"host": f"{u.hostname or '127.0.0.1'}:{u.port or 5672}", "userid": unquote(u.username or "guest"),
            "password": unquote(u.password or "guest"), "virtual_host": unquote(u.path[1:]) if len(u.path) > 1 else "/"}


KEY = "suite-key"


def test_forged_set_members_are_counted_without_a_key_and_refused_with_one(broker_env, coordination, caplog):
    plain, signed = coordination(), coordination(KEY)
    forger = Forger(broker_env, plain)
    open_set = name()
    forger.member(open_set, "forged")
    assert plain.add_once(open_set, "m1") == (True, 2)          # no key: whoever writes the broker is trusted
    guarded = name()
    forger.member(guarded, "forged")                             # unsigned
    forger.member(guarded, "forged~" + "0" * 64)                 # a tag made without the key
    forger.member(guarded, signed.stored_member(name(), "m9"))   # a good tag, of another set
    assert signed.add_once(guarded, "m1") == (True, 1)
    assert signed.add_once(guarded, "m1") == (False, 1)
    assert signed.add_once(guarded, "m2", enough=2) == (True, 2)
    assert signed.members(guarded) == ["m1", "m2"]
    refusals = [r for r in caplog.records if "set members of" in r.getMessage()]
    assert len(refusals) == 1 and guarded in refusals[0].getMessage()   # logged once (per name and instance)
    assert "3 unsigned or forged" in refusals[0].getMessage()
    assert coordination(KEY).add_once(guarded, "m2") == (False, 2)   # another instance agrees


def test_forged_record_fields_are_read_without_a_key_and_ignored_with_one(broker_env, coordination):
    plain, signed = coordination(), coordination(KEY)
    forger = Forger(broker_env, plain)
    open_record = name()
    forger.record(open_record, {"completer": b"forged"})
    assert plain.read(open_record) == {"completer": b"forged"}   # no key: trusted
    guarded = name()
    forger.record(guarded, {"completer": b"forged", "sent": b"1"})
    assert signed.read(guarded) == {}                            # refused whole: an empty record
    assert signed.compare_and_set(guarded, {}, {"completer": b"me"}) is True   # and replaced by the next write
    assert signed.read(guarded) == {"completer": b"me"}
    forger.record(guarded, {"sent": b"1"})                       # a forged field beside a good one
    assert signed.read(guarded) == {"completer": b"me"}
    assert signed.compare_and_set(guarded, {"completer": b"me"}, {"completer": b"me", "sent": b"2"}) is True
    assert coordination(KEY).read(guarded) == {"completer": b"me", "sent": b"2"}
    good = plain.read(guarded)["completer"]                      # a good value, copied to another field
    other = name()
    forger.record(other, {"completer": good})                    # ... or record: bound to its place
    forger.record(guarded, {"sent": good})
    assert signed.read(other) == {}
    assert signed.read(guarded) == {"completer": b"me"}
    assert plain.read(guarded)["completer"] != b"me"             # stored signed: not what the caller wrote


def test_a_forged_lease_holder_starves_without_a_key_and_is_evicted_with_one(broker_env, coordination):
    if broker_env.kind == "amqp":
        pytest.skip("RabbitMQ: a place is an exclusive queue of its holder's connection; no holder id is "
                    "stored to sign (docs/protocol.md)")
    plain, signed = coordination(), coordination(KEY)
    forger = Forger(broker_env, plain)
    open_lease = name()
    forger.holder(open_lease, "forged", 30)
    assert plain.acquire(open_lease, "h1", 1, 30) is False      # no key: the forged holder holds it
    guarded = name()
    forger.holder(guarded, "forged~" + "0" * 64, 30)
    assert signed.acquire(guarded, "h1", 1, 30) is True           # its place given back, then taken
    assert signed.holders(guarded, 1) == ["h1"]
    assert signed.renew(guarded, "h1", 30) is True
    assert coordination(KEY).acquire(guarded, "h2", 1, 30) is False   # a good holder is never evicted
    signed.release(guarded, "h1")
    assert coordination(KEY).acquire(guarded, "h2", 1, 30) is True


def test_without_a_key_what_is_stored_is_what_was_written(broker_env, coordination):
    """No signing key: the wire is as before (members, values and holders as given)."""
    plain = coordination()
    s, r = name(), name()
    plain.add_once(s, "m1")
    plain.compare_and_set(r, {}, {"f": b"v"})
    assert plain.members(s) == ["m1"] and plain.read(r) == {"f": b"v"} and not plain.signed
    if broker_env.leases:
        lease = name()
        plain.acquire(lease, "h1", 2, 30)
        assert plain.holders(lease, 2) == ["h1"]
