"""Scheduler records written straight into the real brokers (issue 17, item
18): a garbage or future last run stops only its own entry, a lease left by a
fast clock (or by hand) is taken over at once, forged records are ignored
with signing_key, and two key prefixes never share a lease."""
from __future__ import annotations

import json
import time

import pytest

from greenq import GreenQ
from greenq.beat import Scheduler
from greenq import transports
from greenq.leadership import encode_slot
from greenq.signing import Signer
from tests.conftest import own_prefix

TTL = 5.0


def lease_of(env, **settings):
    config = env.config(**settings)
    return transports.load(env.broker_url, "leadership", "lease")(env.broker_url, config, TTL)


@pytest.fixture
def redis_env(request, tmp_path):
    from tests.integration.conftest import Env
    env = Env("redis", request, tmp_path)
    yield env
    env.teardown()


@pytest.fixture
def client(redis_env):
    import redis
    c = redis.Redis.from_url(redis_env.broker_url)
    yield c
    c.close()


def scheduler_app(env, **settings):
    """A real app on ``env``'s broker with three every-10-s entries."""
    app = GreenQ("trust", config=env.config(**settings))
    for name in "abc":
        app.add_periodic(name, f"t.{name}", every=10, queue=env.queue(name))
    return app


@pytest.mark.redis
def test_redis_malformed_last_runs_stop_only_their_own_entry(redis_env, client):
    app = scheduler_app(redis_env)
    s = Scheduler(app)
    runs = f"{app.config.key_prefix}:beat:runs"
    client.hset(runs, mapping={"a": "garbage", "b": "1000.0", "c": "nan", b"\xff\xfe": "1.0"})
    try:
        s.tick(now=1010.0)
        assert s.leading and s.sent == 1                       # b is due and sent
        assert s.leadership.last_runs() == {"a": 1010.0, "b": 1010.0, "c": 1010.0}   # a, c start afresh
        s.tick(now=1020.0)
        assert s.sent == 4 and s.leading
    finally:
        s.leadership.close()
        app.close()


@pytest.mark.redis
def test_redis_runs_key_of_the_wrong_type_is_replaced(redis_env, client):
    app = scheduler_app(redis_env)
    s = Scheduler(app)
    client.rpush(f"{app.config.key_prefix}:beat:runs", "junk")
    try:
        s.tick(now=1005.0)
        s.tick(now=1010.0)
        assert s.leading and s.sent == 3
    finally:
        s.leadership.close()
        app.close()


@pytest.mark.redis
@pytest.mark.parametrize("plant", ["fast_clock", "no_expiry", "wrong_type"])
def test_redis_an_implausible_lease_is_taken_over_at_once(redis_env, client, plant):
    lease = lease_of(redis_env)
    key = lease.keys[0]
    if plant == "fast_clock":                                  # renewed by a holder whose ttl was an hour
        client.set(key, "fast-holder", px=3600 * 1000)
    elif plant == "no_expiry":
        client.set(key, "stuck-holder")
    else:
        client.hset(key, "x", "y")
    try:
        assert lease.acquire("me") is True
        assert client.get(key) == b"me" and 0 < client.pttl(key) <= TTL * 1000
        other = lease_of(redis_env)
        assert other.acquire("other") is False                 # a plausible lease is still respected
        other.close()
    finally:
        lease.close()


@pytest.mark.redis
def test_redis_forged_records_are_ignored_with_a_signing_key(redis_env, client):
    lease = lease_of(redis_env, signing_key="right")
    runs = lease.keys[1]
    good = encode_slot(Signer("right"), "a", 1000.0)
    client.hset(runs, mapping={"a": good, "b": encode_slot(Signer("wrong"), "b", 1e9), "c": "1000.0",
                               "d": encode_slot(Signer("right"), "a", 2000.0)})      # a's record pasted on d
    try:
        assert lease.last_runs() == {"a": 1000.0}
        assert lease.acquire("me") and lease.record("me", "b", 1010.0)
        assert lease.last_runs()["b"] == 1010.0 and client.hget(runs, "b").startswith(b"s1:")
    finally:
        lease.close()


@pytest.mark.redis
def test_two_key_prefixes_on_one_redis_have_their_own_lease(redis_env):
    first = lease_of(redis_env)
    second = lease_of(redis_env, key_prefix=redis_env.config().key_prefix + "-other")
    try:
        assert first.acquire("one") and second.acquire("two")
    finally:
        first.close()
        second.close()
        import redis
        c = redis.Redis.from_url(redis_env.broker_url)
        c.delete(*second.keys)
        c.close()


def test_sqlite_fast_clock_or_malformed_lease_is_taken_over(tmp_path, request):
    from tests.integration.conftest import Env
    env = Env("sqlite", request, tmp_path)
    lease = lease_of(env)
    try:
        assert lease.acquire("boot")                           # creates the tables
        lease.release("boot")
        import sqlite3
        path = env.broker_url[len("sqlite:///"):]
        for expires in (time.time() + 3600, "zzz"):
            with sqlite3.connect(path) as conn:
                # (the coordination tables: greenq/transports/sqlite/coordination.py)
                conn.execute("INSERT OR REPLACE INTO leases VALUES ('beat:lease', 'fast', ?)", (expires,))
                conn.execute("INSERT OR REPLACE INTO records VALUES ('beat:runs', 'a', 'garbage', 1e300)")
                conn.execute("INSERT OR REPLACE INTO records VALUES ('beat:runs', 'b', 1000.0, 1e300)")
            assert lease.acquire("me") is True
            assert lease.last_runs() == {"b": 1000.0}
            lease.release("me")
    finally:
        lease.close()


@pytest.fixture
def amqp_env(request, tmp_path):
    from tests.integration.conftest import Env
    env = Env("amqp", request, tmp_path)
    yield env
    env.teardown()


def publish(amqp_url: str, queue: str, *bodies: bytes) -> None:
    import amqp
    from greenq.transports.amqp.common import connection_params, open_connection
    conn = open_connection(connection_params(amqp_url), heartbeat=0, role="test")
    try:
        ch = conn.channel()
        ch.queue_declare(queue, durable=True, auto_delete=False)
        for body in bodies:
            ch.basic_publish(amqp.Message(body, delivery_mode=2), exchange="", routing_key=queue)
    finally:
        conn.close()


@pytest.mark.amqp
@pytest.mark.parametrize("key", ["", "right"])
def test_rabbitmq_malformed_or_forged_state_is_ignored(amqp_env, key):
    prefix = own_prefix()
    lease = lease_of(amqp_env, key_prefix=prefix, signing_key=key)
    valid = json.dumps({"b": 1000.0}).encode()
    publish(amqp_env.broker_url, lease.state_queue, b"garbage", b"[" * 50000,
            json.dumps({"a": "nan", "c": 1e300, "d": [1]}).encode(),
            Signer(key).wrap("schedule", valid) if key else valid,
            Signer("wrong").wrap("schedule", json.dumps({"e": 5.0}).encode()))
    other = lease_of(amqp_env, key_prefix=prefix + "-other")
    try:
        assert lease.acquire("me") is True
        # without a key whoever writes the broker is trusted: the tag is not checked
        assert lease.last_runs() == ({"b": 1000.0} if key else {"b": 1000.0, "e": 5.0})
        assert lease.record("me", "a", 1010.0)
        assert other.acquire("them") is True                   # another prefix: another lease
    finally:
        lease.close()
        other.close()
