"""The conformance fixtures: messages written by unmodified Celery clients
(tests/fixtures/celery/celery-<version>.json, made by capture.py), each decoded
by greenq.celery.protocol and checked field by field."""
from __future__ import annotations

import datetime as dt
import decimal
import glob
import json
import os
import uuid

import pytest

from greenq.celery import protocol as p

HERE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "celery")
FILES = sorted(glob.glob(os.path.join(HERE, "celery-*.json")))
FIXED = dt.datetime(2031, 5, 6, 7, 8, 9, 123456, tzinfo=dt.timezone.utc).timestamp()
SEP = "\x06\x16"


def _cases():
    for path in FILES:
        data = json.load(open(path))
        for case in data["cases"]:
            yield pytest.param(data, case, id=f"{data['celery']}-{case['case']}")


def test_there_are_fixtures_of_several_celery_versions():
    versions = {json.load(open(path))["celery"] for path in FILES}
    assert len(versions) >= 2, versions


def _decoded(case, accept=("json", "msgpack")):
    out = []
    for m in case["messages"]:
        queue = m["key"].split(SEP)[0]
        out.append((m["key"], p.decode_redis(m["raw"], accept=accept, queue=queue)))
    return out


@pytest.mark.parametrize("data, case", list(_cases()))
def test_each_captured_message_decodes(data, case):
    name = case["case"]
    if name == "pickle":
        with pytest.raises(p.CeleryMessageError, match="pickle"):
            _decoded(case)
        [(_, msg)] = _decoded(case, accept=("json", "pickle"))    # where accept_content allows it
        assert msg.args == [2, 3]
        return
    decoded = _decoded(case)
    assert decoded, "the client wrote something"
    for key, msg in decoded:
        assert msg.id and msg.task.startswith(("fixtures.", "remote."))
        assert isinstance(msg.headers.get("argsrepr"), str) and msg.properties.get("delivery_tag")
        assert msg.queue == ("reports" if name == "queue_reports" else "celery")
    [(key, msg)] = decoded[:1] if name in ("chord", "group") else decoded
    if name in ("chord", "group"):
        assert len(decoded) == 2 and len({m.group_id for _, m in decoded}) == 1 and decoded[0][1].group_id
        assert sorted(m.args for _, m in decoded) == [[1, 1], [2, 2]]
        if name == "chord":
            assert all(m.chord and m.chord["task"] == "fixtures.sum_all" for _, m in decoded)
        return
    expected_root = msg.id
    if name == "chain":
        assert [s["task"] for s in msg.chain] == ["fixtures.add", "fixtures.echo"]   # running order
        assert msg.chain[0]["args"] == [3] and msg.chain[1]["kwargs"] == {"k": 1}
        assert msg.args == [1, 2]
        return
    assert msg.root_id == expected_root and msg.retries == (2 if name == "retries_header" else 0)
    if name == "delay" or name == "msgpack":
        assert (msg.task, msg.args, msg.kwargs, msg.eta, msg.expires) == ("fixtures.add", [2, 3], {}, None, None)
        assert key == "celery" and msg.priority == 0 and not msg.ignore_result
        assert msg.serializer == ("msgpack" if name == "msgpack" else "json")
    elif name == "apply_async_countdown":
        assert msg.eta is not None and msg.expires is None
    elif name == "apply_async_eta":
        assert msg.eta == pytest.approx(FIXED, abs=1e-3)
    elif name == "apply_async_expires":
        assert msg.expires == pytest.approx(FIXED, abs=1e-3) and msg.eta is None
    elif name == "apply_async_expires_seconds":
        assert msg.expires is not None and msg.eta is None
    elif name == "priority":
        assert msg.priority == 7 and key == "celery" + SEP + "6"      # kombu's step of 7
    elif name == "priority_1":
        assert msg.priority == 1 and key == "celery"
    elif name == "time_limits":
        assert (msg.time_limit, msg.soft_time_limit) == (20, 10)
    elif name == "link":
        assert [s["task"] for s in msg.link] == ["fixtures.echo"] and msg.link_error is None
    elif name == "link_error":
        assert [s["task"] for s in msg.link_error] == ["fixtures.echo"]
        assert msg.link_error[0]["args"] == ["failed"] and msg.link_error[0]["immutable"]
    elif name == "send_task":
        assert (msg.task, msg.args, msg.kwargs) == ("remote.name", [1], {"a": "b"})
    elif name == "typed_kwargs":
        k = msg.kwargs
        when = dt.datetime.fromtimestamp(FIXED, dt.timezone.utc)
        new_kombu = tuple(int(x) for x in data["kombu"].split(".")[:2]) >= (5, 3)
        assert k["nested"] == {"list": [1, 2.5, None, True]} and k["unicode"] == "h\u00e9llo \u2603"
        if new_kombu:
            assert k["when"] == when and k["day"] == when.date() and k["clock"] == dt.time(7, 8, 9)
            assert k["amount"] == decimal.Decimal("12.50")
            assert k["ref"] == uuid.UUID("12345678-1234-5678-1234-567812345678")
            assert k["text_bytes"] == b"hello" and k["raw_bytes"] == b"\xff\x00\x01"
    elif name == "ignore_result":
        assert msg.ignore_result and msg.args == [1]
    elif name == "queue_reports":
        assert key == "reports"


@pytest.mark.parametrize("data, case", list(_cases()))
def test_each_captured_message_encodes_back_to_the_same_call(data, case):
    if case["case"] == "pickle":
        return
    for key, msg in _decoded(case):
        again = p.decode_redis(p.encode_redis(msg), accept=("json", "msgpack"))
        assert (again.task, again.id, again.args, again.kwargs, again.eta, again.expires, again.chain, again.link,
                again.link_error, again.group_id, again.chord, again.retries, again.time_limit) == \
            (msg.task, msg.id, msg.args, msg.kwargs, msg.eta, msg.expires, msg.chain, msg.link, msg.link_error,
             msg.group_id, msg.chord, msg.retries, msg.time_limit)
        assert again.headers["origin"] == msg.headers["origin"]
