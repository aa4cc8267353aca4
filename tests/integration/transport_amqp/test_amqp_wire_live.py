"""``amqp_wire`` and ``amqp_adapter`` against a real RabbitMQ: what reading
deliveries past py-amqp's frame handler means for its heartbeat check (the
unit tests, tests/unit/test_amqp_wire.py, need no server)."""
from __future__ import annotations

import threading
import time

from tests.integration.transport_amqp.test_amqp import drain, env, out  # noqa: F401 (fixtures)


def test_a_stream_of_deliveries_keeps_the_consumer_connection_alive(env):
    """RabbitMQ sends no heartbeat while it sends deliveries, and the consumer
    loop reads deliveries without py-amqp's frame handler (which counts what
    arrives for py-amqp's heartbeat check): the loop must count them itself,
    or py-amqp would take a busy connection for a dead one after two intervals."""
    q = env.queue()
    consumer, client = env.broker(amqp__heartbeat=1), env.broker(amqp__confirm_publish=False)
    client.publish(out(q, message_id="first"))
    drain(consumer, [q], 1)
    loop = consumer._consumer
    gen = loop.gen
    stop = threading.Event()
    sent = []

    def feed() -> None:
        while not stop.is_set():
            client.publish(out(q, message_id=f"m{len(sent)}"))
            sent.append(1)
            time.sleep(0.01)
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    got = 0
    deadline = time.monotonic() + 3.5   # more than two heartbeat intervals of deliveries only
    while time.monotonic() < deadline:
        ds = consumer.fetch([q], 100, 0.1)
        consumer.ack(ds)
        got += len(ds)
    stop.set()
    feeder.join(5)
    assert got > 100
    assert (loop.gen, loop.conn_state.failures, consumer.healthy) == (gen, 0, True)
