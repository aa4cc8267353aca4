"""What a task sees of its own call in a real worker (threads driver, memory
broker): ``self.request`` (a WorkerRequest: its fields read from the message
at their first read) and its arguments (called plainly for up to three
positional ones, with ``*args``/``**kwargs`` otherwise)."""
from __future__ import annotations

import time

from greenq import GreenQ
from greenq.drivers import get_driver
from greenq.task import Request
from greenq.worker.consumer import Worker

FIELDS = ("id", "task", "args", "kwargs", "retries", "queue", "eta", "expires", "root_id", "delivery_info",
          "is_eager", "reply_to", "priority", "parent_id", "group_id")


def make_app():
    return GreenQ("t", broker=f"memory://{time.monotonic_ns()}")


def run(app, queues=("default",)):
    worker = Worker(app, get_driver("threads"), queues=list(queues), burst=True, concurrency=2, fetch_timeout=0.1)
    assert worker.run() == 0
    return worker


def test_a_running_task_reads_every_field_of_its_request():
    app = make_app()
    seen = {}

    @app.task(bind=True)
    def look(self, a, b=None):
        request = self.request
        assert isinstance(request, Request)
        before = set(vars(request))
        seen["fields"] = {name: getattr(request, name) for name in FIELDS}
        seen["same_info"] = request.delivery_info is request.delivery_info
        seen["unread_not_copied"] = before <= {"task"}     # (Task.request read it: is it ours?)
        request.note = "mine"                 # a task may set attributes on its request
        seen["note"] = self.request.note
        try:
            request.no_such_field
        except AttributeError as exc:
            seen["missing"] = str(exc)
        if not request.retries:
            raise self.retry(countdown=0)

    sent = look.apply_async(args=[1], kwargs={"b": [2]}, queue="q2", priority=4, expires=600)   # seconds
    expires = time.time() + 600
    run(app, ["q2"])
    fields = seen["fields"]
    assert fields == {"id": sent.id, "task": look.name, "args": [1], "kwargs": {"b": [2]}, "retries": 1,
                      "queue": "q2", "eta": fields["eta"], "expires": fields["expires"], "root_id": sent.id,
                      "delivery_info": {"queue": "q2", "deliveries": 1}, "is_eager": False, "reply_to": None,
                      "priority": 4, "parent_id": None, "group_id": None}
    assert fields["eta"] is not None          # the retry's (countdown=0): the second run
    assert expires - 60 < fields["expires"] <= expires
    assert seen["same_info"] and seen["unread_not_copied"] and seen["note"] == "mine"
    assert seen["missing"] == "'WorkerRequest' object has no attribute 'no_such_field'"


def test_arguments_reach_the_function_however_many():
    app = make_app()
    got = []

    @app.task
    def plain(*args, **kwargs):
        got.append(("plain", args, kwargs))

    @app.task(bind=True)
    def bound(self, *args, **kwargs):
        got.append(("bound", args, kwargs, self.name))

    @app.task
    def two(a, b):
        got.append(("two", a, b))

    @app.task
    def wrong(a):
        got.append(("wrong", a))

    calls = [(), (1,), (1, [2]), (1, 2, {"3": 3}), (1, 2, 3, 4)]
    for args in calls:
        plain.delay(*args)
        bound.delay(*args)
    plain.delay(1, k="v")
    bound.delay(k="v")
    two.delay(1, b=2)
    failed = wrong.delay(1, 2)                # a wrong call fails as it would with *args
    worker = run(app)
    expected = [("plain", args, {}) for args in calls] + [("plain", (1,), {"k": "v"})] + \
               [("bound", args, {}, bound.name) for args in calls] + [("bound", (), {"k": "v"}, bound.name)] + \
               [("two", 1, 2)]
    assert sorted(map(repr, got)) == sorted(map(repr, expected))
    assert worker.stats.failed == 1 and worker.stats.succeeded == len(expected)
    assert "takes 1 positional argument but 2 were given" in str(failed.get(propagate=False, timeout=5))
