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

    def make() -> Coordination:
        made.append(make_coordination(broker_env.broker_url, config, broker_env.driver))
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


def test_concurrent_acquirers_never_exceed_the_limit(coordination):
    """Holders in threads (each its own instance) acquire, hold a moment and
    release, many times over: at no moment do more than ``limit`` hold."""
    limit, workers, rounds = 3, 8, 15
    lease, instances = name(), [coordination() for _ in range(workers)]
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
