"""The caller's hot path (issue 22, item 1): what was made cheaper writes the
same bytes and refuses the same input as the general code beside it."""
from __future__ import annotations

import os
import random
import uuid

import pytest

from greenq import GreenQ
from greenq.building import BUILD_KEYS
from greenq.exceptions import MessageError
from greenq.message import Codec, TaskMessage, new_id


def test_task_ids_are_uuid4_text_each_given_out_once_and_never_by_a_forked_child_too():
    ids = [new_id() for _ in range(3000)]            # several batches
    assert len(set(ids)) == len(ids)
    for text in ids:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, text)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:                                     # the child: what it gives out next
        os.write(write, new_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 100).decode()
    os.close(read)
    assert uuid.UUID(child).version == 4 and child != new_id()


_VALUES = {
    "id": ["a", 'q"uo\\te\n', "é✓", None, 5], "task": ["t", "t\u2028x", None], "queue": ["default", None, 3.0],
    "priority": [0, 9, True, None, 2.0], "eta": [None, 1.5, float("nan"), 1e20, 3],
    "expires": [None, 2.25, float("inf")], "retries": [0, 3, None],
    "created": [1796672072.9905596, 0.0, None, 1, float("nan")], "root_id": [None, "r"],
    "time_limit": [None, 1.0], "soft_time_limit": [None, 0.5], "reply_to": [None, "rep", 'r"x', 4],
    "parent_id": [None, "p"], "group_id": [None, "g"], "chord_size": [None, 3, True],
    "chord_result": [None, "cr"], "link": [None, [{"task": "x"}]], "link_error": [None, []], "chain": [None]}
_ARGUMENTS = [((1, "two"), {"x": 3.0}), ([], {}),
              ([{"a": [1, 2.5, None, True]}, "ü", -0.0, float("nan")], {"k": [1], "é": {"z": None}}),
              ((10 ** 30,), {"big": 1e300})]


def test_the_one_pass_encoding_writes_exactly_what_the_envelope_dict_does():
    fast, general = Codec(), Codec()
    general._plain = False                           # always the dict of the envelope
    rng = random.Random(22)
    for usual in (0.0, 0.8, 0.95):                   # from any mix of fields to the usual message
        for _ in range(3000):
            msg = TaskMessage("t")
            for key, choices in _VALUES.items():
                setattr(msg, key, choices[0] if rng.random() < usual else rng.choice(choices))
            msg.args, msg.kwargs = rng.choice(_ARGUMENTS)
            assert fast.encode(msg) == general.encode(msg), msg


@pytest.mark.parametrize("args, kwargs, reason", [
    ((object(),), {}, "Object of type object is not JSON serializable"),
    ((), {"x": {1j}}, "Object of type set is not JSON serializable")])
def test_the_one_pass_encoding_refuses_what_the_dict_refuses_with_the_same_error(args, kwargs, reason):
    general = Codec()
    general._plain = False
    for codec in (Codec(), general):
        with pytest.raises(MessageError, match=f"cannot serialize arguments of t with json: {reason}"):
            codec.encode(TaskMessage("t", args, kwargs))
    loop: list = []
    loop.append(loop)
    with pytest.raises(MessageError, match="Circular reference detected"):
        Codec().encode(TaskMessage("t", [loop], {}))
    with pytest.raises(MessageError, match="over max_message_size 100"):
        Codec(max_size=100).encode(TaskMessage("t", ["x" * 200], {}))


def test_a_call_with_no_options_resolves_and_checks_like_one_with_options():
    app = GreenQ("t", broker="memory://client-path", config_file=False)

    @app.task(name="shop.io", queue="io", priority=2, expires=30, soft_time_limit=5, time_limit=10)
    def io():
        pass
    for options in (None, {}, {"ignore_result": False}):
        msg = app.builder.build("shop.io", (1,), {"k": "v"}, options, now=100.0)
        assert (msg.queue, msg.priority, msg.expires, msg.args, msg.kwargs) == ("io", 2, 130.0, [1], {"k": "v"})
    assert io.options_for(BUILD_KEYS) == [io.option(key) for key in BUILD_KEYS]
    app.config.set("task:shop.io", "soft_time_limit", 20, origin="test")       # now above time_limit
    for options in (None, {"queue": "q"}):
        with pytest.raises(ValueError, match="soft_time_limit .* is above time_limit"):
            app.builder.build("shop.io", options=options)
    assert io.options_for(BUILD_KEYS) == [io.option(key) for key in BUILD_KEYS]


def test_the_one_pass_redis_packer_writes_exactly_what_redis_py_packs():
    from redis._parsers.encoders import Encoder
    from redis.connection import PythonRespSerializer
    from greenq.transports.redis import resp
    packer = PythonRespSerializer(6000, Encoder("utf-8", "strict", False).encode)   # a pool's, as greenq makes it
    rng = random.Random(22)
    values = [b"", b"x", b"\r\n\x00" * 5000, "", "é✓", "key:q:default:0", 0, -7, 10 ** 30, 1.5, -0.0,
              1e300, 0.1, "a b"]
    for _ in range(2000):
        args = ["EVALSHA", *(rng.choice(values) for _ in range(rng.randrange(0, 9)))]
        assert resp.pack(args) == b"".join(packer.pack(*args)), args
    for stream, body, mid in (("P:q:default:0", b"{}", "id"), ("é", b"\r\n" * 4000, "ü" * 40), ("s", b"", "")):
        assert resp.xadd(stream, body, mid) == b"".join(packer.pack("XADD", stream, "*", "b", body, "m", mid))
    for odd in (True, None, bytearray(b"x"), memoryview(b"x"), [1]):   # redis-py's packer decides (or refuses)
        assert resp.pack(["SET", "k", odd]) is None
    assert resp.xadd("s", bytearray(b"x"), "id") is None and resp.xadd("s", b"x", 5) is None

