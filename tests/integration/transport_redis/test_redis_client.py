"""Redis as seen from a client process (issue 8, items 5 and 6): a publish
against an unreachable Redis fails within ``[redis] connect_timeout`` naming
the address, while a worker's broker keeps retrying; client pools start
small, grow on demand and close idle connections; a worker's broker grows
its pool when it starts consuming."""
from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from greenq.exceptions import BrokerError
from tests.integration.transport_redis.test_redis import (_free_port, admin, make, opened, out,  # noqa: F401 (fixtures)
                                          private_redis)

pytestmark = pytest.mark.redis


def failing_publish_seconds(broker) -> "tuple[float, str]":
    start = time.monotonic()
    with pytest.raises(BrokerError) as info:
        broker.publish(out("q"))
    return time.monotonic() - start, str(info.value)


def test_client_publish_to_a_closed_port_fails_fast_naming_it(make):
    port = _free_port()
    took, message = failing_publish_seconds(make(url=f"redis://127.0.0.1:{port}/0"))
    assert 1.5 < took < 2.5                             # default connect_timeout: 2 s
    assert f"127.0.0.1:{port}" in message
    took, _ = failing_publish_seconds(make(url=f"redis://127.0.0.1:{port}/0", redis__connect_timeout=0.3))
    assert took < 0.8


def test_client_publish_to_a_silent_address_fails_fast(make):
    """A listener whose accept queue is full drops new SYNs: connect() hangs,
    as it does for a firewalled host.  The connect timeout bounds it."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):                                  # fill the accept queue
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    try:
        took, message = failing_publish_seconds(
            make(url=f"redis://127.0.0.1:{port}/0", redis__connect_timeout=0.6))
        assert 0.4 < took < 1.0, message
        assert f"127.0.0.1:{port}" in message
    finally:
        for s in fillers + [listener]:
            s.close()


def test_worker_broker_publish_waits_out_a_short_outage(private_redis, make):
    """After declare() (a worker's broker), a publish keeps retrying for up to
    socket_timeout, far past connect_timeout."""
    server = private_redis(persist=True)
    broker = make(url=server.url, redis__connect_timeout=0.2, redis__socket_timeout=6.0)
    broker.declare(["q"])
    server.stop()
    errors = []

    def publish():
        try:
            broker.publish(out("q", message_id="during"))
        except Exception as exc:  # pragma: no cover - the assertion shows it
            errors.append(exc)
    publisher = threading.Thread(target=publish)
    publisher.start()
    time.sleep(1.0)                                     # five connect timeouts pass
    assert publisher.is_alive() and not errors
    server.start()
    publisher.join(10)
    assert errors == []
    assert [d.message_id for d in broker.fetch(["q"], 10, 1.0)] == ["during"]


def test_idle_connections_are_closed(make, admin, redis_prefix):
    broker = make()
    broker.declare(["q"])
    broker.pool.idle_close = 0.3
    start = threading.Barrier(6)

    def burst():
        start.wait()
        for i in range(30):
            broker.publish(out("q"))
    threads = [threading.Thread(target=burst) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    name = f"greenq-{redis_prefix}-{os.getpid()}"

    def count() -> int:
        return sum(1 for c in admin.client_list() if c.get("name") == name)
    assert count() >= 2, "the burst should have used several connections"
    time.sleep(0.5)                                      # past idle_close
    broker.publish(out("q"))                             # a release checks for idle ones
    assert count() == 1


def _one_held_and_one_waiting(make):
    """A pool of one connection, held, and a thread waiting for a connection."""
    pool = make(redis__max_connections=1).pool
    held = pool.get_connection()
    got = []
    waiter = threading.Thread(target=lambda: got.append(pool.get_connection()))
    waiter.start()
    waiter.join(0.2)
    assert waiter.is_alive()                            # over the cap: it waits
    return pool, held, got, waiter


def test_grow_wakes_a_caller_waiting_for_a_connection(make):
    pool, held, got, waiter = _one_held_and_one_waiting(make)
    pool.grow(2)
    waiter.join(5)
    assert got and got[0] is not held
    pool.release(got[0])
    pool.release(held)
    assert pool.max_connections == 2


def test_release_wakes_a_caller_waiting_for_a_connection(make):
    pool, held, got, waiter = _one_held_and_one_waiting(make)
    pool.release(held)
    waiter.join(5)
    assert got and got[0] is held                       # the one connection, handed on
    pool.release(got[0])
    pool.release(got[0])                                # a second release frees no second slot
    first = pool.get_connection()
    late = []
    second = threading.Thread(target=lambda: late.append(pool.get_connection()))
    second.start()
    second.join(0.2)
    assert second.is_alive() and not late
    pool.release(first)
    second.join(5)
    pool.release(late[0])
