"""Hooks on the app (CONTRACT §8), in-process with the threads driver; the
recipes with real workers are in tests/e2e/test_hooks_e2e.py."""
from __future__ import annotations

import logging
import threading
import time

import pytest

from greenq import GreenQ
from greenq.drivers import get_driver
from greenq.worker.consumer import Worker


#: how long a burst worker's last, empty fetch waits before it stops (1 s by default)
FETCH_TIMEOUT = 0.1


def make_app(**kw):
    return GreenQ("t", broker=f"memory://{time.monotonic_ns()}", **kw)


def run_worker(app, **kw):
    kw.setdefault("concurrency", 2)
    kw.setdefault("fetch_timeout", FETCH_TIMEOUT)
    return Worker(app, get_driver("threads"), queues=["default"], burst=True, **kw).run()


def test_unknown_hook_names_the_nearest():
    app = make_app()
    with pytest.raises(ValueError, match="did you mean 'task_failure'"):
        app.on("task_failed", lambda *a: None)


def test_hooks_run_in_order_with_their_arguments():
    app = make_app()
    seen = []

    @app.task(bind=True)
    def div(self, x, y):
        return x / y

    @app.on("worker_process_init")
    def init(worker):
        seen.append(("init", worker.concurrency))

    @app.on("task_prerun")
    def pre(task, request):
        seen.append(("pre", task.name, list(request.args)))

    @app.on("task_success")
    def ok(task, request, retval):
        seen.append(("success", retval))

    @app.on("task_failure")
    def bad(task, request, exc, tb):
        seen.append(("failure", type(exc).__name__, "ZeroDivisionError" in tb))

    @app.on("task_postrun")
    def post(task, request, state, retval):
        seen.append(("post", state))

    @app.on("worker_shutdown")
    def down(worker):
        seen.append(("shutdown",))
    good, broken = div.delay(6, 3), div.delay(1, 0)
    assert run_worker(app, concurrency=1) == 0
    assert good.get(timeout=1) == 2
    name = div.name
    assert seen == [("init", 1), ("pre", name, [6, 3]), ("success", 2.0), ("post", "SUCCESS"),
                    ("pre", name, [1, 0]), ("failure", "ZeroDivisionError", True), ("post", "FAILURE"),
                    ("shutdown",)]
    assert broken.state == "FAILURE"


def test_retry_hook_gets_the_reason():
    app = make_app()
    reasons = []

    @app.task(bind=True, max_retries=1)
    def again(self):
        if self.request.retries == 0:
            raise self.retry(countdown=0)
        return "second time"
    app.on("task_retry", lambda task, request, reason: reasons.append(reason))
    r = again.delay()
    assert run_worker(app, concurrency=1) == 0
    assert r.get(timeout=1) == "second time"
    assert len(reasons) == 1 and "retry in" in reasons[0]


def test_a_failing_task_hook_is_logged_with_the_task_id_and_changes_nothing(caplog):
    app = make_app()

    @app.task
    def add(x, y):
        return x + y
    for name in ("task_prerun", "task_success", "task_postrun"):
        app.on(name, lambda *args: 1 / 0)
    r = add.delay(1, 2)
    with caplog.at_level(logging.ERROR, logger="greenq.hooks"):
        assert run_worker(app, concurrency=1) == 0
    assert r.get(timeout=1) == 3
    assert len([rec for rec in caplog.records if rec.name == "greenq.hooks"]) == 3


def test_a_failing_worker_process_init_stops_before_any_message():
    app = make_app()

    @app.task
    def add(x, y):
        return x + y
    app.on("worker_process_init", lambda worker: 1 / 0)
    r = add.delay(1, 2)
    assert run_worker(app) == 1
    assert r.state == "PENDING"
    assert app.broker.queue_stats(["default"])[0].ready == 1


@pytest.mark.parametrize("where", ["config", "option"])
def test_track_started_stores_started_while_running(where):
    app = make_app()
    if where == "config":
        app.config.set("worker", "track_started", "true", origin="test")
    gate, running = threading.Event(), threading.Event()

    @app.task(**({"track_started": True} if where == "option" else {}))
    def wait():
        running.set()
        gate.wait(5)
        return "done"

    r = wait.delay()
    t = threading.Thread(target=run_worker, args=(app,), kwargs={"concurrency": 1})
    t.start()
    assert running.wait(5)
    assert r.state == "STARTED"
    gate.set()
    t.join(10)
    assert r.get(timeout=1) == "done"


def test_started_is_not_stored_by_default():
    app = make_app()
    gate, running = threading.Event(), threading.Event()

    @app.task
    def wait():
        running.set()
        gate.wait(5)

    r = wait.delay()
    t = threading.Thread(target=run_worker, args=(app,), kwargs={"concurrency": 1})
    t.start()
    assert running.wait(5)
    assert r.state == "PENDING"
    gate.set()
    t.join(10)


def test_rate_limit_spaces_task_starts():
    """rate_limit (an admission step): 5 tasks at 20/s start at least 50 ms apart."""
    app = make_app()
    starts = []

    @app.task(rate_limit="20/s")
    def tick():
        starts.append(time.monotonic())
    for _ in range(5):
        tick.delay()
    assert run_worker(app, concurrency=5) == 0
    starts.sort()
    # slots are 50 ms apart; a start may lag its slot, but the last slot is 200 ms after the first
    assert len(starts) == 5 and starts[-1] - starts[0] >= 0.19, starts


def test_counters_subscribe_and_late_subscribers_run():
    """The counters are hook subscribers; a hook subscribed after the worker
    was built runs."""
    app = make_app()

    @app.task
    def ok():
        return 1

    @app.task
    def bad():
        raise ValueError("no")

    @app.task(bind=True)
    def flaky(self):
        if not self.request.retries:
            raise self.retry(countdown=0)
    ok.delay(), ok.delay(), bad.delay(), flaky.delay()
    worker = Worker(app, get_driver("threads"), queues=["default"], burst=True, concurrency=2,
                    fetch_timeout=FETCH_TIMEOUT)
    assert worker.runners.stats is worker.stats     # the runners count (plain increments, not a hook)
    seen = []
    worker.hooks.on("task_prerun", lambda task, request: seen.append(("pre", task.name)))
    worker.hooks.on("task_postrun", lambda task, request, state, retval: seen.append(("post", state)))
    assert worker.run() == 0
    s = worker.stats
    assert (s.received, s.succeeded, s.failed, s.retried) == (5, 3, 1, 1)
    assert sorted(seen) == sorted([("pre", ok.name)] * 2 + [("pre", bad.name)] + [("pre", flaky.name)] * 2
                                  + [("post", "SUCCESS")] * 3 + [("post", "FAILURE"), ("post", "RETRY")])
