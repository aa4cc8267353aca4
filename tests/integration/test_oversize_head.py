"""A body over max_message_size is read by its head, and a fetch stops at its
byte budget (issue 17, item 14), on the real SQLite, Redis and RabbitMQ.

The oversized message is written as a program other than greenq would (a raw
XADD, a raw basic.publish, a raw INSERT).  Redis and RabbitMQ hand it out as a
Delivery carrying only a preview (``truncated``; ``size`` says how big it
was), which dead-letters with that preview; SQLite dead-letters it inside
the claim.  The good message beside it is delivered whole.
"""
from __future__ import annotations

import sqlite3
import time
import uuid

import pytest

from greenq.brokers.base import PREVIEW_BYTES, Outgoing
from tests.integration.transport_redis.test_redis import admin, make, opened  # noqa: F401 (fixtures)

LIMIT = 1000
BIG = 200_000 + 7
SLACK = 65536              # what the codec allows over max_message_size


def big_body() -> bytes:
    return b"HEAD" + bytes(range(256)) * (BIG // 256) + b"x" * (BIG % 256 - 4)


def write_raw(env, broker, queue: str, body: bytes, message_id: str) -> None:
    """Write one message straight into the broker, as another program would."""
    if env.kind == "redis":
        import redis
        client = redis.Redis.from_url(env.broker_url)
        client.xadd(broker.streams(queue)[9], {"b": body, "m": message_id})
        client.close()
    elif env.kind == "amqp":
        import amqp
        from greenq.transports.amqp.common import connection_params
        conn = amqp.Connection(**connection_params(env.broker_url))
        conn.connect()
        try:
            conn.channel().basic_publish(amqp.Message(body, message_id=message_id), "",
                                         broker.settings.queue_name(queue))
        finally:
            conn.close()
    else:
        with sqlite3.connect(env.broker_url[len("sqlite:///"):]) as db:
            db.execute("INSERT INTO messages (queue, priority, visible_at, message_id, body) "
                       "VALUES (?, 0, ?, ?, ?)", (queue, time.time(), message_id, body))


def fetch_all(broker, queue: str, n: int, **kw) -> list:
    got: list = []
    deadline = time.monotonic() + 10
    while len(got) < n and time.monotonic() < deadline:
        got += broker.fetch([queue], n - len(got), 0.5, **kw)
    return got


@pytest.fixture
def env(broker_env):
    if broker_env.kind == "memory":
        pytest.skip("the memory broker's bodies live in the worker's memory already")
    return broker_env


def test_an_oversized_message_is_read_by_its_head(env):
    q = env.queue()
    broker = env.consumer([q], max_message_size=LIMIT)
    body = big_body()
    size = len(body)
    write_raw(env, broker, q, body, "big")
    broker.publish(Outgoing(q, b"good", "good"))
    expected = 1 if env.kind == "sqlite" else 2                 # SQLite dead-letters it in the claim
    got = fetch_all(broker, q, expected)
    good = [d for d in got if not d.truncated]
    assert [d.body for d in good] == [b"good"]
    broker.ack(good)
    for d in got:
        if d.truncated:
            assert (d.message_id, d.size, d.body) == ("big", size, body[:PREVIEW_BYTES])
            broker.dead_letter(d, d.error)
    dead = [d for d in broker.dlq_list(1000) if d.queue == q]
    try:
        assert [d.message_id for d in dead] == ["big"]
        assert dead[0].reason.startswith(f"message is {size} bytes, over max_message_size {LIMIT}")
        assert bytes(dead[0].body) == body[:PREVIEW_BYTES]
        stats = broker.queue_stats([q])[0]
        assert (stats.ready, stats.held) == (0, 0)
    finally:
        if env.kind == "amqp":
            broker.dlq_purge()


def test_a_message_within_the_limit_and_slack_is_read_whole(env):
    q = env.queue()
    broker = env.consumer([q], max_message_size=LIMIT)
    body = b"y" * (LIMIT + SLACK - 100)
    write_raw(env, broker, q, body, "near")
    [d] = fetch_all(broker, q, 1)
    assert (d.truncated, d.body) == (False, body)
    broker.ack([d])


def test_a_fetch_stops_at_its_byte_budget(env):
    """10 messages of 10 KB, a budget of 25 KB: two at a time; the rest come
    next, in order, each counted as its first delivery."""
    q = env.queue()
    broker = env.consumer([q])
    ids = [f"m{i}" for i in range(10)]
    broker.publish_many([Outgoing(q, b"%02d" % i + b"z" * 9998, mid) for i, mid in enumerate(ids)])
    if env.kind == "amqp":     # start consuming and let all ten reach the local buffer
        broker.fetch([q], 0, 0.0)
        deadline = time.monotonic() + 10
        while sum(map(len, broker._consumer.buffer.values())) < 10 and time.monotonic() < deadline:
            time.sleep(0.05)
    first = broker.fetch([q], 10, 1.0, max_bytes=25_000)
    assert [d.message_id for d in first] == ids[:2]
    rest = fetch_all(broker, q, 8)
    assert [d.message_id for d in rest] == ids[2:]
    assert {d.deliveries for d in first + rest} == {1}
    broker.ack(first + rest)


@pytest.mark.redis
def test_redis_blocking_read_and_reclaim_cut_an_oversized_entry(make, admin):  # noqa: F811
    """The two other ways an entry reaches the worker: the blocking read
    (which reads it whole, then cuts it) and the reclaim of a dead worker's."""
    broker = make(max_message_size=LIMIT)
    q = f"big-{uuid.uuid4().hex[:6]}"
    broker.declare([q])
    key = broker.streams(q)[9]
    body = big_body()
    admin.xadd(key, {"b": body, "m": "big"})
    broker.publish(Outgoing(q, b"good", "good"))
    got = broker._block_read([q], 10, 0.5)
    # the blocking read hands out the entry it woke with; the next fetch reads the rest
    got += fetch_all(broker, q, 1)
    assert [(d.message_id, d.truncated, d.size) for d in got] == [("big", True, len(body)), ("good", False, None)]
    assert got[0].body == body[:PREVIEW_BYTES]
    ids = [p["message_id"] for p in admin.xpending_range(key, "greenq", "-", "+", 10)]
    admin.xclaim(key, "greenq", "dead-worker", 0, ids, idle=60_000, justid=True)
    again = make(max_message_size=LIMIT, lease_seconds=1).fetch([q], 10, 1.0)
    assert [(d.message_id, d.truncated, d.deliveries) for d in again] == [("big", True, 2), ("good", False, 2)]
    assert again[0].body == body[:PREVIEW_BYTES]
