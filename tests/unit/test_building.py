"""Message building (greenq/building.py): a call's message is a function of
the app's settings and tasks, the target's limits and reply address and the
running task; no broker or result backend is reached to build one, and every
check on the call is made there."""
from __future__ import annotations

import collections
import datetime
import socket
import time

import pytest

from greenq import GreenQ
from greenq import building
from greenq.building import MessageBuilder, Target
from greenq.config import load
from greenq.message import Codec
from greenq.task import Request

NOW = 1_700_000_000.0


def config(**settings):
    return load(search=False, env={}, overrides={("greenq", k): v for k, v in settings.items()})


def closed_port() -> int:
    """A local port nothing listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the pure builder ------------------------------------------------------------------
def test_a_builder_without_an_app_builds_the_whole_message():
    cfg = config(default_queue="jobs")
    cfg.set("task:shop.add", "priority", 4, origin="test")
    cfg.set("task:shop.add", "time_limit", 30, origin="test")
    b = MessageBuilder(cfg, target=Target(reply_to="reply.me"))
    msg = b.build("shop.add", (2, 3), {"k": "v"}, {"countdown": 10, "expires": 60, "soft_time_limit": 5},
                  now=NOW)
    assert (msg.task, msg.args, msg.kwargs, msg.queue) == ("shop.add", [2, 3], {"k": "v"}, "jobs")
    assert (msg.priority, msg.eta, msg.expires, msg.created) == (4, NOW + 10, NOW + 60, NOW)
    assert (msg.time_limit, msg.soft_time_limit) == (None, 5.0)   # the task's 30 s is the worker's to apply
    assert msg.reply_to == "reply.me" and len(msg.id) == 36
    assert msg.root_id is msg.parent_id is None
    assert b.build("shop.add", options={"ignore_result": True}).reply_to is None
    assert Codec().decode(Codec().encode(msg)) == msg            # what the builder makes, the worker reads


def test_registered_task_options_resolve_ini_over_decorator_over_default_and_are_read_live():
    app = GreenQ("t", broker="memory://building", config_file=False)

    @app.task(name="shop.io", queue="io", priority=2, expires=30)
    def io():
        pass
    b = MessageBuilder(app.config, app.tasks)
    first = b.build("shop.io", now=NOW)
    assert (first.queue, first.priority, first.expires) == ("io", 2, NOW + 30)
    app.config.set("task:shop.io", "queue", "from-ini", origin="test")      # after the builder was made
    app.config.set("task:shop.io", "priority", 7, origin="test")
    again = b.build("shop.io", now=NOW)
    assert (again.queue, again.priority, again.expires) == ("from-ini", 7, NOW + 30)
    app.config.routes["shop.*"] = "routed"
    assert b.build("shop.other").queue == "routed" and b.route("shop.other") == "routed"
    assert b.build("other.job").queue == "default"


def test_the_context_gives_a_message_sent_from_a_task_its_parent_and_root():
    running = Request("p-1", "shop.parent", (), {}, root_id="root-1")
    b = MessageBuilder(config(), context=lambda: running)
    msg = b.build("shop.child")
    assert (msg.parent_id, msg.root_id) == ("p-1", "root-1")
    eager = Request("e-1", "shop.parent", (), {}, is_eager=True)
    msg = MessageBuilder(config(), context=lambda: eager).build("shop.child")
    assert msg.parent_id is msg.root_id is None


def test_a_record_from_a_worker_carries_its_parent_and_workflow_fields():
    parent = MessageBuilder(config(), target=Target(reply_to="reply.caller")).build("shop.a", options={"task_id": "a-1"})
    worker_side = MessageBuilder(config(), target=Target(reply_to="reply.worker"))
    record = {"task": "shop.b", "args": [1], "kwargs": {"x": 1}, "immutable": False,
              "options": {"task_id": "b-1", "queue": "q", "chain": [{"task": "shop.c"}], "group_id": "g",
                          "chord_size": 2, "chord_result": "c-1", "link": [{"task": "shop.l"}]}}
    msg = worker_side.build_record(record, (41,), {"y": 2}, parent=parent)
    assert (msg.id, msg.queue, msg.args, msg.kwargs) == ("b-1", "q", [41, 1], {"x": 1, "y": 2})
    assert (msg.parent_id, msg.root_id, msg.reply_to) == ("a-1", "a-1", "reply.caller")   # not the worker's
    assert (msg.chain, msg.group_id, msg.chord_size, msg.chord_result) == ([{"task": "shop.c"}], "g", 2, "c-1")
    assert msg.link == [{"task": "shop.l"}] and msg.link_error is None
    record["immutable"] = True
    record["options"]["ignore_result"] = True
    msg = worker_side.build_record(record, (41,), {"y": 2}, parent=parent)
    assert (msg.args, msg.kwargs, msg.reply_to) == ([1], {"x": 1}, None)


# -- every check is made, with the same messages -------------------------------------------
@pytest.mark.parametrize("name, args, options, error, text", [
    ("t", (), {"countdwn": 1}, TypeError, r"unknown option\(s\) \['countdwn'\]; expected some of \['countdown'"),
    ("", (), {}, ValueError, "task name must not be empty"),
    ("bad\x00name", (), {}, ValueError, "task name 'bad\\\\x00name' contains control characters"),
    (5, (), {}, TypeError, "task name must be a string, not int 5"),
    ("t", "notalist", {}, TypeError, "args must be a list or tuple, not str"),
    ("t", ([[[]]],), {}, None, None),
    ("t", (), {"eta": NOW, "countdown": 5}, ValueError, "pass countdown or eta, not both"),
    ("t", (), {"countdown": float("inf")}, ValueError, "countdown must be a finite number of seconds"),
    ("t", (), {"eta": "tomorrow"}, TypeError, "eta must be a datetime or epoch seconds, not str"),
    ("t", (), {"expires": "soon"}, TypeError, "expires must be a number of seconds, not str"),
    ("t", (), {"priority": 10}, ValueError, "priority must be 0-9, not 10"),
    ("t", (), {"priority": True}, TypeError, "priority must be an integer 0-9, not bool"),
    ("t", (), {"time_limit": -1}, ValueError, "time_limit must be 0 to"),
    ("t", (), {"time_limit": 5, "soft_time_limit": 9}, ValueError, r"soft_time_limit \(9 s\) is above time_limit"),
    ("t", (), {"task_id": ""}, ValueError, "task_id must not be empty"),
    ("t", (), {"task_id": "x" * 256}, ValueError, "task_id is 256 bytes long; at most 255 are allowed"),
    ("t", (), {"queue": ["q"]}, TypeError, r"queue must be a string, not list \['q'\]"),
    ("t", (), {"queue": "q\n"}, ValueError, "contains control characters"),
    ("t", (), {"queue": "é" * 128}, ValueError, "queue is 256 bytes long; at most 255 are allowed"),
])
def test_each_bad_call_is_refused_naming_what_is_wrong(name, args, options, error, text):
    b = MessageBuilder(config())
    if error is None:
        assert b.build(name, args, None, options).args == list(args)
        return
    for _ in range(2):              # a refused name is not remembered as good
        with pytest.raises(error, match=text):
            b.build(name, args, None, options)


def test_arguments_that_only_look_flat_are_still_walked_for_depth():
    deep: list = []
    for _ in range(150):
        deep = [deep]
    Pair = collections.namedtuple("Pair", "a b")          # a tuple subclass: not a scalar
    b = MessageBuilder(config())
    with pytest.raises(ValueError, match="nest more than 101 levels"):
        b.build("t", (Pair(deep, 1),))
    with pytest.raises(ValueError, match="nest more than 101 levels"):
        b.build("t", (), {"k": deep})
    with pytest.raises(TypeError, match="kwargs keys must be strings"):
        b.build("t", (), {1: "x"})


def test_a_remembered_queue_is_checked_against_the_limit_of_each_call():
    class Shrinking(Target):
        limit = 255

        def limits(self):
            return self.limit, 255
    target = Shrinking()
    b = MessageBuilder(config(), target=target)
    queue = "q" * 240
    assert b.build("t", options={"queue": queue}).queue == queue
    target.limit = 239                    # an AMQP broker under the default key_prefix
    with pytest.raises(ValueError, match="queue is 240 bytes long; at most 239 are allowed"):
        b.build("t", options={"queue": queue})


def test_the_name_caches_are_bounded(monkeypatch):
    monkeypatch.setattr(building, "NAME_CACHE_MAX", 3)
    b = MessageBuilder(config())
    for i in range(10):
        b.build(f"task.{i}", options={"queue": f"queue.{i}"})
    assert len(b._task_names) == 3 and len(b._queue_sizes) == 3
    assert b.build("task.9", options={"queue": "queue.9"}).queue == "queue.9"     # past the bound: checked


# -- through the app, with nothing reachable --------------------------------------------------
def test_an_app_builds_messages_with_its_broker_and_backend_unreachable():
    port = closed_port()
    app = GreenQ("t", broker=f"redis://127.0.0.1:{port}/0", backend=f"redis://127.0.0.1:{port}/0",
                 config_file=False, default_queue="jobs")

    @app.task(name="shop.add", priority=3, time_limit=10)
    def add(x, y):
        return x + y
    started = time.monotonic()
    msg = app.build_message("shop.add", (2, 3), expires=datetime.datetime.fromtimestamp(NOW + 5))
    assert (msg.task, msg.args, msg.queue, msg.priority, msg.expires) == ("shop.add", [2, 3], "jobs", 3, NOW + 5)
    assert msg.reply_to is None and msg.eta is None
    linked = app.build_message("shop.add", (1, 1), link=add.s(10), queue="q")
    assert linked.queue == "q" and linked.link[0]["task"] == "shop.add" and linked.link[0]["args"] == [10]
    assert app.route("shop.add") is None and time.monotonic() - started < 5


def test_an_app_on_rabbitmq_takes_its_queue_limit_from_the_broker_without_connecting():
    port = closed_port()
    app = GreenQ("t", broker=f"amqp://guest:guest@127.0.0.1:{port}//", backend=f"redis://127.0.0.1:{port}/0",
                 config_file=False)
    assert app.build_message("t", queue="q" * 239).queue == "q" * 239
    with pytest.raises(ValueError, match="queue is 240 bytes long; at most 239 are allowed"):
        app.build_message("t", queue="q" * 240)


def test_building_opens_no_connection_to_the_broker():
    with socket.socket() as spy:            # a Redis that would see any connection made to it
        spy.bind(("127.0.0.1", 0))
        spy.listen(8)
        spy.setblocking(False)
        url = f"redis://127.0.0.1:{spy.getsockname()[1]}/0"
        app = GreenQ("t", broker=url, backend=url, config_file=False)
        for i in range(3):
            app.build_message(f"shop.t{i}", (i,), countdown=1)
        with pytest.raises(BlockingIOError):
            spy.accept()


def test_the_app_builder_follows_a_replaced_config_and_eager_runs_through_apply_eager():
    app = GreenQ("t", broker="memory://builder-swap", config_file=False)

    @app.task(name="shop.mul")
    def mul(x, y):
        return x * y
    first = app.builder
    assert app.builder is first
    app.config = config(broker_url="memory://builder-swap", default_queue="swapped")
    assert app.builder is not first and app.build_message("shop.mul", (2, 3)).queue == "swapped"
    assert app.apply_eager("shop.mul", (6, 7)).get() == 42
    with pytest.raises(KeyError, match="not registered"):
        app.apply_eager("shop.nothing")
