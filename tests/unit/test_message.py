import json

import pytest

from greenq.exceptions import MessageError
from greenq.message import Codec, TaskMessage


def test_roundtrip_json_inline():
    codec = Codec()
    msg = TaskMessage(task="shop.add", args=[1, "x"], kwargs={"k": [1, 2]}, priority=5, eta=123.5)
    data = codec.encode(msg)
    env = json.loads(data)
    assert env["v"] == 1 and env["ct"] == "json" and env["args"] == [1, "x"]
    back = codec.decode(data)
    assert (back.task, back.args, back.kwargs, back.priority, back.eta, back.id) == \
        ("shop.add", [1, "x"], {"k": [1, 2]}, 5, 123.5, msg.id)


def test_roundtrip_every_field():
    """Each envelope field comes back in its own attribute (the decoder's fast
    path builds the message positionally)."""
    codec = Codec()
    msg = TaskMessage(task="shop.add", args=[1], kwargs={"k": 2}, id="id-1", queue="q", priority=7,
                      eta=1000.5, expires=2000.5, retries=3, created=999.5, root_id="root-1",
                      time_limit=30.0, soft_time_limit=20.0, reply_to="replies", parent_id="parent-1",
                      group_id="group-1", chord_size=2, link=[{"task": "a"}], link_error=[{"task": "b"}],
                      chain=[{"task": "c"}])
    assert codec.decode(codec.encode(msg)) == msg
    plain = TaskMessage(task="t", id="i", created=5.0)
    assert codec.decode(codec.encode(plain)) == TaskMessage(task="t", args=[], id="i", created=5.0)


@pytest.mark.parametrize("serializer", ["pickle", "msgpack"])
def test_other_serializers(serializer):
    pytest.importorskip(serializer)
    codec = Codec(serializer, accept=[serializer], signing_key="k" if serializer == "pickle" else "")
    back = codec.decode(codec.encode(TaskMessage(task="t", args=[b"\x00bytes"] if serializer == "pickle" else [1])))
    assert back.task == "t"
    with pytest.raises(MessageError, match="accept_content"):
        Codec(signing_key="k" if serializer == "pickle" else "").decode(codec.encode(TaskMessage(task="t")))


def test_signing():
    signer = Codec(signing_key="k1")
    data = signer.encode(TaskMessage(task="t", args=[1]))
    assert signer.decode(data).args == [1]
    forged = data.replace(b"[1]", b"[2]")
    with pytest.raises(MessageError, match="forged"):
        signer.decode(forged)
    with pytest.raises(MessageError, match="unsigned"):
        signer.decode(Codec().encode(TaskMessage(task="t")))
    with pytest.raises(MessageError, match="forged"):
        Codec(signing_key="other").decode(data)


@pytest.mark.parametrize("data", [b"\xff\xfe", b"[]", b'{"v":1}', b'{"v":9,"id":"a","task":"t"}',
                                  b'{"v":1,"id":"a","task":"t","args":{}}'])
def test_malformed_bytes_raise_message_error(data):
    with pytest.raises(MessageError):
        Codec().decode(data)


def test_max_size_refused_at_encode():
    with pytest.raises(MessageError, match="max_message_size"):
        Codec(max_size=100).encode(TaskMessage(task="t", args=["x" * 200]))


def test_unserializable_arguments():
    with pytest.raises(MessageError, match="cannot serialize"):
        Codec().encode(TaskMessage(task="t", args=[object()]))


def test_results_roundtrip_and_unserializable_result():
    codec = Codec()
    assert codec.decode_result(codec.encode_result({"id": "r1", "state": "SUCCESS", "result": [1]}),
                               "r1")["result"] == [1]
    meta = codec.decode_result(codec.encode_result({"id": "r2", "state": "SUCCESS", "result": object()}), "r2")
    assert meta["state"] == "FAILURE" and "not serializable" in meta["exc"]["message"]


def test_names_found_good_are_remembered_and_a_bad_one_is_still_refused():
    """The decoder remembers task and queue names that passed the name rule
    (a set lookup on the hot path, not the rule again); only good names go
    in, and a bad one is refused however many good ones came before."""
    from greenq import message
    codec = Codec()
    good = codec.encode(TaskMessage(task="shop.remembered", queue="q.remembered"))
    assert codec.decode(good).task == "shop.remembered" and codec.decode(good).queue == "q.remembered"
    assert {"shop.remembered", "q.remembered"} <= message._KNOWN_NAMES
    for task, queue in (("shop.remembered\x00", "q.remembered"), ("shop.remembered", "q.remembered\x7f"),
                        ("x" * 300, "q.remembered"), ("shop.remembered", ["q.remembered"])):
        env = json.loads(good)
        env["task"], env["queue"] = task, queue
        with pytest.raises(MessageError):
            codec.decode(json.dumps(env).encode())
        assert task not in message._KNOWN_NAMES or task == "shop.remembered"
    assert len(message._KNOWN_NAMES) <= message._KNOWN_NAMES_MAX


#: a header the plainest envelope (``_PLAIN_KEYS``) may carry wrong, and values that are wrong for it
_BAD_PLAIN_VALUES = [("task", ""), ("task", "a\x00b"), ("task", 5), ("task", "x" * 300), ("id", ""),
                     ("id", "a\nb"), ("id", None), ("queue", "q\x7f"), ("queue", 3), ("priority", 10),
                     ("priority", -1), ("priority", True), ("priority", 1.5), ("retries", -1),
                     ("retries", "1"), ("retries", 2 ** 31 + 1), ("created", -1.0), ("created", "now"),
                     ("created", 1e300), ("reply_to", 5)]


@pytest.mark.parametrize("field,value", _BAD_PLAIN_VALUES)
def test_the_plainest_envelope_is_checked_as_any_other(field, value):
    """An envelope with exactly the keys greenq's client writes for a plain
    delay() (and maybe reply_to) takes a shorter path in the decoder, which
    must refuse what the full rules refuse, with the same reason: the same
    envelope with one more (empty) header field takes the full rules."""
    codec = Codec()
    env = {"v": 1, "ct": "json", "id": "i-1", "task": "shop.add", "queue": "default", "priority": 0,
           "retries": 0, "created": 5.0, "reply_to": "r", "args": [1], "kwargs": {}}
    assert codec.decode(json.dumps(env).encode()) == codec.decode(json.dumps({**env, "root_id": None}).encode())
    env[field] = value
    errors = []
    for shape in (env, {**env, "root_id": None}):
        with pytest.raises(MessageError) as caught:
            codec.decode(json.dumps(shape).encode())
        errors.append(str(caught.value))
    assert errors[0] == errors[1]


def test_the_plainest_envelope_with_and_without_reply_to():
    codec = Codec()
    for reply_to in (None, "replies"):
        msg = TaskMessage(task="t", args=[1, "a"], kwargs={"k": None}, id="i", created=7.5, reply_to=reply_to)
        data = codec.encode(msg)
        assert set(json.loads(data)) == {"v", "ct", "id", "task", "queue", "priority", "retries", "created",
                                         "args", "kwargs"} | ({"reply_to"} if reply_to else set())
        assert codec.decode(data) == msg
