import datetime
import os
import sys
import time

import pytest

import greenq
from greenq import GreenQ, MaxRetriesExceededError
from greenq.drivers import get_driver
from greenq.worker.consumer import Worker


def test_exported_names():
    expected = {"GreenQ", "AsyncResult", "Task", "Signature", "PENDING", "RECEIVED", "STARTED", "RETRY",
                "SUCCESS", "FAILURE", "REVOKED", "GreenQError", "ConfigError", "TimeoutError", "TaskError",
                "SoftTimeLimitExceeded", "TimeLimitExceeded", "Retry", "Reject", "MessageError",
                "BrokerError", "MaxRetriesExceededError", "TaskRevokedError", "WorkerLostError",
                "ChordError", "chain", "group", "chord", "GroupResult"}
    assert set(greenq.__all__) == expected
    for name in expected:
        assert getattr(greenq, name) is not None
    assert issubclass(greenq.TimeoutError, TimeoutError)
    assert issubclass(greenq.TaskError, greenq.GreenQError)


#: how long a burst worker's last, empty fetch waits before it stops (1 s by default)
FETCH_TIMEOUT = 0.1


def make_app(**kw):
    return GreenQ("t", broker=f"memory://{time.monotonic_ns()}", **kw)


def test_task_names_and_options():
    app = make_app()

    @app.task
    def add(x, y):
        return x + y

    @app.task(name="crawl.fetch", queue="io", priority=5, bind=True, rate_limit="10/s")
    def fetch(self, url):
        return self.request.id

    assert add.name == f"{__name__}.test_task_names_and_options.<locals>.add"
    assert add(2, 3) == 5 and fetch.option("queue") == "io"
    with pytest.raises(TypeError, match="unknown option"):
        app.task(queues="x")(lambda: None)


def test_apply_async_options_reach_the_message():
    app = make_app()

    @app.task(queue="io")
    def t():
        pass
    eta = datetime.datetime.now() + datetime.timedelta(seconds=60)
    r = t.apply_async(eta=eta, expires=120, priority=9, task_id="fixed-id")
    assert r.id == "fixed-id"
    msg = app.build_message(t.name, countdown=10, queue="high")
    assert msg.queue == "high" and msg.eta == pytest.approx(time.time() + 10, abs=1)
    stats = {s.name: s for s in app.broker.queue_stats()}
    assert stats["io"].delayed == 1
    with pytest.raises(ValueError):
        t.apply_async(priority=10)
    with pytest.raises(TypeError, match="unknown option"):
        t.apply_async(countdwn=1)


def test_eager_mode_runs_inline_with_retries():
    app = make_app(eager=True)
    calls = []

    @app.task(bind=True, autoretry_for=(IOError,), max_retries=3)
    def flaky(self):
        calls.append(self.request.retries)
        if self.request.retries < 2:
            raise IOError("again")
        return "ok"

    @app.task
    def boom():
        raise ValueError("nope")
    r = flaky.delay()
    assert r.get() == "ok" and r.state == "SUCCESS" and calls == [0, 1, 2]
    failed = boom.delay()
    assert isinstance(failed.get(propagate=False), ValueError)
    with pytest.raises(ValueError):
        failed.get()
    assert "ValueError" in failed.traceback


def test_max_retries_exceeded_in_eager():
    app = make_app(eager=True)

    @app.task(bind=True, max_retries=1)
    def never(self):
        raise self.retry(countdown=0)
    assert isinstance(never.delay().get(propagate=False), MaxRetriesExceededError)


def test_backoff_grows_and_is_capped():
    app = make_app()

    @app.task(retry_backoff=2, retry_backoff_max=10, retry_jitter=False)
    def t():
        pass
    assert [t.backoff(n) for n in range(5)] == [2, 4, 8, 10, 10]

    @app.task(retry_backoff=True)
    def j():
        pass
    assert all(0 <= j.backoff(3) <= 8 for _ in range(20))


def test_ini_task_section_overrides_decorator(tmp_path):
    ini = tmp_path / "g.ini"
    ini.write_text("[greenq]\nbroker_url = memory://ini\n[task:shop.fetch]\ntime_limit = 30\nqueue = io\n")
    app = GreenQ.from_config(str(ini))

    @app.task(name="shop.fetch", time_limit=5)
    def fetch():
        pass
    assert fetch.option("time_limit") == 30 and fetch.option("queue") == "io"


def test_in_process_worker_on_memory_broker():
    """The memory broker with an in-process threads worker: for users' unit tests."""
    app = make_app()

    @app.task
    def mul(x, y):
        return x * y
    results = app.enqueue_many([mul.s(i, 2) for i in range(20)])
    expired = mul.apply_async((1, 1), expires=-1)
    assert Worker(app, get_driver("threads"), queues=["default"], concurrency=4, burst=True,
                  fetch_timeout=FETCH_TIMEOUT).run() == 0
    assert [r.get(timeout=1) for r in results] == [i * 2 for i in range(20)]
    assert expired.state == "REVOKED"
    with pytest.raises(greenq.TaskRevokedError):
        expired.get(timeout=1)


def test_a_held_job_shares_the_workers_strings_and_runs_its_function_straight():
    """What a job in flight holds (docs/performance.md, "Memory with 10,000
    tasks in flight"): a slotted message whose task name, queue and id are the
    worker's own strings, not decoded copies; and the task's function called
    from run_with_retries itself, without a level of Task.__call__ between."""
    app = make_app()
    held, callers = [], []

    def received(job):
        held.append((job.msg.task is job.task.name, job.msg.queue is job.delivery.queue,
                     job.msg.id is job.delivery.message_id, hasattr(job.msg, "__dict__")))

    @app.task
    def plain(x):
        callers.append(sys._getframe(1).f_code.co_name)
        return x

    @app.task(bind=True)
    def bound(self, x):
        callers.append(sys._getframe(1).f_code.co_name)
        return self.request.task, x

    results = [plain.delay(1), bound.delay(2)]
    worker = Worker(app, get_driver("threads"), queues=["default"], concurrency=1, burst=True,
                    fetch_timeout=FETCH_TIMEOUT)
    worker.hooks.on("task_received", received)      # the worker's own hook: it hands over the job
    assert worker.run() == 0
    assert [r.get(timeout=1) for r in results] == [1, [bound.name, 2]]
    assert held == [(True, True, True, False)] * 2
    assert callers == ["run_with_retries"] * 2


def test_revoke_before_start():
    app = make_app()

    @app.task
    def t():
        return 1
    r = t.delay()
    r.revoke()
    Worker(app, get_driver("threads"), queues=["default"], concurrency=1, burst=True,
           fetch_timeout=FETCH_TIMEOUT).run()
    assert r.state == "REVOKED"


def test_get_timeout_raises_greenq_timeout():
    app = make_app()

    @app.task
    def t():
        pass
    with pytest.raises(greenq.TimeoutError):
        t.delay().get(timeout=0.05)


def test_fork_gets_fresh_connections():
    app = make_app()
    broker = app.broker
    pid = os.fork()
    if pid == 0:   # the child makes its own (an os.register_at_fork hook tells it)
        os._exit(0 if app.broker is not broker and app.broker is app.broker else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert app.broker is broker


def test_import_greenq_is_light():
    import subprocess
    code = ("import sys, greenq\nfrom greenq import GreenQ\n"
            "app = GreenQ('x', broker='sqlite:///x.db')\n"
            "print(sorted({'gevent','eventlet','ssl','redis','amqp'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_acks_late_false_acknowledges_when_the_task_starts():
    app = make_app()
    seen = {}

    @app.task(acks_late=False)
    def early():
        seen["early"] = app.broker.queue_stats(["default"])[0].held
        return 1

    @app.task
    def late():
        seen["late"] = app.broker.queue_stats(["default"])[0].held
        return 2
    a, b = early.delay(), late.delay()
    Worker(app, get_driver("threads"), queues=["default"], concurrency=1, prefetch=1, burst=True,
           fetch_timeout=FETCH_TIMEOUT).run()
    assert (a.get(timeout=1), b.get(timeout=1)) == (1, 2)
    assert seen == {"early": 0, "late": 1}


def test_prefetch_auto_is_the_concurrency_plus_a_quarter():
    from greenq.config import effective_prefetch
    assert effective_prefetch(1000, 0) == 1250 and effective_prefetch(1, 0) == 2
    assert effective_prefetch(100, 50) == 100 and effective_prefetch(100, 300) == 300


def test_eager_workflows_run_inline():
    from greenq import chain, chord, group
    app = make_app(eager=True)
    calls = []

    @app.task
    def add(x, y):
        return x + y

    @app.task
    def note(*args):
        calls.append(args)

    @app.task
    def tsum(values):
        return sum(values)

    @app.task
    def boom():
        raise ValueError("eager boom")
    assert chain(add.s(1, 2), add.s(3)).delay().get() == 6
    assert group(add.s(i, i) for i in range(3)).delay().get() == [0, 2, 4]
    assert chord([add.s(1, 1), add.s(2, 2)], tsum.s()).delay().get() == 6
    r = boom.apply_async(link=note.s("ok"), link_error=note.s("err"))
    add.apply_async((1, 1), link=note.s("ok"))
    assert r.failed() and calls == [(r.id, "err"), (2, "ok")]


def test_a_tasks_options_are_merged_once_and_a_change_at_run_time_is_seen():
    """Task.resolved: the worker and the client read a task's options from one
    merged dict, made again when a [task:NAME] key is set (the INI, ``greenq
    control rate-limit``) or app.config is replaced."""
    app = make_app()

    @app.task(name="t.opts", soft_time_limit=7)
    def opts():
        return 1

    def drain():
        assert Worker(app, get_driver("threads"), queues=["default"], concurrency=1, burst=True,
                      fetch_timeout=FETCH_TIMEOUT).run() == 0
    assert opts.resolved() is opts.resolved()                   # merged once
    assert opts.resolved()["ignore_result"] is False and opts.resolved()["soft_time_limit"] == 7
    first = opts.delay()
    drain()
    assert first.get(timeout=1) == 1
    app.config.set("task:t.opts", "ignore_result", True, origin="test")
    assert opts.resolved()["ignore_result"] is True and opts.option("ignore_result") is True
    second = opts.delay()
    drain()
    assert second.state == "PENDING"                            # the worker stored no result
    replaced = app.config.copy()
    replaced.set("task:t.opts", "ignore_result", False, origin="test")   # same generation count, other config
    assert replaced.task_generation == app.config.task_generation
    app.config = replaced
    assert opts.resolved()["ignore_result"] is False and opts.resolved()["soft_time_limit"] == 7
    third = opts.delay()
    drain()
    assert third.get(timeout=1) == 1


@pytest.mark.parametrize("pushes", [False, True])
def test_a_burst_worker_waits_a_tenth_of_a_second_for_its_last_empty_fetch(pushes):
    """--burst stops on an empty fetch, so its fetches wait 0.1 s, not the usual
    1 s; where the broker pushes deliveries, the confirming fetch still waits the
    whole fetch timeout (a delivery may be on its way)."""
    from greenq.worker.consumer import BURST_FETCH_TIMEOUT
    app = make_app()

    @app.task
    def one():
        return 1
    sent = one.delay()
    worker = Worker(app, get_driver("threads"), queues=["default"], concurrency=1, burst=True)
    assert worker.fetch_timeout == 1.0
    broker, timeouts = worker.broker, []
    fetch = broker.fetch

    def recorded(queues, count, timeout, **kw):
        timeouts.append(timeout)
        return fetch(queues, count, timeout, **kw)
    broker.fetch = recorded
    if pushes:
        broker.pushes_deliveries = True
    assert worker.run() == 0
    assert sent.get(timeout=1) == 1
    expected_last = [BURST_FETCH_TIMEOUT, 1.0] if pushes else [BURST_FETCH_TIMEOUT]
    assert timeouts[-len(expected_last):] == expected_last
    assert set(timeouts[:-len(expected_last)]) <= {BURST_FETCH_TIMEOUT}
