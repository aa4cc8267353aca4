"""Redis-specific behaviour of the broker and result backend (the shared
suites cover the contract): namespacing, leases and reclaim, delivery counts,
the delayed-message script under concurrent fetchers, pool sizing, rediss://,
masked passwords, and recovery from killed connections and a restarted Redis.

Tests on the shared server use db 13 and a key prefix of their own; the
restart tests run a private ``redis-server`` on a free port.
"""
from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from typing import List

import pytest

from greenq.brokers import Outgoing, make_broker
from greenq.backends import make_backend
from greenq.backends.base import Record
from greenq.drivers import get_driver
from greenq.exceptions import BrokerError
from tests.conftest import _missing, make_config

pytestmark = pytest.mark.redis


def out(queue: str, body: bytes = b"x", priority: int = 0, eta=None, message_id=None) -> Outgoing:
    return Outgoing(queue, body, message_id or uuid.uuid4().hex, priority, eta)


@pytest.fixture
def opened():
    """Brokers and backends made by a test, closed after it."""
    things: List = []
    yield things
    for thing in things:
        thing.close()


@pytest.fixture
def make(redis_url, redis_prefix, opened):
    """``make(kind="broker"|"backend", url=None, **settings)`` on the test prefix
    (with the driver named by GREENQ_TEST_DRIVER, as the shared suites do)."""
    driver = get_driver(os.environ["GREENQ_TEST_DRIVER"]) if os.environ.get("GREENQ_TEST_DRIVER") else None

    def factory(kind: str = "broker", url: str = None, **settings):
        settings.setdefault("key_prefix", redis_prefix)
        cfg = make_config(**settings)
        thing = (make_broker if kind == "broker" else make_backend)(url or redis_url, cfg, driver)
        opened.append(thing)
        return thing
    return factory


@pytest.fixture
def admin(redis_url):
    import redis
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


def drain(broker, queues, expected, count=100, timeout=5.0, ack=True):
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < expected and time.monotonic() < deadline:
        batch = broker.fetch(queues, count, 0.2)
        if ack and batch:
            broker.ack(batch)
        got.extend(batch)
    return got


def kill_clients(admin, name: str) -> int:
    """Kill every connection called ``name`` (ours only: never other data)."""
    killed = 0
    for client in admin.client_list():
        if client.get("name") == name:
            killed += admin.client_kill_filter(_id=client["id"])
    return killed


# -- namespacing, leases, counts ---------------------------------------------------

def test_key_prefixes_isolate_two_apps(make, redis_prefix, admin):
    a = make(key_prefix=redis_prefix + "-a")
    b = make(key_prefix=redis_prefix + "-b")
    a.declare(["default"])
    b.declare(["default"])
    a.publish(out("default", b"for a"))
    b.publish(out("default", b"for b"))
    assert [d.body for d in drain(a, ["default"], 1)] == [b"for a"]
    assert [d.body for d in drain(b, ["default"], 1)] == [b"for b"]
    assert a.fetch(["default"], 10, 0.1) == [] and b.fetch(["default"], 10, 0.1) == []
    keys = admin.keys(redis_prefix + "*")
    assert keys and all(k.startswith((f"{redis_prefix}-a:".encode(), f"{redis_prefix}-b:".encode()))
                        for k in keys)


def test_renewed_lease_holds_then_reclaim_after_renewals_stop(make):
    holder = make(lease_seconds=1)
    other = make(lease_seconds=1)
    holder.declare(["q"])
    holder.publish(out("q", message_id="m"))
    [held] = drain(holder, ["q"], 1, ack=False)
    for _ in range(3):                      # 1.5 s: past the first lease
        time.sleep(0.5)
        holder.renew([held])
    assert other.fetch(["q"], 10, 0.3) == []
    start = time.monotonic()                # the holder "dies": no more renewals
    [again] = drain(other, ["q"], 1, ack=False, timeout=4)
    assert 0.4 < time.monotonic() - start < 2.5
    assert (again.message_id, again.deliveries) == ("m", 2)
    holder.renew([held])                    # too late: must not take it back
    owners = other.client.xpending_range(again.token[0], "greenq", "-", "+", 10)
    assert [o["consumer"].decode() for o in owners] == [other.consumer]
    other.ack([again])
    assert other.queue_stats(["q"])[0].held == 0


def test_delivery_count_grows_with_each_hand_out(make):
    a = make(lease_seconds=1)
    b = make(lease_seconds=1)
    a.declare(["q"])
    a.publish(out("q", message_id="poison"))
    counts = []
    [d] = drain(a, ["q"], 1, ack=False)
    counts.append(d.deliveries)
    a.requeue([d])
    [d] = drain(a, ["q"], 1, ack=False)
    counts.append(d.deliveries)
    [d] = drain(b, ["q"], 1, ack=False, timeout=4)     # a's lease runs out
    counts.append(d.deliveries)
    assert counts == [1, 2, 3]
    b.dead_letter(d, "delivered 3 times")
    [dead] = b.dlq_list()
    assert (dead.message_id, dead.reason) == ("poison", "delivered 3 times")
    assert b.queue_stats(["q"])[0].dead == 1


def test_delayed_messages_each_delivered_once_to_concurrent_fetchers(make):
    client = make()
    fetchers = [make() for _ in range(8)]
    for f in fetchers:
        f.declare(["q"])
    total = 400
    eta = time.time() + 0.5
    client.publish_many([out("q", message_id=f"d{i}", priority=i % 10, eta=eta + (i % 5) * 0.05)
                         for i in range(total)])
    assert client.queue_stats(["q"])[0].delayed == total
    received: List[str] = []
    lock = threading.Lock()
    deadline = time.monotonic() + 10

    def consume(broker):
        while len(received) < total and time.monotonic() < deadline:
            batch = broker.fetch(["q"], 7, 0.2)
            if batch:
                broker.ack(batch)
                with lock:
                    received.extend(d.message_id for d in batch)

    threads = [threading.Thread(target=consume, args=(f,)) for f in fetchers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(received) == len(set(received)), "a delayed message was delivered twice"
    assert sorted(received) == sorted(f"d{i}" for i in range(total))
    assert time.time() >= eta


# -- connections -----------------------------------------------------------------

def test_pool_is_small_in_a_client_and_sized_from_the_concurrency_in_a_worker(make):
    sized = make(worker__concurrency=40)
    assert sized.pool.max_connections == 10          # a client until it consumes
    sized.declare(["q"])
    assert sized.pool.max_connections == 50
    fixed = make(redis__max_connections=7)
    fixed.declare(["q"])
    assert fixed.pool.max_connections == 7
    assert make("backend", worker__concurrency=40).pool.max_connections == 11   # + the listener


def test_small_pool_makes_callers_wait_not_fail(make, redis_prefix, admin):
    broker = make(redis__max_connections=2)
    broker.declare(["q"])
    errors = []

    def publish(n):
        try:
            for i in range(25):
                broker.publish(out("q", message_id=f"{n}-{i}"))
        except Exception as exc:  # pragma: no cover - the assertion below shows it
            errors.append(exc)

    threads = [threading.Thread(target=publish, args=(n,)) for n in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert broker.queue_stats(["q"])[0].ready == 250
    name = f"greenq-{redis_prefix}-{os.getpid()}"
    assert 1 <= sum(1 for c in admin.client_list() if c.get("name") == name) <= 2


def test_many_waiters_share_one_connection(make):
    client = make("backend", redis__max_connections=1)       # + 1 for the listener
    worker = make("backend")
    ids = [f"w{i}" for i in range(100)]
    got = {}

    def wait(task_id):
        got[task_id] = client.wait(task_id, 10)

    threads = [threading.Thread(target=wait, args=(t,)) for t in ids]
    for t in threads:
        t.start()
    time.sleep(0.5)                                   # all are waiting now, on 2 connections
    stored = time.monotonic()
    worker.store_many([Record(t, t.encode()) for t in ids])
    for t in threads:
        t.join(10)
    assert got == {t: t.encode() for t in ids}
    assert time.monotonic() - stored < 2.0


def test_rediss_url_and_options_pass_through(make):
    import redis
    broker = make(url="rediss://:s3cret@localhost:6390/2?ssl_cert_reqs=none")
    pool = broker.pool
    assert issubclass(pool.connection_class, redis.SSLConnection)
    assert pool.connection_kwargs["ssl_cert_reqs"] == "none"
    assert pool.connection_kwargs["db"] == 2
    assert "s3cret" not in broker.reconnector.name
    assert make("backend", url="rediss://localhost:6390/0").pool.connection_class is not None


def test_password_never_shown_in_errors_or_logs(make, caplog):
    port = _free_port()
    broker = make(url=f"redis://:hunter2@127.0.0.1:{port}/0", redis__socket_timeout=0.5)
    caplog.set_level(logging.DEBUG)
    with pytest.raises(BrokerError) as info:
        broker.publish(out("q"))
    assert "hunter2" not in str(info.value) and "***" in str(info.value)
    assert broker.fetch(["q"], 1, 0.3) == []        # fetch never raises while Redis is away
    assert not broker.healthy
    assert "hunter2" not in caplog.text and "***" in caplog.text


def test_import_greenq_does_not_import_redis():
    code = ("import sys, greenq, greenq.brokers, greenq.backends, greenq.brokers.base; "
            "assert 'redis' not in sys.modules, 'redis imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- recovery: killed connections ------------------------------------------------------

def test_killed_connections_are_replaced_and_held_messages_acked(make, admin, redis_prefix):
    consumer = make()
    waiter = make()
    backend = make("backend")
    consumer.declare(["q", "later"])
    waiter.declare(["later"])
    consumer.publish_many([out("q", message_id="held"), out("q", message_id="next")])
    [held] = drain(consumer, ["q"], 1, count=1, ack=False)
    blocked: List = []
    waited: List = []
    fetching = threading.Thread(target=lambda: blocked.extend(waiter.fetch(["later"], 1, 4.0)))
    waiting = threading.Thread(target=lambda: waited.append(backend.wait("t-1", 4.0)))
    fetching.start()
    waiting.start()
    time.sleep(0.3)                                   # both are now blocked in Redis
    name = f"greenq-{redis_prefix}-{os.getpid()}"
    assert kill_clients(admin, name) >= 2
    assert kill_clients(admin, name + "-results") >= 1
    consumer.ack([held])                              # a held message can still be acked
    consumer.publish(out("later", message_id="after-kill"))
    make("backend").store("t-1", b"result")
    fetching.join(5)
    waiting.join(5)
    assert [d.message_id for d in blocked] == ["after-kill"]
    assert waited == [b"result"]
    waiter.ack(blocked)
    assert [d.message_id for d in drain(consumer, ["q"], 1)] == ["next"]
    stats = consumer.queue_stats(["q"])[0]
    assert (stats.ready, stats.held) == (0, 0)
    assert consumer.healthy and time.monotonic() - consumer.last_ok < 2


# -- recovery: a restarted Redis ---------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PrivateRedis:
    """A redis-server of the test's own on a free port, restartable."""

    def __init__(self, directory: str, persist: bool) -> None:
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.args = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
                     "--save", "", "--dir", directory, "--appendonly", "yes" if persist else "no",
                     "--appendfsync", "always"]
        self.proc = None

    def _admin(self):
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry
        return redis.Redis(port=self.port, socket_timeout=2, retry=Retry(NoBackoff(), 0))

    def start(self) -> None:
        import redis
        self.proc = subprocess.Popen(self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while True:
            try:
                with self._admin() as client:
                    client.ping()
                return
            except redis.RedisError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def stop(self) -> None:
        import redis
        try:
            with self._admin() as client:
                client.shutdown()
        except redis.RedisError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:  # pragma: no cover
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def private_redis(tmp_path, redis_url):
    if shutil.which("redis-server") is None:
        _missing("the redis-server program")
    servers: List[PrivateRedis] = []

    def start(persist: bool = True) -> PrivateRedis:
        server = PrivateRedis(str(tmp_path), persist)
        server.start()
        servers.append(server)
        return server
    yield start
    for server in servers:
        if server.proc.poll() is None:
            server.proc.kill()
            server.proc.wait()


def test_restart_with_persistence_loses_nothing(private_redis, make, caplog):
    server = private_redis(persist=True)
    broker = make(url=server.url, redis__socket_timeout=1.0)
    backend = make("backend", url=server.url, redis__socket_timeout=1.0)
    broker.declare(["q"])
    broker.publish_many([out("q", message_id="held"), out("q", message_id="queued")])
    [held] = drain(broker, ["q"], 1, count=1, ack=False)
    caplog.set_level(logging.WARNING, logger="greenq")
    server.stop()

    start = time.monotonic()
    assert broker.fetch(["q"], 10, 0.5) == []          # no raise while down, waits its timeout
    assert 0.4 < time.monotonic() - start < 2.0
    assert not broker.healthy
    broker.ack([held])                                 # kept, sent after reconnecting
    with pytest.raises(BrokerError):
        broker.publish(out("q"))                       # bounded: socket_timeout

    server.start()
    got = drain(broker, ["q"], 1, timeout=5)
    assert [d.message_id for d in got] == ["queued"]   # "held" was acked after the restart
    assert broker.healthy
    broker.publish(out("q", message_id="new"))
    assert [d.message_id for d in drain(broker, ["q"], 1)] == ["new"]
    assert broker.fetch(["q"], 10, 0.2) == []
    stats = broker.queue_stats(["q"])[0]
    assert (stats.ready, stats.held) == (0, 0)
    backend.store("t", b"ok")
    assert backend.wait("t", 2) == b"ok"
    lost = [r for r in caplog.records if "connection lost" in r.getMessage()]
    back = [r for r in caplog.records if "reconnected" in r.getMessage()]
    assert len(lost) == 1 and len(back) == 1, "state changes are logged once each"


def test_restart_without_data_recreates_groups(private_redis, make):
    server = private_redis(persist=False)
    broker = make(url=server.url, redis__socket_timeout=1.0)
    client = make(url=server.url, redis__socket_timeout=1.0)
    broker.declare(["q"])
    client.publish(out("q", message_id="gone"))
    [held] = drain(broker, ["q"], 1, ack=False)
    server.stop()
    server.start()                                     # empty: streams and groups are gone
    assert broker.fetch(["q"], 10, 0.3) == []
    got: List = []
    fetching = threading.Thread(target=lambda: got.extend(broker.fetch(["q"], 10, 4.0)))
    fetching.start()
    time.sleep(0.3)
    client.publish(out("q", message_id="fresh"))
    fetching.join(5)
    assert [d.message_id for d in got] == ["fresh"]
    broker.ack([held] + got)                           # acking a lost message is harmless
    assert broker.queue_stats(["q"])[0].held == 0
