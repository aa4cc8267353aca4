"""``Broker.dlq_list(preview=N)`` on every broker: each body cut to its first
N bytes (the dashboard's /api/dlq reads no more), the whole one still there
for ``dlq_get`` (``greenq dlq show``)."""
from __future__ import annotations

from tests.integration.test_broker_suite import drain, out


def test_dlq_list_preview_cuts_bodies(broker_env):
    q = broker_env.queue()
    consumer = broker_env.consumer([q])
    big = b"{" + b"x" * 100_000 + b"}"
    broker_env.broker().publish_many([out(q, big, message_id="big"), out(q, b"tiny", message_id="tiny")])
    for delivery in drain(consumer, [q], 2, count=2, ack=False):
        consumer.dead_letter(delivery, "test")
    listed = {d.message_id: d for d in consumer.dlq_list(1000, preview=10) if d.queue == q}
    assert listed["big"].body == big[:10] and listed["tiny"].body == b"tiny"
    assert consumer.dlq_get(listed["big"].id).body == big
    whole = {d.message_id: d for d in consumer.dlq_list(1000) if d.queue == q}
    assert whole["big"].body == big
