"""RabbitMQ bad input and clean stops (issue 7): messages written straight
into RabbitMQ with a raw py-amqp channel, then consumed by greenq's broker.

* a property or header of the wrong type is a Delivery with ``.error`` set,
  never a consumer loop that raises and reconnects;
* a 0-byte message works everywhere (py-amqp hands its body over as ``''``);
* ``stop_consuming`` cancels the consumers; ``requeue(started=False)`` keeps
  the delivery count;
* an RPC on the consumer connection while a delivery is half read;
* a task id too long for ``message_id``; a dead letter RabbitMQ refused.
"""
from __future__ import annotations

import re
import threading
import time

import amqp
import pytest

from greenq.transports.amqp.broker import MAX_MESSAGE_ID_BYTES, MAX_QUEUE_NAME_BYTES, AMQPBroker
from greenq.transports.amqp.common import Settings, connection_params
from greenq.exceptions import BrokerError
from greenq.brokers import make_broker
from tests.conftest import AMQP_PREFIX, ctl_or_skip, make_config, rabbitmqctl, vhost_of
from tests.integration.transport_amqp.test_amqp import drain, env, out, tls_port  # noqa: F401 (fixtures)

DLQ = f"{AMQP_PREFIX}.dlq"   # the run's dead-letter store (make_config gives the run's key_prefix)


def rabbit_name(queue: str) -> str:
    """The RabbitMQ queue of logical ``queue`` under the run's prefix (DLQ as it is)."""
    return queue if queue.startswith(AMQP_PREFIX + ".") else f"{AMQP_PREFIX}.{queue}"

pytestmark = pytest.mark.amqp


class Raw:
    """A raw py-amqp channel: writes what greenq never would."""

    def __init__(self, url: str) -> None:
        self.conn = amqp.Connection(**connection_params(url))
        self.conn.connect()
        self.channel = self.conn.channel()

    def publish(self, queue: str, body: bytes, **props) -> None:
        """Publish and wait until RabbitMQ has routed it (a round trip after)."""
        self.channel.basic_publish(amqp.Message(body, **props), "", rabbit_name(queue))
        self.channel.queue_declare(rabbit_name(queue), passive=True)

    def count(self, queue: str) -> int:
        return self.channel.queue_declare(rabbit_name(queue), passive=True).message_count

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def raw(env):
    r = Raw(env.url)
    yield r
    r.close()


def consuming(broker: AMQPBroker, q: str):
    """Start the broker's consumer loop on ``q`` (the queue is declared)."""
    broker.declare([q])
    assert broker.fetch([q], 10, 0.1) == []
    return broker._consumer


BAD = [
    ({"application_headers": {"greenq-eta": "abc"}}, "bad header greenq-eta: 'abc' is not a number"),
    ({"application_headers": {"greenq-eta": {"at": 1}}}, "bad header greenq-eta: {'at': 1} is not a number"),
    ({"application_headers": {"greenq-eta": True}}, "greenq-eta: True is not a number"),
    ({"application_headers": {"greenq-eta": 10 ** 12}}, "greenq-eta: 1000000000000 is after the year 9999"),
    ({"application_headers": {"greenq-deliveries": "abc"}}, "bad header greenq-deliveries: 'abc'"),
    ({"application_headers": {"greenq-deliveries": -3}}, "bad header greenq-deliveries: -3"),
    ({"application_headers": {"greenq-deliveries": 2.5}}, "bad header greenq-deliveries: 2.5"),
    ({"message_id": b"\xff\xfebad"}, "property message_id: b'\\xff\\xfebad' is not UTF-8"),
    ({"message_id": b"\xc3" * 200}, "property message_id"),
    ({"correlation_id": b"\x80", "application_headers": {"greenq-eta": []}},
     "property correlation_id: b'\\x80' is not UTF-8; bad header greenq-eta: [] is not a number"),
]


@pytest.mark.parametrize("props,reason", BAD, ids=[str(i) for i in range(len(BAD))])
def test_malformed_properties_are_a_delivery_error_and_the_queue_goes_on(env, raw, props, reason):
    q = env.queue()
    broker = env.broker()
    loop = consuming(broker, q)
    gen = loop.gen
    raw.publish(q, b"poison", **props)
    broker.publish_many([out(q, b"good-1", message_id="g1"), out(q, b"good-2", message_id="g2")])
    got = drain(broker, [q], 3, ack=False)
    assert [d.body for d in got] == [b"poison", b"good-1", b"good-2"]
    bad, good = got[0], got[1:]
    assert reason in bad.error
    assert bad.deliveries == 1 and isinstance(bad.message_id, str)
    assert [d.error for d in good] == [None, None]
    broker.dead_letter(bad, bad.error)
    broker.ack(good)
    assert (loop.gen, loop.conn_state.failures) == (gen, 0)   # never reconnected
    [dead] = [d for d in broker.dlq_list(1000) if d.queue == q]
    assert dead.reason == bad.error and dead.body == b"poison"
    assert raw.count(q) == 0


def test_malformed_properties_over_tls_too(env, raw, tls_port):
    """With amqps:// and threads the loop lets py-amqp read the frames (an SSL
    socket read under the write lock): they still come through its handler."""
    port, cafile = tls_port
    q = env.queue()
    url = f"amqps://guest:guest@localhost:{port}/{vhost_of(env.url)}?cafile={cafile}"
    broker = make_broker(url, make_config(broker_url=url))
    try:
        loop = consuming(broker, q)
        deadline = time.monotonic() + 10      # the loop connects in its own thread (slow under load)
        while not loop.serial and time.monotonic() < deadline:
            time.sleep(0.05)
        assert loop.serial
        raw.publish(q, b"p1", message_id=b"\xff")
        raw.publish(q, b"p2", application_headers={"greenq-eta": "abc"})
        broker.publish(out(q, b"good", message_id="good"))
        got = drain(broker, [q], 3, ack=False)
        assert [(d.body, d.error is None) for d in got] == [(b"p1", False), (b"p2", False), (b"good", True)]
        for d in got[:2]:
            broker.dead_letter(d, d.error)
        broker.ack(got[2:])
        assert loop.conn_state.failures == 0 and raw.count(q) == 0
    finally:
        broker.close()


def test_a_quorum_queue_checks_its_delivery_count_too(env, raw):
    q = env.queue()
    broker = env.broker(amqp__queue_type="quorum")
    consuming(broker, q)
    raw.publish(q, b"poison", application_headers={"greenq-deliveries": "x"})
    [bad] = drain(broker, [q], 1, ack=False)
    assert "bad header greenq-deliveries: 'x'" in bad.error
    broker.dead_letter(bad, bad.error)


def test_a_malformed_dead_letter_does_not_break_the_dlq_commands(env, raw):
    """Anyone may write into greenq.dlq: headers of the wrong type, a message
    id that is not UTF-8, no queue to go back to."""
    broker = env.broker()
    broker.dlq_purge()
    raw.publish(DLQ, b"a", message_id=b"\xff", application_headers={
        "greenq-dead-id": "d1", "greenq-queue": 42, "greenq-failed-at": "yesterday",
        "greenq-reason": b"\xfe"})
    raw.publish(DLQ, b"b", application_headers={"x-death": "not a list"})
    dead = broker.dlq_list()
    assert [(d.body, d.queue, d.failed_at) for d in dead] == [(b"a", "", 0.0), (b"b", "", 0.0)]
    assert dead[0].message_id == "\\xff" and dead[0].reason == "\\xfe"
    assert broker.dlq_get("d1").body == b"a"
    assert broker.dlq_requeue() == 0   # nowhere to go back to: they stay
    assert len(broker.dlq_list()) == 2
    broker.queue_stats()


# -- issue 7 defect 6: empty bodies ------------------------------------------------

def test_an_empty_message_works_everywhere(env, raw):
    q = env.queue()
    broker = env.broker()
    consuming(broker, q)
    broker.dlq_purge()
    raw.publish(q, b"", message_id="empty")
    [d] = drain(broker, [q], 1, ack=False)
    assert d.body == b"" and type(d.body) is bytes and d.error is None
    broker.dead_letter(d, "empty body")
    [dead] = broker.dlq_list()
    assert (dead.body, dead.queue, dead.message_id) == (b"", q, "empty")
    assert broker.dlq_get(dead.id).body == b""
    [stats] = broker.queue_stats([q])
    assert stats.dead == 1
    assert broker.dlq_requeue() == 1
    [again] = drain(broker, [q], 1)
    assert (again.body, again.deliveries) == (b"", 1)


# -- issue 7 defect 7: warm shutdown ------------------------------------------------

def test_stop_consuming_cancels_and_returns_the_prefetched_with_their_count(env, raw):
    q = env.queue()
    broker = env.broker()
    broker.set_prefetch(5)
    loop = consuming(broker, q)
    broker.publish_many([out(q, str(i).encode(), message_id=f"m{i}") for i in range(10)])
    deadline = time.monotonic() + 10
    while len(loop.held) < 5 and time.monotonic() < deadline:
        time.sleep(0.01)   # the prefetch window fills
    held = broker.fetch([q], 2, 5.0)
    assert len(held) == 2
    broker.stop_consuming()
    assert raw.count(q) == 8          # 5 never sent, 3 prefetched and given back at once
    broker.ack(held)                  # held ones stay settleable
    assert broker.fetch([q], 10, 0.5) == []
    assert raw.count(q) == 8 and not loop.consuming
    other = env.broker()
    rest = drain(other, [q], 8)
    assert sorted(d.message_id for d in rest) == sorted(f"m{i}" for i in range(2, 10))
    assert {d.deliveries for d in rest} == {1}


@pytest.mark.parametrize("queue_type", ["classic", "quorum"])
def test_requeue_unstarted_keeps_the_delivery_count(env, queue_type):
    q = env.queue()
    broker = env.broker(amqp__queue_type=queue_type)
    check_requeue_counts(broker, q, 1)


def test_requeue_unstarted_without_confirms_rejects(env):
    """No confirms: a copy could be lost, so the message is rejected (its count raised)."""
    q = env.queue()
    broker = env.broker(amqp__confirm_publish=False)
    check_requeue_counts(broker, q, 2)


def check_requeue_counts(broker, q, unstarted):
    """Delivery counts after requeue(started=False) (``unstarted``: the count
    of the next hand-out) and requeue(started=True)."""
    broker.publish(out(q, b"x", priority=0, message_id="k"))
    [d] = drain(broker, [q], 1, ack=False)
    assert d.deliveries == 1
    broker.requeue([d], started=False)
    [d] = drain(broker, [q], 1, ack=False)
    assert (d.message_id, d.body, d.deliveries) == ("k", b"x", unstarted)
    broker.requeue([d], started=True)
    [d] = drain(broker, [q], 1, ack=False)
    assert d.deliveries == unstarted + 1
    broker.requeue([d], started=False)
    [d] = drain(broker, [q], 1, ack=False)
    assert d.deliveries == 2 * unstarted
    broker.ack([d])


# -- issue 7 defect 8: an RPC while a delivery is half read ---------------------------

def test_a_purge_while_a_delivery_is_half_read_keeps_the_connection(env, monkeypatch):
    q, other = env.queue("a"), env.queue("b")
    broker = env.broker()
    broker.declare([q, other])
    broker.publish(out(q, b"first", message_id="first"))
    [first] = drain(broker, [q, other], 1, ack=False)
    loop = broker._consumer
    gen = loop.gen
    result = {}
    inner = loop._frame

    def frame(f):
        if f[0] == 2 and not result:   # a content header: the body frames follow
            result["started"] = True
            threading.Thread(target=lambda: result.update(purged=broker.purge(other)), daemon=True).start()
            deadline = time.monotonic() + 5
            while not loop.calls and time.monotonic() < deadline:
                time.sleep(0.001)   # the purge is queued for the loop before it reads on
        return inner(f)
    monkeypatch.setattr(loop, "_frame", frame)
    loop.call(lambda: None)   # the loop has come round: its next read goes through frame()
    big = bytes(range(256)) * 1200   # ~300 KB: several body frames
    broker.publish(out(q, big, message_id="big"))
    [d] = drain(broker, [q, other], 1, ack=False)
    assert d.body == big and d.error is None
    deadline = time.monotonic() + 10
    while "purged" not in result and time.monotonic() < deadline:
        time.sleep(0.01)
    assert result.get("purged") == 0
    assert (loop.gen, loop.conn_state.failures) == (gen, 0)   # the connection lived: held acks count
    broker.ack([first, d])
    assert drain(env.broker(), [q], 1, timeout=1.0) == []


# -- issue 7 defect 9 and the limits -----------------------------------------------

def test_a_task_id_too_long_for_message_id_is_a_value_error(env, raw):
    q = env.queue()
    broker = env.broker()
    broker.declare([q])
    assert AMQPBroker.max_message_id_bytes == MAX_MESSAGE_ID_BYTES == 255
    assert Settings().max_queue_name_bytes == MAX_QUEUE_NAME_BYTES == 239   # the default prefix
    limit = broker.max_queue_name_bytes                                     # the run's, longer
    assert limit == 239 - (len(AMQP_PREFIX) - len("greenq"))
    for too_long in ("x" * 256, "\N{GRINNING FACE}" * 64):
        with pytest.raises(ValueError, match="task_id is 256 bytes"):
            broker.publish_many([out(q, message_id="ok"), out(q, message_id=too_long)])
        with pytest.raises(ValueError, match="task_id"):
            broker.publish(out(q, eta=time.time() + 60, message_id=too_long))
    assert raw.count(q) == 0   # nothing sent
    broker.publish_many([out(q, message_id="y" * 255), out(q, message_id="\N{GRINNING FACE}" * 63)])
    assert {d.message_id for d in drain(broker, [q], 2)} == {"y" * 255, "\N{GRINNING FACE}" * 63}
    with pytest.raises(BrokerError, match=f"at most {limit} bytes"):
        broker.declare(["q" * (limit + 1)])


# -- the suspected defect: a refused dead letter -------------------------------------

def test_a_nacked_dead_letter_leaves_the_message_unacknowledged(env):
    q = env.queue()
    broker = env.broker()
    broker.publish(out(q, b"keep", message_id="keep"))
    [d] = drain(broker, [q], 1, ack=False)
    ctl_or_skip("set a policy that fills the dead-letter store")
    vhost, policy = vhost_of(env.url), f"gq-dlq-full-{AMQP_PREFIX}"   # the vhost may be shared
    rabbitmqctl("set_policy", "-p", vhost, "--apply-to", "queues", policy, f"^{re.escape(DLQ)}$",
                '{"max-length": 0, "overflow": "reject-publish"}')
    try:
        deadline = time.monotonic() + 10
        while True:   # the policy takes a moment to reach the queue
            try:
                broker.dead_letter(d, "failed")
            except BrokerError as exc:
                assert "nack" in str(exc)
                break
            assert time.monotonic() < deadline, "the dead letter was never refused"
            broker.dlq_purge()
            broker.publish(out(q, b"keep", message_id="keep"))
            [d] = drain(broker, [q], 1, ack=False)
    finally:
        rabbitmqctl("clear_policy", "-p", vhost, policy)
    broker.requeue([d])   # still ours: it goes back, nothing lost
    [again] = drain(broker, [q], 1)
    assert again.body == b"keep"


def test_a_dead_letter_to_a_deleted_dlq_declares_it_again(env, raw):
    q = env.queue()
    broker = env.broker()
    broker.publish(out(q, b"dead", message_id="dead"))
    [d] = drain(broker, [q], 1, ack=False)
    raw.channel.queue_delete(DLQ)     # behind the broker's back: the publish comes back unroutable
    broker.dead_letter(d, "failed")
    [dead] = [x for x in broker.dlq_list() if x.queue == q]
    assert (dead.body, dead.reason) == (b"dead", "failed")
    assert raw.count(q) == 0
