"""Redis Cluster: queues spread over the masters, a worker drains them all, a
slow master stalls only its own queues, and a killed master's replica takes over."""
from __future__ import annotations

import time
import uuid

import pytest
import redis

from greenq.brokers import Outgoing, make_broker
from tests.conftest import make_config

from . import failover

pytestmark = pytest.mark.cluster


def queues_on_masters(cluster, prefix: str, n: int = 3):
    """``n`` queue names whose hash tags land on ``n`` different masters."""
    found = {}
    for i in range(1000):
        name = f"c{i}"
        master = cluster.master_of(f"{{{prefix}:{name}}}")
        found.setdefault(master, name)
        if len(found) == n:
            return list(found.values()), list(found)
    raise AssertionError("no spread found")


def test_queues_on_three_masters_drain_through_one_broker(redis_cluster):
    prefix = f"gqc-{uuid.uuid4().hex[:6]}"
    queues, masters = queues_on_masters(redis_cluster, prefix)
    cfg = make_config(key_prefix=prefix)
    broker = make_broker(redis_cluster.url, cfg)
    try:
        broker.publish_many([Outgoing(q, b"%d" % i, f"{q}-{i}") for q in queues for i in range(20)])
        for q, master in zip(queues, masters):   # every key of a queue is on its master
            node = redis.Redis(port=master)
            assert all(node.exists(k) for k in broker.streams(q)[-1:])
        got = []
        deadline = time.monotonic() + 10
        while len(got) < 60 and time.monotonic() < deadline:
            batch = broker.fetch(queues, 25, 1.0)
            broker.ack(batch)
            got += batch
        assert sorted(d.message_id for d in got) == sorted(f"{q}-{i}" for q in queues for i in range(20))
        assert [s.ready + s.held for s in broker.queue_stats(queues)] == [0, 0, 0]
    finally:
        broker.close()


def test_a_paused_master_stalls_only_its_own_queues(redis_cluster):
    prefix = f"gqc-{uuid.uuid4().hex[:6]}"
    (slow_q, fast_q), (slow_master, _) = queues_on_masters(redis_cluster, prefix, 2)
    broker = make_broker(redis_cluster.url, make_config(key_prefix=prefix))
    try:
        broker.declare([slow_q, fast_q])
        broker.publish_many([Outgoing(slow_q, b"s", "slow-1"), Outgoing(fast_q, b"f", "fast-1")])
        redis.Redis(port=slow_master).execute_command("CLIENT", "PAUSE", 3000, "ALL")
        start = time.monotonic()
        got = []
        while not any(d.message_id == "fast-1" for d in got) and time.monotonic() - start < 5:
            got += broker.fetch([slow_q, fast_q], 10, 1.0)
        took = time.monotonic() - start
        assert any(d.message_id == "fast-1" for d in got)
        assert took < 1.0, f"the fast queue waited {took:.2f} s behind the paused master"
        while not any(d.message_id == "slow-1" for d in got) and time.monotonic() - start < 10:
            got += broker.fetch([slow_q, fast_q], 10, 1.0)
        assert sorted(d.message_id for d in got) == ["fast-1", "slow-1"]
        broker.ack(got)
    finally:
        broker.close()


def test_worker_follows_a_cluster_failover(own_cluster, tmp_path):
    prefix = f"gqf-{uuid.uuid4().hex[:6]}"
    queues, masters = queues_on_masters(own_cluster, prefix)
    outcome, printed = failover.run(own_cluster.url, queues, lambda: own_cluster.kill(masters[0]),
                                    tmp_path, total=700, backlog=600, rate=100, pause=0.1, kill_at=150,
                                    prefix=prefix)
    print("cluster failover:", outcome.line())
    own_cluster.wait_ok()
    assert masters[0] != own_cluster.master_of(f"{{{prefix}:{queues[0]}}}")   # the replica took over
    assert outcome.sent > 650 and outcome.completed >= 0.98 * outcome.sent, printed
    assert outcome.first_queue_resume_s < 10, printed     # the dead master's queue: after the failover
    # the other queues went on meanwhile (at 100 tasks/s: about 2 s worth of them)
    assert outcome.others_meanwhile >= 50, printed


def test_an_unreachable_cluster_is_waited_for_not_fatal():
    """Making the broker does not contact the cluster: a worker started before
    its cluster waits for it (BrokerError from round trips, retried)."""
    from greenq.exceptions import BrokerError
    cfg = make_config(key_prefix="nobody", redis__socket_timeout=0.5)
    broker = make_broker("redis+cluster://127.0.0.1:1,127.0.0.1:2", cfg)
    try:
        start = time.monotonic()
        with pytest.raises(BrokerError, match="unreachable"):
            broker.declare(["q"])            # retried for socket_timeout, then raised
        assert time.monotonic() - start < 5
    finally:
        broker.close()
