"""Celery messages on RabbitMQ without a broker (greenq/transports/amqp/
celery_broker.py): what greenq publishes to a Celery queue, packed into the
AMQP content header as it goes on the wire and read back as a consumer reads
it, is the same call; whatever a publisher puts in the properties, headers
and body of a message on a Celery queue becomes a delivery, never an error in
the consumer loop, and decodes or raises only ``CeleryMessageError``."""
from __future__ import annotations

import datetime as dt
from types import SimpleNamespace

import pytest

from greenq.brokers.base import Outgoing
from greenq.celery import protocol as p
from greenq.transports.amqp.celery_broker import CeleryDelivery, celery_delivery, celery_publish
from greenq.transports.amqp.common import Settings
from greenq.transports.amqp.meta import read_properties

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from tests.unit.test_celery_protocol import SETTINGS, _same, messages, values  # noqa: E402

NAMES = Settings(celery_queues=frozenset({"q"}), accept=("json", "msgpack"))
META = SimpleNamespace(message_id="", deliveries=1, priority=0, error=None)


def _wire(props: bytes) -> dict:
    """The properties as the consumer loop reads them off a content header."""
    header = b"\x00\x3c\x00\x00" + b"\x00" * 8 + props      # class, weight, body size, then the properties
    read, problems = read_properties(header, 12)
    assert problems == []
    return read


@SETTINGS
@given(messages())
def test_what_greenq_publishes_reads_back_as_the_same_call(msg):
    if msg.serializer == "msgpack":
        msg.args = [v for v in msg.args if isinstance(v, (int, str, float, bool, type(None)))]
        msg.kwargs = {}
    msg.queue = "q"
    body, props, exchange, key = celery_publish(Outgoing("q", p.encode_redis(msg), msg.id, msg.priority), 0.0,
                                                NAMES)
    assert (exchange, key) == ("", "q")
    d = celery_delivery("q", _wire(props), body, META, (1, 7), NAMES, None)
    assert isinstance(d, CeleryDelivery) and d.problem is None, d.problem
    back = d.decode(None)
    _same(back, msg)
    assert (back.args, back.kwargs) == (msg.args, msg.kwargs)


header_values = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 31, 2 ** 31) | st.text(max_size=20)
                             | st.binary(max_size=10) | st.datetimes(max_value=dt.datetime(2100, 1, 1)),
                             lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                             max_leaves=10)
headers = st.dictionaries(st.sampled_from(["task", "id", "eta", "expires", "retries", "timelimit", "group",
                                           "root_id", "parent_id", "ignore_result", "argsrepr", "x"]),
                          header_values, max_size=8)


@SETTINGS
@given(headers, st.binary(max_size=60) | values.map(lambda v: p.json_dumps([[v], {}, {}]).encode()),
       st.none() | st.sampled_from(["application/json", "application/x-msgpack", "text/plain",
                                    "application/x-python-serialize"]),
       st.none() | st.sampled_from(["utf-8", "binary", "latin-1"]), st.none() | st.text(max_size=10))
def test_whatever_is_published_to_a_celery_queue_is_a_delivery_that_decodes_or_says_why(
        table, body, content_type, encoding, reply_to):
    props = {"application_headers": table, "content_type": content_type, "content_encoding": encoding,
             "reply_to": reply_to, "correlation_id": "c"}
    d = celery_delivery("q", {k: v for k, v in props.items() if v is not None}, body, META, (1, 9), NAMES,
                        1000)
    assert isinstance(d, CeleryDelivery) and d.message_id
    try:
        msg = d.decode(None)
    except p.CeleryMessageError as exc:
        assert str(exc)
        return
    assert msg.task == table["task"] and msg.queue == "q"


def test_a_greenq_clients_reply_queue_travels_in_its_own_header():
    """greenq's rpc:// reply queue rides in ``greenq_reply_to`` and in
    Celery's ``reply_to`` property (a Celery worker answers there, in
    Celery's format); a Celery message has none."""
    msg = p.CeleryMessage("interop.add", [1], {}, id="r1", queue="q")
    msg.reply_to = "P.reply.abc"
    body, props, _, _ = celery_publish(Outgoing("q", p.encode_redis(msg), "r1"), 0.0, NAMES)
    back = celery_delivery("q", _wire(props), body, META, (1, 3), NAMES, None).decode(None)
    assert back.reply_to == "P.reply.abc" and back.properties.get("reply_to") == "P.reply.abc"
    assert back.headers[p.GREENQ_REPLY_TO] == "P.reply.abc"
    again = p.decode(p.encode(back.for_retry(None)))            # a retry keeps it
    assert again.reply_to == "P.reply.abc"
    assert again.properties["reply_to"] == "P.reply.abc"
    msg.reply_to = None
    plain = p.decode(p.encode(msg))
    assert plain.reply_to is None and plain.properties["reply_to"] is None
