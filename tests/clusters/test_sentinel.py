"""Redis behind Sentinel: a worker follows a failover (master SIGKILLed mid-drain)."""
from __future__ import annotations

import pytest

from tests.conftest import make_config

from . import failover

pytestmark = pytest.mark.cluster


def test_sentinel_url_reaches_master_and_results(sentinel):
    from greenq.backends import make_backend
    from greenq.brokers import Outgoing, make_broker
    url = sentinel.url()
    cfg = make_config(broker_url=url, key_prefix="s1")
    broker, backend = make_broker(url, cfg), make_backend(url, cfg)
    try:
        broker.publish(Outgoing("q", b"body", "m1"))
        got = broker.fetch(["q"], 10, 2.0)
        assert [d.message_id for d in got] == ["m1"]
        broker.ack(got)
        assert type(backend).__name__ == "RedisSentinelBackend"
    finally:
        broker.close()
        backend.close()


def test_worker_follows_sentinel_failover(sentinel, tmp_path):
    outcome, printed = failover.run(sentinel.url(), ["s"], lambda: sentinel.kill(sentinel.master),
                                    tmp_path, total=700, backlog=600, rate=100, pause=0.1, kill_at=150)
    print("sentinel failover:", outcome.line())
    assert sentinel.current_master() == sentinel.replica
    assert outcome.sent > 650 and outcome.completed >= 0.98 * outcome.sent, printed
    assert outcome.resume_s < 10, printed
    assert outcome.lost <= 5, printed
