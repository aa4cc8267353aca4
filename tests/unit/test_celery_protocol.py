"""greenq.celery.protocol: Celery protocol 2 decoded and encoded, with no I/O.

Property tests: what greenq encodes decodes to the same call (kombu's JSON type
wrappers included), and arbitrary bytes, JSON and envelopes raise nothing but
CeleryMessageError, the one error the worker dead-letters with its text.
"""
from __future__ import annotations

import base64
import datetime as dt
import decimal
import json
import uuid

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from greenq.celery import protocol as p  # noqa: E402
from greenq.exceptions import MessageError  # noqa: E402
from greenq.message import TaskMessage  # noqa: E402

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

names = st.text(st.characters(min_codepoint=33, max_codepoint=0x2fff, blacklist_categories=("Cs", "Cc")),
                min_size=1, max_size=30)
scalars = (st.none() | st.booleans() | st.integers(min_value=-(2 ** 63), max_value=2 ** 63)
           | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20))
typed = (st.datetimes(timezones=st.just(dt.timezone.utc)) | st.dates() | st.times()
         | st.decimals(allow_nan=False, allow_infinity=False, places=4)
         | st.uuids() | st.binary(max_size=20))
values = st.recursive(scalars | typed, lambda c: st.lists(c, max_size=4)
                      | st.dictionaries(st.text(max_size=8).filter(lambda k: k not in ("__type__", "__value__")),
                                        c, max_size=4), max_leaves=15)
epochs = st.none() | st.floats(min_value=0, max_value=4e9).map(lambda f: round(f, 6))
limits = st.none() | st.floats(min_value=0, max_value=1e6)
signatures = st.none() | st.lists(st.fixed_dictionaries(
    {"task": names, "args": st.lists(scalars, max_size=3), "kwargs": st.dictionaries(st.text(max_size=5), scalars,
                                                                                     max_size=3),
     "options": st.just({}), "subtask_type": st.none(), "immutable": st.booleans()}), min_size=1, max_size=3)


@st.composite
def messages(draw):
    return p.CeleryMessage(
        task=draw(names), args=draw(st.lists(values, max_size=4)),
        kwargs=draw(st.dictionaries(st.text(max_size=8), values, max_size=4)), id=draw(names),
        queue=draw(names), priority=draw(st.integers(0, 9)), eta=draw(epochs), expires=draw(epochs),
        retries=draw(st.integers(0, 2 ** 31)), created=0.0, root_id=draw(st.none() | names),
        time_limit=draw(limits), soft_time_limit=draw(limits), parent_id=draw(st.none() | names),
        group_id=draw(st.none() | names), link=draw(signatures), link_error=draw(signatures),
        chain=draw(signatures), ignore_result=draw(st.booleans()),
        serializer=draw(st.sampled_from(["json", "msgpack"])))


def _same(a, b):
    assert (a.task, a.id, a.queue, a.priority, a.retries, a.parent_id, a.group_id, a.ignore_result) == \
        (b.task, b.id, b.queue, b.priority, b.retries, b.parent_id, b.group_id, b.ignore_result)
    assert a.root_id == (b.root_id or b.id)
    for x, y in ((a.eta, b.eta), (a.expires, b.expires), (a.time_limit, b.time_limit),
                 (a.soft_time_limit, b.soft_time_limit)):
        assert (x is None and y is None) or x == pytest.approx(y, abs=1e-6)
    assert (a.link, a.link_error, a.chain) == (b.link, b.link_error, b.chain)


@SETTINGS
@given(messages())
def test_encode_then_decode_is_the_same_call(msg):
    if msg.serializer == "msgpack":     # msgpack has no datetime/Decimal/UUID: plain values only
        msg.args = [v for v in msg.args if isinstance(v, (int, str, float, bool, type(None)))]
        msg.kwargs = {}
    raw = p.encode_redis(msg)
    back = p.decode_redis(raw, accept=("json", "msgpack"))
    _same(back, msg)
    assert back.args == list(msg.args) and back.kwargs == msg.kwargs
    # and the element is kombu's: JSON, base64 body, a delivery tag
    element = json.loads(raw)
    assert element["properties"]["body_encoding"] == "base64" and p.delivery_tag(raw)
    assert element["headers"]["task"] == msg.task and element["properties"]["delivery_info"]["routing_key"] == msg.queue


def test_kombu_type_wrappers_decode_to_the_same_values():
    when = dt.datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone.utc)
    value = {"when": when, "day": when.date(), "clock": dt.time(7, 8, 9), "amount": decimal.Decimal("12.50"),
             "ref": uuid.UUID(int=7), "text": b"hello", "raw": b"\xff\x00"}
    text = p.json_dumps(value)
    assert '{"__type__": "uuid", "__value__": {"hex": "' in text
    assert '{"__type__": "base64", "__value__": "/wA="}' in text and '"__type__": "bytes"' in text
    assert p.json_loads(text) == value


@SETTINGS
@given(st.binary(max_size=300))
def test_arbitrary_bytes_raise_only_the_protocol_error(raw):
    with pytest.raises(p.CeleryMessageError):
        p.decode_redis(raw)


json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=10), c,
                                                                                         max_size=5), max_leaves=20)
HEADER_KEYS = ["task", "id", "eta", "expires", "retries", "timelimit", "root_id", "parent_id", "group",
               "ignore_result"]


@SETTINGS
@given(st.dictionaries(st.sampled_from(HEADER_KEYS), json_values), json_values,
       st.sampled_from(["application/json", "application/x-msgpack", "application/x-python-serialize",
                        "text/plain", 7]),
       st.dictionaries(st.sampled_from(["priority", "delivery_info", "body_encoding", "delivery_tag"]), json_values))
def test_arbitrary_envelopes_raise_only_the_protocol_error(headers, body, content_type, props):
    element = {"body": base64.b64encode(json.dumps(body).encode()).decode(), "content-type": content_type,
               "content-encoding": "utf-8", "headers": headers, "properties": dict(props, body_encoding="base64")}
    try:
        msg = p.decode_redis(json.dumps(element), accept=("json", "msgpack"))
    except p.CeleryMessageError as exc:
        assert isinstance(exc, MessageError) and str(exc)
    else:                   # what decodes is runnable: the fields have their types
        assert isinstance(msg.task, str) and isinstance(msg.id, str) and isinstance(msg.kwargs, dict)
        assert isinstance(msg.args, list) and 0 <= msg.priority <= 9


@SETTINGS
@given(st.lists(json_values, min_size=3, max_size=3) | json_values)
def test_arbitrary_bodies_raise_only_the_protocol_error(body):
    env = p.Envelope(json.dumps(body).encode(), "application/json", "utf-8", {"task": "t", "id": "i"}, {})
    try:
        p.decode(env)
    except p.CeleryMessageError:
        pass


@pytest.mark.parametrize("raw, reason", [
    (b"not json", "not a kombu message"),
    (b"[1, 2]", "not an object"),
    (json.dumps({"body": "!!", "content-type": "application/json", "content-encoding": "utf-8", "headers": {},
                 "properties": {"body_encoding": "base64"}}), "base64"),
    (json.dumps({"body": "e30=", "content-type": "application/json", "content-encoding": "utf-8", "headers": {},
                 "properties": {"body_encoding": "base64"}}), "protocol 1"),
    (json.dumps({"body": base64.b64encode(b"[[], {}]").decode(), "content-type": "application/json",
                 "content-encoding": "utf-8", "headers": {"task": "t", "id": "i"},
                 "properties": {"body_encoding": "base64"}}), "[args, kwargs, embed]"),
    (json.dumps({"body": base64.b64encode(b'[[], {}, {}]').decode(), "content-type": "application/json",
                 "content-encoding": "utf-8", "headers": {"task": "t", "id": "i", "eta": "tomorrow"},
                 "properties": {"body_encoding": "base64"}}), "ISO 8601"),
    (json.dumps({"body": base64.b64encode(b'[[], {"a": {"__type__": "nope", "__value__": 1}}, {}]').decode(),
                 "content-type": "application/json", "content-encoding": "utf-8",
                 "headers": {"task": "t", "id": "i"}, "properties": {"body_encoding": "base64"}}), "kombu JSON type"),
    (json.dumps({"body": "gAR9lC4=", "content-type": "application/x-python-serialize",
                 "content-encoding": "binary", "headers": {"task": "t", "id": "i"},
                 "properties": {"body_encoding": "base64"}}), "accept_content has no 'pickle'"),
])
def test_each_malformed_message_says_why(raw, reason):
    with pytest.raises(p.CeleryMessageError, match=reason.replace("[", r"\[").replace("]", r"\]")):
        p.decode_redis(raw)


def test_a_plain_task_message_encodes_with_celery_defaults():
    msg = TaskMessage("shop.add", [1, 2], {"k": 3}, id="abc", queue="celery", eta=2e9, time_limit=5.0)
    env = p.encode(msg)
    assert env.headers["eta"] == "2033-05-18T03:33:20+00:00" and env.headers["timelimit"] == [5.0, None]
    assert env.headers["root_id"] == "abc" and env.headers["argsrepr"] == "[1, 2]" or \
        env.headers["argsrepr"] == "(1, 2)"
    assert json.loads(env.body) == [[1, 2], {"k": 3}, {"callbacks": None, "errbacks": None, "chain": None,
                                                         "chord": None}]
    assert env.content_type == "application/json" and env.properties["delivery_info"]["routing_key"] == "celery"


def test_a_retry_keeps_celery_headers_and_counts_one_more():
    raw = p.encode_redis(p.CeleryMessage("t", [1], {}, id="x", queue="q", headers={"origin": "far", "argsrepr": "(1,)"}))
    msg = p.decode_redis(raw)
    again = msg.for_retry(eta=3e9)
    env = p.encode(again)
    assert isinstance(again, p.CeleryMessage) and env.headers["retries"] == 1 and env.headers["origin"] == "far"
    assert env.headers["eta"].startswith("2065-")


def test_celery_queues_on_a_broker_without_celery_support_is_a_config_error():
    from greenq.config import load
    from greenq.exceptions import ConfigError
    with pytest.raises(ConfigError, match="amqp://, pyamqp:// and amqps:// brokers only"):
        load(search=False, env={}, overrides={("greenq", "broker_url"): "sqlite:///tmp/x.db",
                                              ("greenq", "celery_queues"): "celery"})
    for url in ("amqp://h/", "pyamqp://h/"):     # RabbitMQ: docs/celery.md
        assert load(search=False, env={}, overrides={("greenq", "broker_url"): url, ("greenq", "celery_queues"):
                                                     "celery"}).celery_queues == ["celery"]
    cfg = load(search=False, env={}, overrides={("greenq", "broker_url"): "redis://h/0",
                                                ("greenq", "celery_queues"): "celery, reports"})
    assert cfg.celery_queues == ["celery", "reports"]
