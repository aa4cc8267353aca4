"""A RabbitMQ cluster of three private nodes: a publisher (confirms on) and a
consumer given the ';'-separated node list, both on node 1, move to a live
node when node 1 dies mid-drain; with quorum queues nothing is lost."""
from __future__ import annotations

import threading
import time

import pytest

from greenq.brokers import Outgoing, make_broker
from tests.conftest import make_config

from .rabbit import RabbitCluster, available

pytestmark = [pytest.mark.cluster, pytest.mark.amqp]


@pytest.fixture(scope="module")
def rabbit_cluster():
    if not available():
        from tests.conftest import _missing
        _missing("rabbitmq-server run as root (to start a private three-node cluster)")
    cluster = RabbitCluster()
    yield cluster
    cluster.stop()


def test_publisher_and_consumer_follow_the_loss_of_their_node(rabbit_cluster):
    url = rabbit_cluster.url()              # node 1 first: both connect there
    cfg = make_config(broker_url=url, amqp__queue_type="quorum", amqp__confirm_publish=True,
                      worker__concurrency=10)
    publisher, consumer = make_broker(url, cfg), make_broker(url, cfg)
    sent, refused, seen, starts = [], [], [], []
    stop = threading.Event()

    def publish() -> None:
        for i in range(2000):
            if stop.is_set():
                return
            try:
                publisher.publish(Outgoing("rq", b"%d" % i, f"m{i}"))
                sent.append(f"m{i}")
            except Exception as exc:         # the caller knows: not lost
                refused.append(f"m{i}: {exc}")
            time.sleep(0.002)
    try:
        consumer.declare(["rq"])
        publisher.publish_many([Outgoing("rq", b"b%d" % i, f"b{i}") for i in range(300)])
        sent += [f"b{i}" for i in range(300)]
        thread = threading.Thread(target=publish, daemon=True)
        thread.start()
        killed_at = None
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            batch = consumer.fetch(["rq"], 12, 0.5)
            now = time.monotonic()
            starts += [now] * len(batch)
            seen += [d.message_id for d in batch]
            consumer.ack(batch)
            if killed_at is None and len(seen) >= 200:
                rabbit_cluster.kill(0)
                killed_at = time.monotonic()
            if not thread.is_alive() and set(sent) <= set(seen):
                break
        stop.set()
        thread.join(10)
    finally:
        publisher.close()
        consumer.close()
    after = sorted(t for t in starts if t >= killed_at)
    resume = max((b - a for a, b in zip([killed_at] + after, after)), default=float("inf"))
    lost = set(sent) - set(seen)
    print(f"rabbitmq failover: sent={len(sent)} refused={len(refused)} lost={len(lost)} "
          f"duplicated={len(seen) - len(set(seen))} resume_s={resume:.2f}")
    assert len(sent) > 2000 and len(refused) < 200 and not lost   # refused: during the leader election
    assert resume < 10
