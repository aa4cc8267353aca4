"""Issue 18, item 14: ``greenq control cancel-consumer Q`` on RabbitMQ gives
the messages of Q that the cancelled consumer had prefetched, not handed
out, back to Q at once (they stayed unacked on the worker's connection until
it restarted); a client publish to an unreachable Redis says in its log line
that it fails at its deadline (it said "reconnecting with backoff")."""
from __future__ import annotations

import time
import uuid

import pytest

from greenq import GreenQ
from greenq.brokers import Outgoing, make_broker
from greenq.exceptions import BrokerError
from tests.conftest import make_config


def _ready(broker, queue: str) -> int:
    return next(s.ready for s in broker.queue_stats([queue]) if s.name == queue)


@pytest.mark.amqp
def test_a_cancelled_queue_gives_back_what_was_prefetched(amqp_url):
    kept, dropped = (f"gqa-{uuid.uuid4().hex[:8]}-{n}" for n in ("kept", "dropped"))
    worker = make_broker(amqp_url, make_config(broker_url=amqp_url, worker__prefetch=10))
    admin = make_broker(amqp_url, make_config(broker_url=amqp_url))
    try:
        worker.declare([kept, dropped])
        admin.publish_many([Outgoing(dropped, b"x", uuid.uuid4().hex) for _ in range(5)])
        first = worker.fetch([kept, dropped], 1, 5.0)
        assert len(first) == 1
        deadline = time.monotonic() + 10          # the other four arrive in the consumer's buffer
        while _ready(admin, dropped) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _ready(admin, dropped) == 0
        assert worker.fetch([kept], 10, 0.5) == []    # what cancel-consumer leaves the worker asking
        deadline = time.monotonic() + 10
        while _ready(admin, dropped) < 4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _ready(admin, dropped) == 4
        worker.ack(first)
    finally:
        worker.close()
        admin.close()


def test_a_failing_client_publish_logs_that_it_will_fail(caplog):
    """Nothing listens on port 1: the connection is refused by the real kernel."""
    app = GreenQ("honest", config=make_config(broker_url="redis://127.0.0.1:1/0",
                                               redis__connect_timeout=0.5))
    try:
        with caplog.at_level("WARNING", logger="greenq"):
            with pytest.raises(BrokerError):
                app.send_task("t.x")
    finally:
        app.close()
    [line] = [r.getMessage() for r in caplog.records if "connection lost" in r.getMessage()]
    assert "reconnecting with backoff" not in line and "then the publish fails" in line, line
