"""Property-based tests of the one validating decoder (greenq.message.Codec.decode).

Whatever bytes reach a worker, decoding raises nothing but MessageError, and a
message it accepts is one the worker can run: every field has its type and
range.  Hypothesis draws random JSON shapes, wrong types in each field, deep
nesting, huge numbers and non-UTF-8 bytes.
"""
from __future__ import annotations

import json
import math
import time

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from greenq.exceptions import MessageError  # noqa: E402
from greenq.message import Codec, TaskMessage  # noqa: E402
from greenq.validation import MAX_NAME_BYTES  # noqa: E402

CODECS = [Codec(), Codec(signing_key="k"), Codec(serializer="msgpack", accept=("json", "msgpack")),
          Codec(serializer="pickle", accept=("json", "pickle"), signing_key="k")]   # pickle needs a key
FIELDS = ["v", "ct", "id", "task", "queue", "priority", "eta", "expires", "retries", "created",
          "root_id", "time_limit", "soft_time_limit", "reply_to", "args", "kwargs", "body", "sig"]

json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(10 ** 40), max_value=10 ** 40)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20))
json_values = st.recursive(json_scalars, lambda children: st.lists(children, max_size=4)
                           | st.dictionaries(st.text(max_size=8), children, max_size=4), max_leaves=20)
SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def good() -> dict:
    return {"v": 1, "ct": "json", "id": "4a3e7c9e-1", "task": "shop.add", "queue": "default",
            "priority": 3, "retries": 0, "created": time.time(), "args": [1, 2], "kwargs": {"k": 1}}


def assert_runnable(msg: TaskMessage) -> None:
    """What the worker relies on for a decoded message."""
    assert isinstance(msg.task, str) and 0 < len(msg.task.encode()) <= MAX_NAME_BYTES
    assert isinstance(msg.id, str) and 0 < len(msg.id.encode()) <= MAX_NAME_BYTES
    assert isinstance(msg.queue, str) and msg.queue
    assert type(msg.priority) is int and 0 <= msg.priority <= 9
    assert type(msg.retries) is int and msg.retries >= 0
    assert isinstance(msg.args, list) and isinstance(msg.kwargs, dict)
    assert all(isinstance(k, str) for k in msg.kwargs)
    for value in (msg.eta, msg.expires, msg.time_limit, msg.soft_time_limit):
        assert value is None or (isinstance(value, float) and math.isfinite(value))
    assert isinstance(msg.created, float) and math.isfinite(msg.created)
    for value in (msg.root_id, msg.reply_to):
        assert value is None or isinstance(value, str)
    time.monotonic() + (msg.time_limit or 0)          # the arithmetic that once killed a runner


def decode_total(codec: Codec, data) -> None:
    try:
        msg = codec.decode(data)
    except MessageError as exc:
        assert str(exc)                                    # a reason for the dead letter
    else:
        assert_runnable(msg)


@SETTINGS
@given(st.binary(max_size=300))
def test_random_bytes(data):
    for codec in CODECS:
        decode_total(codec, data)


@SETTINGS
@given(json_values)
def test_random_json_shapes(value):
    data = json.dumps(value).encode()
    for codec in CODECS:
        decode_total(codec, data)


@SETTINGS
@given(st.sampled_from(FIELDS), json_values)
def test_wrong_value_in_each_field(field, value):
    env = good()
    env[field] = value
    data = json.dumps(env).encode()
    decode_total(CODECS[0], data)
    decode_total(CODECS[2], data)


@SETTINGS
@given(st.sampled_from(FIELDS), st.integers(min_value=10, max_value=6000))
def test_huge_numbers(field, digits):
    env = json.dumps(good())
    data = (env[:-1] + f', "{field}": 1{"0" * digits}}}').encode()
    decode_total(CODECS[0], data)


@SETTINGS
@given(st.integers(min_value=1, max_value=200_000), st.sampled_from(["[", "{\"a\":"]),
       st.sampled_from(["args", "kwargs", "task", "eta"]))
def test_deep_nesting(depth, opener, field):
    closer = "]" if opener == "[" else "}"
    nested = opener * depth + ("1" if opener != "[" else "") + closer * depth
    env = json.dumps(good())
    data = (env[:-1] + f', "{field}": {nested}}}').encode()
    decode_total(CODECS[0], data)


@SETTINGS
@given(st.binary(min_size=1, max_size=8), st.integers(min_value=0, max_value=200))
def test_non_utf8_inside_a_good_message(garbage, where):
    data = json.dumps(good()).encode()
    where = min(where, len(data))
    decode_total(CODECS[0], data[:where] + b"\xff" + garbage + data[where:])


@SETTINGS
@given(st.binary(max_size=200))
def test_random_base64_body_for_binary_serializers(raw):
    import base64
    env = good()
    del env["args"], env["kwargs"]
    for codec, ct in ((CODECS[2], "msgpack"), (CODECS[3], "pickle")):
        env["ct"] = ct
        env["body"] = base64.b64encode(raw).decode()
        decode_total(codec, json.dumps(env).encode())


@pytest.mark.parametrize("body", ["", b"", bytearray(b"{}"), memoryview(b"[]"), 42, None])
def test_bodies_of_any_type(body):
    with pytest.raises(MessageError):
        Codec().decode(body)


@pytest.mark.parametrize("field,value,words", [
    ("ct", ["json"], "content type"),
    ("expires", "soon", "expires"),
    ("time_limit", "5", "time_limit"),
    ("priority", 11, "priority"),
    ("retries", -1, "retries"),
    ("id", "x" * 300, "id"),
])
def test_malformed_fields_are_message_errors_naming_the_field(field, value, words):
    """Malformed fields once accepted (a list as content type, a string
    expiry or time limit, priority 11, negative retries, a 300-character id):
    each is a MessageError naming the field."""
    env = good()
    env[field] = value
    with pytest.raises(MessageError, match=words):
        Codec().decode(json.dumps(env).encode())


def test_good_messages_round_trip():
    for codec in CODECS:
        msg = TaskMessage(task="shop.add", args=[1, [2, {"x": 3}]], kwargs={"k": "v"}, priority=7,
                          eta=time.time() + 5, expires=time.time() + 60, time_limit=5.0,
                          soft_time_limit=4, reply_to="r")
        back = codec.decode(codec.encode(msg))
        assert (back.task, back.args, back.kwargs, back.priority, back.time_limit) == \
            ("shop.add", [1, [2, {"x": 3}]], {"k": "v"}, 7, 5.0)
        assert_runnable(back)


@pytest.mark.parametrize("field", ["task", "id", "queue"])
def test_lone_surrogates_in_names_are_refused(field):
    """Not UTF-8: a result keyed by such an id could never be stored (found by
    tests/e2e/transport_redis/test_redis_malformed.py: the fast path once let it through)."""
    env = good()
    env[field] = "\ud800x"
    with pytest.raises(MessageError, match=field):
        Codec().decode(json.dumps(env).encode())
