"""The oldest ready message's age on Redis (STATS, docs/autoscaling.md): from
the first entry the consumer group was not given (every entry before any
worker made the group), from a requeued entry's parking; the oldest of the
ten priority streams.  (A due delayed member, from its eta: the broker suite,
test_queue_stats_autoscaling_signals.)"""
from __future__ import annotations

import os
import time
import uuid

import pytest

from greenq.brokers import Outgoing, make_broker
from greenq.drivers import get_driver
from tests.conftest import make_config

pytestmark = pytest.mark.redis


@pytest.fixture
def make(redis_url, redis_prefix):
    driver = get_driver(os.environ["GREENQ_TEST_DRIVER"]) if os.environ.get("GREENQ_TEST_DRIVER") else None
    opened = []

    def factory():
        opened.append(make_broker(redis_url, make_config(key_prefix=redis_prefix), driver))
        return opened[-1]
    yield factory
    for broker in opened:
        broker.close()


def out(queue: str, priority: int = 0, eta=None) -> Outgoing:
    return Outgoing(queue, b"x", uuid.uuid4().hex, priority, eta)


def test_age_before_any_worker_made_the_group(make):
    client = make()
    client.publish(out("q"))
    time.sleep(0.4)                          # (the age must grow)
    [stats] = client.queue_stats(["q"])
    assert stats.ready == 1 and 0.35 <= stats.oldest_ready_age < 5, stats


def test_age_is_the_oldest_of_every_priority_and_of_requeued_entries(make):
    client, consumer = make(), make()
    consumer.declare(["q"])
    client.publish(out("q", priority=1))
    time.sleep(0.4)
    client.publish(out("q", priority=9))
    [stats] = client.queue_stats(["q"])
    assert stats.ready == 2 and 0.35 <= stats.oldest_ready_age < 5, stats   # the priority-1 one
    got = consumer.fetch(["q"], 2, 1.0)
    assert len(got) == 2
    [stats] = client.queue_stats(["q"])
    assert (stats.ready, stats.held, stats.oldest_ready_age) == (0, 2, 0.0)
    consumer.requeue(got)                    # parked: ready again, waiting since now
    [stats] = client.queue_stats(["q"])
    assert (stats.ready, stats.held) == (2, 0) and stats.oldest_ready_age < 0.3, stats
    time.sleep(0.4)
    [stats] = client.queue_stats(["q"])
    assert 0.35 <= stats.oldest_ready_age < 5, stats
    consumer.ack(consumer.fetch(["q"], 2, 1.0))
    [stats] = client.queue_stats(["q"])
    assert (stats.ready, stats.held, stats.oldest_ready_age) == (0, 0, 0.0)

