"""The caller's hot path (issue 22, item 1): what was made cheaper writes the
same bytes and refuses the same input as the general code beside it."""
from __future__ import annotations

import os
import re
import time
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



# -- enqueue_many: a batch builds and encodes each message as one call does ----------------------
BATCH_NOW = 1_700_000_000.25


def _batch_app(**settings):
    app = GreenQ("t", broker="memory://client-path-batch", config_file=False, **settings)
    app.config.set("task:shop.conf", "priority", 7, origin="test")
    app.config.set("task:shop.conf", "expires", 60, origin="test")
    app.config.set("task:not.here", "queue", "elsewhere", origin="test")
    app.config.set("routes", "routed.*", "by-route", origin="test")

    @app.task(name="shop.io", queue="io", priority=2, expires=30, soft_time_limit=5, time_limit=10)
    def io(*args, **kwargs):
        pass

    @app.task(name="shop.conf", ignore_result=True)
    def conf(*args, **kwargs):
        pass

    @app.task(name="routed.one")
    def routed(*args, **kwargs):
        pass
    return app


_BATCH_CALLS = [
    ("shop.io", (1, "two"), {"x": 3.0}, {}), ("shop.io", [], None, None), ("shop.conf", (), {}, {}),
    ("routed.one", ("ü",), {}, {}), ("not.here", (None, True), {}, {}), ("free.task", (), None, {}),
    ("shop.io", ({"nested": [1, 2]},), {"k": [None]}, {}),
    ("shop.io", (1,), {}, {"queue": "q2", "priority": 4, "countdown": 10, "task_id": "given-id"}),
    ("shop.conf", (), {}, {"ignore_result": False, "expires": 5, "time_limit": 3}),
    ("shop.io", (), {}, {"eta": BATCH_NOW - 1}), ("shop.io", (2,), {}, {}),
]


def test_a_batch_builds_each_message_as_build_does_with_one_clock_read():
    app = _batch_app()
    builder = app.builder
    record = app.signature("shop.io", (5,), link=app.signature("shop.conf")).to_dict()
    calls = [*_BATCH_CALLS, record, *_BATCH_CALLS[:3]]
    batch = builder.build_many(calls, now=BATCH_NOW)
    one_by_one = [builder.build_record(call, now=BATCH_NOW) if type(call) is dict
                  else builder.build(*call, now=BATCH_NOW) for call in calls]
    assert len(batch) == len(calls)
    for made, single in zip(batch, one_by_one):
        assert made.id != single.id and len(made.id) == 36 or made.id == single.id == "given-id"
        made.id = single.id
        assert made == single
        assert app.codec.encode(made) == app.codec.encode(single)
    assert [m.queue for m in batch[:6]] == ["io", "io", "default", "by-route", "elsewhere", "default"]
    assert batch[2].priority == 7 and batch[2].expires == BATCH_NOW + 60 and batch[2].reply_to is None
    assert batch[7].eta == BATCH_NOW + 10 and batch[9].eta is None
    assert {m.created for m in batch} == {BATCH_NOW} and batch[-1].link is None and batch[-4].link
    clocked = builder.build_many(calls[:3])                  # no now given: one clock read for all
    assert len({id(m.created) for m in clocked}) == 1 and abs(clocked[0].created - time.time()) < 60


def test_a_batch_refuses_each_bad_call_as_build_does_and_remembers_no_bad_name():
    app = _batch_app()
    builder = app.builder
    app.config.set("task:bad.limits", "soft_time_limit", 20, origin="test")
    app.config.set("task:bad.limits", "time_limit", 10, origin="test")
    app.config.set("task:bad.queue", "queue", "é" * 128, origin="test")
    deep: list = []
    for _ in range(150):
        deep = [deep]
    for bad in [("", (), {}, {}), (5, (), {}, None), ("t\x00", (), {}, {}), ("t", "notalist", {}, {}),
                ("t", (deep,), {}, {}), ("t", (), {1: "x"}, {}), ("t", (), {}, {"countdwn": 1}),
                ("t", (), {}, {"priority": 10}), ("bad.limits", (), {}, {}), ("bad.queue", (), {}, None),
                ("t", (), {}, {"queue": "q\n"}), ("t", (), {}, {"task_id": ""})]:
        with pytest.raises((TypeError, ValueError)) as single:
            builder.build(*bad, now=BATCH_NOW)
        for _ in range(2):                                   # a refused name is not remembered as good
            with pytest.raises(type(single.value), match=re.escape(str(single.value))):
                builder.build_many([_BATCH_CALLS[0], bad, _BATCH_CALLS[1]], now=BATCH_NOW)
    assert "" not in builder._task_names and "t\x00" not in builder._task_names


def test_a_batch_encodes_exactly_what_each_message_encodes_alone():
    rng = random.Random(2222)
    general = Codec()
    general._plain = False
    shared = 1796672072.9905596
    for usual in (0.0, 0.9, 1.0):
        msgs = []
        for _ in range(1500):
            msg = TaskMessage("t")
            for key, choices in _VALUES.items():
                setattr(msg, key, choices[0] if rng.random() < usual else rng.choice(choices))
            if rng.random() < 0.5:
                msg.created = shared if rng.random() < 0.5 else rng.choice([-0.0, 0.0, shared + 1, 0.5 + 0.5])
            msg.args, msg.kwargs = rng.choice(_ARGUMENTS)
            msgs.append(msg)
        for codec in (Codec(), Codec(signing_key="k" * 32)):
            many = codec.outgoing_many(msgs)
            assert [o.body for o in many] == [codec.encode(m) for m in msgs]
            assert [(o.queue, o.message_id, o.priority, o.eta) for o in many] == \
                [(m.queue, m.id, m.priority, m.eta) for m in msgs]
        assert [o.body for o in Codec().outgoing_many(msgs)] == [general.encode(m) for m in msgs]
    loop: list = []
    loop.append(loop)
    for bad, reason in ((TaskMessage("t", [object()], {}), "Object of type object is not JSON serializable"),
                        (TaskMessage("t", [loop], {}), "Circular reference detected"),
                        (TaskMessage("t", ["x" * 400], {}), "over max_message_size 300")):
        with pytest.raises(MessageError, match=reason):
            Codec(max_size=300).outgoing_many([TaskMessage("t", [1], {}), bad])


@pytest.mark.parametrize("settings", [{}, {"signing_key": "s" * 32}])
def test_enqueue_many_writes_the_bytes_delay_writes_apart_from_id_and_time(settings):
    """Time fields: created, and expires (counted from it); sig covers the id."""
    app = _batch_app(**settings)
    sent = []
    for call in _BATCH_CALLS[:7]:
        name, args, kwargs, _ = call
        sent.append(app.send_task(name, args, kwargs))
    sent += app.enqueue_many([app.signature(name, args, kwargs) for name, args, kwargs, _ in _BATCH_CALLS[:7]])
    queues = ["io", "default", "by-route", "elsewhere"]
    bodies = {d.message_id: d.body for d in app.broker.fetch(queues, 100, 0)}
    assert len(bodies) == 14

    def blanked(task_id):
        body = bytes(bodies[task_id])
        assert app.codec.decode(body).id == task_id          # signed ones check out
        body = body.replace(task_id.encode(), b"<id>")
        return re.sub(rb'"(created|expires|sig)":[^,}]+', rb'"\1":<x>', body)
    for one, batched in zip(sent[:7], sent[7:]):
        assert blanked(one.id) == blanked(batched.id)
