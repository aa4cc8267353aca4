"""The RabbitMQ conformance fixtures: messages unmodified Celery clients
(5.3.6, 5.5.3, 5.7.0) published to RabbitMQ
(tests/fixtures/celery/amqp-celery-<version>.json, made by capture_amqp.py),
each decoded by greenq.celery.protocol.parse_amqp and decode, checked field
by field, and published again by greenq as the same
AMQP message (celery_broker.celery_publish)."""
from __future__ import annotations

import base64
import datetime as dt
import decimal
import glob
import json
import os
import uuid

import pytest
from amqp.serialization import decode_properties_basic

from greenq.brokers.base import Outgoing
from greenq.celery import protocol as p
from greenq.transports.amqp.celery_broker import celery_publish
from greenq.transports.amqp.common import Settings

HERE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "celery")
FILES = sorted(glob.glob(os.path.join(HERE, "amqp-celery-*.json")))
FIXED = dt.datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone.utc).timestamp()


def _cases():
    for path in FILES:
        data = json.load(open(path))
        for case in data["cases"]:
            yield pytest.param(data, case, id=f"amqp-{data['celery']}-{case['case']}")


def test_there_are_rabbitmq_fixtures_of_several_celery_releases():
    assert FILES and all(json.load(open(path))["broker"] == "amqp" for path in FILES)
    versions = {json.load(open(path))["celery"] for path in FILES}
    assert {"5.3.6", "5.5.3", "5.7.0"} <= versions


def test_every_release_captured_every_case():
    cases = {json.load(open(path))["celery"]: [c["case"] for c in json.load(open(path))["cases"]] for path in FILES}
    assert len({tuple(names) for names in cases.values()}) == 1, cases


def _envelopes(case):
    return [(m, p.parse_amqp(base64.b64decode(m["body"]), m["properties"], m["exchange"], m["routing_key"]))
            for m in case["messages"]]


def _decoded(case, accept=("json", "msgpack")):
    return [(m, p.decode(env, accept, m["queue"])) for m, env in _envelopes(case)]


@pytest.mark.parametrize("data, case", list(_cases()))
def test_each_captured_message_decodes(data, case):
    name = case["case"]
    if name == "pickle":
        with pytest.raises(p.CeleryMessageError, match="pickle"):
            _decoded(case)
        [(_, msg)] = _decoded(case, accept=("json", "pickle"))
        assert msg.args == [2, 3]
        return
    decoded = _decoded(case)
    assert len(decoded) == (2 if name == "group" else 1)
    for m, msg in decoded:
        assert msg.task.startswith(("fixtures.", "remote.")) and msg.properties["correlation_id"] == msg.id
        assert isinstance(msg.headers.get("argsrepr"), str) and msg.properties.get("reply_to")
        assert msg.queue == m["queue"] == ("reports" if name == "queue_reports" else "celery")
        assert msg.properties["delivery_info"] == {"exchange": "", "routing_key": m["queue"]}
    m, msg = decoded[0]
    if name == "group":
        assert len({x.group_id for _, x in decoded}) == 1 and msg.group_id
        assert sorted(x.args for _, x in decoded) == [[1, 1], [2, 2]]
        return
    if name == "chain":
        assert [s["task"] for s in msg.chain] == ["fixtures.add", "fixtures.echo"]   # running order
        assert msg.args == [1, 2]
        return
    assert msg.id == case["result_id"] and msg.root_id == msg.id
    assert msg.retries == (2 if name == "retries_header" else 0)
    if name in ("delay", "msgpack"):
        assert (msg.task, msg.args, msg.kwargs, msg.eta, msg.expires) == ("fixtures.add", [2, 3], {}, None, None)
        assert msg.serializer == ("msgpack" if name == "msgpack" else "json") and not msg.ignore_result
    elif name == "apply_async_countdown":
        assert msg.eta is not None and msg.expires is None
    elif name == "apply_async_eta":
        assert msg.eta == pytest.approx(FIXED, abs=1e-3)
    elif name == "apply_async_expires":
        assert msg.expires == pytest.approx(FIXED, abs=1e-3) and msg.eta is None
    elif name == "apply_async_expires_seconds":
        assert msg.expires is not None and msg.eta is None
    elif name == "priority":
        assert msg.priority == 7
    elif name == "time_limits":
        assert (msg.time_limit, msg.soft_time_limit) == (20, 10)
    elif name == "link":
        assert [s["task"] for s in msg.link] == ["fixtures.echo"] and msg.link_error is None
    elif name == "link_error":
        assert [s["task"] for s in msg.link_error] == ["fixtures.echo"] and msg.link_error[0]["args"] == ["failed"]
    elif name == "send_task":
        assert (msg.task, msg.args, msg.kwargs) == ("remote.name", [1], {"a": "b"})
    elif name == "typed_kwargs":
        k = msg.kwargs
        when = dt.datetime.fromtimestamp(FIXED, dt.timezone.utc)
        assert k["when"] == when and k["day"] == when.date() and k["clock"] == dt.time(7, 8, 9)
        assert k["amount"] == decimal.Decimal("12.50")
        assert k["ref"] == uuid.UUID("12345678-1234-5678-1234-567812345678")
        assert k["text_bytes"] == b"hello" and k["raw_bytes"] == b"\xff\x00\x01"
        assert k["nested"] == {"list": [1, 2.5, None, True]} and k["unicode"] == "h\u00e9llo \u2603"
    elif name == "ignore_result":
        assert msg.ignore_result and msg.args == [1]


@pytest.mark.parametrize("data, case", list(_cases()))
def test_greenq_publishes_each_one_again_as_the_same_amqp_message(data, case):
    """What greenq carries inside (kombu's JSON element) goes out as Celery's
    AMQP message: the same body, properties and headers, routed the same way."""
    names = Settings(celery_queues=frozenset({"celery", "reports"}))
    for m, env in _envelopes(case):
        body, props, exchange, key = celery_publish(Outgoing(m["queue"], p.redis_element(env), "x"), 0.0, names)
        sent, _ = decode_properties_basic(props, 0)
        original = m["properties"]
        assert (body, exchange, key) == (base64.b64decode(m["body"]), m["exchange"], m["routing_key"])
        assert sent["application_headers"] == original["application_headers"]
        for prop in ("content_type", "content_encoding", "correlation_id", "reply_to", "delivery_mode"):
            assert sent[prop] == original[prop], prop
        assert sent.get("priority", 0) == original.get("priority", 0)
