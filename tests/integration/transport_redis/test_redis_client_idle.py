"""Idle Redis clients (issue 18, item 8): the result listener ends when
nobody waits, and a later wait starts it again without missing a result;
the pool's timer closes idle connections with no further call."""
from __future__ import annotations

import threading
import time

import pytest

from greenq.backends.base import Record
from greenq.transports.redis.results import RedisBackend
from greenq.transports.redis.client import Pool
from tests.conftest import make_config


@pytest.fixture
def backend(redis_url, redis_prefix):
    made = RedisBackend(redis_url, make_config(key_prefix=redis_prefix, redis__idle_timeout=0.3))
    yield made
    made.close()


def _until(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_listener_ends_when_idle_and_a_later_wait_starts_it_again(backend):
    assert backend._wait("nothing", 0.05) is None           # starts the listener
    listener = backend._listener
    assert listener._thread is not None
    assert _until(lambda: listener._thread is None), "the idle listener never ended"
    assert not listener.ready.is_set()
    got = []
    waiter = threading.Thread(target=lambda: got.append(backend._wait("t1", 10)))
    waiter.start()
    assert _until(lambda: "t1" in listener._waiters and listener.ready.is_set())
    backend._store_many([Record("t1", b"value", True)])
    waiter.join(10)
    assert got == [b"value"]


def test_the_timer_closes_idle_connections_without_another_call(backend):
    pool: Pool = backend.pool
    held = [pool.get_connection() for _ in range(3)]
    for connection in held:
        connection.connect()
        pool.release(connection)
    assert all(c._sock is not None for c in held)
    assert _until(lambda: all(c._sock is None for c in held), 2.0), "idle connections stayed open"
    assert pool._created_connections == 0


def test_zero_keeps_connections_open(redis_url, redis_prefix):
    made = RedisBackend(redis_url, make_config(key_prefix=redis_prefix, redis__idle_timeout=0))
    try:
        connection = made.pool.get_connection()
        connection.connect()
        made.pool.release(connection)
        time.sleep(0.3)
        assert connection._sock is not None
    finally:
        made.close()


def test_a_malformed_registry_entry_is_passed_over_and_names_are_escaped(redis_url, redis_prefix):
    """Entries of greenq:apps written straight into the real Redis (a time
    that is NaN or infinite, fields of the wrong type, not JSON) are passed
    over; a worker name with a terminal escape is shown escaped."""
    import json

    from greenq import GreenQ
    from greenq.prefixes import REGISTRY, mismatch_hint
    app = GreenQ(f"{redis_prefix}-app", broker=redis_url, key_prefix=redis_prefix, config_file=False)
    client = app.broker.client
    other = f"{redis_prefix}-other"       # the fixture deletes fields whose prefix starts with redis_prefix
    client.hset(REGISTRY, mapping={
        f"{app.name} {other}-nan": b'{"app": "%s", "key_prefix": "%s-nan", "worker": "w", "seen": NaN}'
                                   % (app.name.encode(), other.encode()),
        f"{app.name} {other}-inf": b'{"app": "%s", "key_prefix": "%s-inf", "worker": "w", "seen": Infinity}'
                                   % (app.name.encode(), other.encode()),
        f"{app.name} {other}-list": json.dumps({"app": app.name, "key_prefix": [1], "worker": "w", "seen": 1}),
        f"{app.name} {other}-junk": b"\xff not json",
    })
    try:
        assert mismatch_hint(app) is None                 # nothing usable: no hint, and no error
        client.hset(REGISTRY, f"{app.name} {other}", json.dumps(
            {"app": app.name, "key_prefix": other, "worker": "w\x1b[31m", "seen": 1.0}))
        hint = mismatch_hint(app)
        assert hint is not None and f"key_prefix '{other}'" in hint
        assert "\x1b" not in hint and "w\\x1b[31m" in hint
    finally:
        app.close()
