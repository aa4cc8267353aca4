"""The RabbitMQ metadata reader alone (no server): ``amqp_meta`` reads what
py-amqp reads, and never raises on anything else (hypothesis)."""
from __future__ import annotations

import math

import amqp
from amqp.serialization import decode_properties_basic
from hypothesis import example, given, settings
from hypothesis import strategies as st

from greenq.transports.amqp.meta import MAX_COUNT, read_dead_letter, read_meta, read_properties
from greenq.transports.amqp.wire import encode_properties, readable_header

HEADER_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-2 ** 63, 2 ** 63 - 1) | st.floats(allow_nan=True)
    | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8)
HEADERS = st.dictionaries(st.sampled_from(["greenq-eta", "greenq-deliveries", "x-delivery-count", "other"]),
                          HEADER_VALUES, max_size=4)
DEAD_HEADERS = st.dictionaries(st.sampled_from(["greenq-dead-id", "greenq-queue", "greenq-reason",
                                                "greenq-failed-at", "x-death"]), HEADER_VALUES, max_size=5)


def test_valid_properties_read_as_py_amqp_reads_them():
    props = {"content_type": "application/json", "content_encoding": "utf-8",
             "application_headers": {"greenq-eta": 1.5, "greenq-deliveries": 3, "a": "b"},
             "delivery_mode": 2, "priority": 7, "correlation_id": "c", "reply_to": "r",
             "expiration": "100", "message_id": "m\u00e9", "timestamp": 1700000000, "type": "t",
             "user_id": "guest", "app_id": "app", "cluster_id": "cl"}
    raw = encode_properties(props)
    assert read_properties(raw, 0) == (decode_properties_basic(raw, 0)[0], [])
    meta = read_meta(read_properties(raw, 0)[0], [], quorum=False)
    assert (meta.message_id, meta.deliveries, meta.priority, meta.eta, meta.error) == ("m\u00e9", 4, 7, 1.5, None)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300))
@example(b"\x00\x80\x02\xff\xfe")      # message_id: two bytes, not UTF-8
@example(b"\x20\x00\x00\x00\x00\x09")  # a header table cut short
def test_any_property_bytes_are_read_without_raising(raw):
    props, problems = read_properties(raw, 0)
    for quorum in (False, True):
        meta = read_meta(props, problems, quorum)
        assert isinstance(meta.message_id, str) and 1 <= meta.deliveries <= MAX_COUNT
        assert meta.error is None or meta.error
        assert (meta.error is None) or problems or meta.error.startswith("bad")
    payload = readable_header(b"\x00\x3c\x00\x00" + b"\x00" * 8 + raw)
    decode_properties_basic(payload, 12)   # py-amqp can read what a publisher connection passes on


@settings(max_examples=500, deadline=None)
@given(HEADERS, st.one_of(st.none(), st.text(max_size=30), st.binary(max_size=30)))
def test_any_headers_give_a_count_or_an_error(headers, message_id):
    props = {"application_headers": headers}
    if message_id is not None:
        props["message_id"] = message_id
    meta = read_meta(props, [], quorum=True)
    assert 1 <= meta.deliveries <= MAX_COUNT
    if meta.error is None:
        assert meta.eta is None or math.isfinite(meta.eta)
        for name in ("greenq-deliveries", "x-delivery-count"):
            value = headers.get(name)
            assert value is None or (type(value) is int and value >= 0)
    else:
        assert meta.error.startswith("bad header")


def test_a_malformed_message_id_through_py_amqps_encoder_is_reported_once():
    raw = amqp.Message(b"", message_id=b"\xff\xfe").properties   # py-amqp writes bytes as they are
    payload = encode_properties(raw)
    props, problems = read_properties(payload, 0)
    assert props["message_id"] == "\\xff\\xfe"
    assert problems == ["property message_id: b'\\xff\\xfe' is not UTF-8"]
    assert read_meta(props, problems, quorum=False).error == problems[0]


@settings(max_examples=300, deadline=None)
@given(DEAD_HEADERS, st.one_of(st.none(), st.text(max_size=30)), st.one_of(st.none(), st.text(max_size=30)),
       st.sampled_from([b"", "", b"body"]))
def test_any_dead_letter_is_listed(headers, message_id, routing_key, body):
    props = {"application_headers": headers, "message_id": message_id}
    dead = read_dead_letter(props, body, routing_key)
    assert isinstance(dead.body, bytes) and isinstance(dead.id, str) and isinstance(dead.queue, str)
    assert isinstance(dead.reason, str) and math.isfinite(dead.failed_at)
    assert dead.queue in ("", headers.get("greenq-queue"), routing_key) or "x-death" in headers


def test_a_message_py_amqp_read_after_a_rewrite_is_still_an_error():
    payload = readable_header(b"\x00\x3c\x00\x00" + b"\x00" * 8 + encode_properties({"message_id": b"\xff"}))
    props = decode_properties_basic(payload, 12)[0]
    meta = read_meta(props, [], quorum=False)
    assert (meta.message_id, meta.error) == ("\\xff", "property message_id: b'\\xff' is not UTF-8")
