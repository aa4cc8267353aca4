"""A RabbitMQ cluster of three private nodes: a greenq-worker and a publisher
(confirms on) given the ';'-separated node list, both on node 1, move to a
live node when node 1 is SIGKILLed mid-drain; with quorum queues nothing is
lost and the worker resumes within 10 s."""
from __future__ import annotations

import pytest

from . import failover
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


def test_worker_follows_the_loss_of_its_node(rabbit_cluster, tmp_path):
    quorum = {"GREENQ_AMQP_QUEUE_TYPE": "quorum", "GREENQ_AMQP_CONFIRM_PUBLISH": "true"}
    outcome, printed = failover.run(rabbit_cluster.url(), ["rq"], lambda: rabbit_cluster.kill(0), tmp_path,
                                    total=700, backlog=600, rate=100, pause=0.1, kill_at=150,
                                    extra_env=quorum)
    print("rabbitmq failover:", outcome.line())
    assert outcome.sent > 650 and outcome.lost == 0, printed
    assert outcome.completed == outcome.sent, printed
    assert outcome.resume_s < 10, printed
