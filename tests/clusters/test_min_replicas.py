"""``[redis] min_replicas``: a publish and an ack wait until N replicas have
them (WAIT), on Sentinel and on Redis Cluster."""
from __future__ import annotations

import logging
import time
import uuid

import pytest

from greenq.brokers import Outgoing, make_broker
from greenq.exceptions import BrokerError
from tests.conftest import make_config

pytestmark = pytest.mark.cluster


def test_publish_waits_for_the_replica_and_fails_without_it(sentinel, caplog):
    cfg = make_config(key_prefix="mr", redis__min_replicas=1, redis__socket_timeout=1.0)
    broker = make_broker(sentinel.url(), cfg)
    try:
        broker.publish(Outgoing("q", b"one", "m1"))
        broker.publish_many([Outgoing("q", b"two", "m2"),
                             Outgoing("q", b"three", "m3", eta=time.time() + 60)])
        got = broker.fetch(["q"], 10, 1.0)
        assert [d.message_id for d in got] == ["m1", "m2"]
        sentinel.kill(sentinel.replica)
        start = time.monotonic()
        with pytest.raises(BrokerError, match="min_replicas"):
            broker.publish(Outgoing("q", b"four", "m4"))
        assert 0.4 < time.monotonic() - start < 2.0          # WAIT gave up after socket_timeout / 2
        with caplog.at_level(logging.WARNING, logger="greenq.transports.redis.broker"):
            broker.ack(got)                                 # done on the master, only warned about
        assert "only 0 of [redis] min_replicas = 1" in caplog.text
        assert broker.queue_stats(["q"])[0].held == 0
    finally:
        broker.close()


def test_cluster_publish_and_ack_wait_on_each_master(redis_cluster):
    prefix = f"mrc-{uuid.uuid4().hex[:6]}"
    broker = make_broker(redis_cluster.url, make_config(key_prefix=prefix, redis__min_replicas=1))
    queues = [f"q{i}" for i in range(6)]
    try:
        broker.declare(queues)
        before = waits(redis_cluster)
        broker.publish_many([Outgoing(q, q.encode(), q) for q in queues])
        published = waits(redis_cluster)
        assert published - before >= 2          # one WAIT per master written to
        got = []
        deadline = time.monotonic() + 5
        while len(got) < 6 and time.monotonic() < deadline:
            got += broker.fetch(queues, 10, 1.0)
        assert sorted(d.message_id for d in got) == queues
        broker.ack(got)
        assert waits(redis_cluster) - published >= 2
        assert sum(s.held + s.ready for s in broker.queue_stats(queues)) == 0
    finally:
        broker.close()


def waits(cluster) -> int:
    """WAIT commands the cluster's nodes have run so far."""
    import redis
    total = 0
    for port in cluster.procs:
        stats = redis.Redis(port=port).info("commandstats")
        total += stats.get("cmdstat_wait", {}).get("calls", 0)
    return total
