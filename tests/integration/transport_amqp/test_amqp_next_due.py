"""``next_due`` on RabbitMQ while delayed messages move down their delay
cascade: it must never miss a message that is still in the cascade (a
--burst worker would stop before it)."""
from __future__ import annotations

import threading
import time
import uuid

import pytest

from greenq.brokers import Outgoing, make_broker
from tests.conftest import delete_queues, make_config

pytestmark = pytest.mark.amqp


def test_next_due_never_misses_a_message_moving_down_the_cascade(amqp_url):
    """Sixty messages due 0.05 s apart over three seconds, each passing
    several levels; ``next_due`` is asked over and over meanwhile.  A message
    whose eta was still ahead when an answer came back (so it was in the
    cascade the whole time the answer was made: it cannot leave before its
    eta) must be counted: the answer is at most its eta."""
    queue = f"gqa-{uuid.uuid4().hex[:8]}-due"
    client = make_broker(amqp_url, make_config(broker_url=amqp_url))
    asker = make_broker(amqp_url, make_config(broker_url=amqp_url))
    try:
        start = time.time() + 0.5
        etas = [start + 0.05 * i for i in range(60)]
        client.publish_many([Outgoing(queue, b"x", uuid.uuid4().hex, 0, eta) for eta in etas])
        drained = threading.Event()

        def drain() -> None:        # take what lands in the queue, as a worker would
            consumer = make_broker(amqp_url, make_config(broker_url=amqp_url))
            try:
                got = 0
                while got < len(etas) and time.time() < etas[-1] + 30:
                    batch = consumer.fetch([queue], 100, 0.2)
                    if batch:
                        consumer.ack(batch)
                        got += len(batch)
            finally:
                consumer.close()
                drained.set()
        threading.Thread(target=drain, daemon=True).start()
        missed, answers = [], 0
        while time.time() < etas[-1] - 0.1:
            due = asker.next_due([queue])
            answered = time.time()
            answers += 1
            pending = [eta for eta in etas if eta > answered + 0.01]
            if pending and (due is None or due > min(pending) + 0.01):
                missed.append((answered - start, due and due - start, min(pending) - start))
        assert answers >= 10
        assert not missed, missed
        assert drained.wait(60)
    finally:
        client.close()
        asker.close()
        delete_queues(amqp_url, [queue])
