"""Results are trusted no more than messages, and a worker whose control loop
died does not stay up (issue 7, deliverables 2 and 5)."""
from __future__ import annotations

import pickle
import time

import pytest

from greenq import ConfigError, GreenQ, MessageError, TaskError
from greenq.backends.base import Record
from greenq.exceptions import describe
from greenq.drivers import get_driver
from greenq.worker.consumer import Worker
from greenq.worker.monitor import Monitor


#: how long a burst worker's last, empty fetch waits before it stops (1 s by default)
FETCH_TIMEOUT = 0.1


def make_app(**kw):
    return GreenQ("t", broker=f"memory://{time.monotonic_ns()}", **kw)


def store(app, task_id, data: bytes) -> None:
    app.backend.store_many([Record(task_id, data, True)])


class Boom:
    """Unpickling this would run code: ``__reduce__`` names a callable."""

    def __reduce__(self):
        return (print, ("a pickled result ran code",))


def test_pickled_result_refused_unless_accepted():
    app = make_app()
    store(app, "p1", b"pickle:" + pickle.dumps({"state": "SUCCESS", "result": Boom()}))
    with pytest.raises(MessageError, match="not in accept_content"):
        app.AsyncResult("p1").get(timeout=1)
    with pytest.raises(ConfigError, match="signing_key"):       # pickle is accepted only with a key...
        GreenQ("t", broker=app.config.broker_url, accept_content=["json", "pickle"])
    keyed = GreenQ("t", broker=app.config.broker_url, accept_content=["json", "pickle"], signing_key="k")
    with pytest.raises(MessageError, match="unsigned"):            # ...and from signed records only
        keyed.AsyncResult("p1").get(timeout=1)


@pytest.mark.parametrize("data", [b"json:[1, 2]", b"json:{\"result\": 1}", b"nocolon", b"json:{bad",
                                  b"json:{\"state\": \"FAILURE\", \"exc\": 5}", b"\xff\xfe:x"])
def test_malformed_stored_results_are_message_errors(data):
    app = make_app()
    store(app, "m1", data)
    with pytest.raises(MessageError):
        app.AsyncResult("m1").get(timeout=1)


def failure(type_name: str, args=("boom",)) -> bytes:
    return b"json:" + __import__("json").dumps({"id": "e1", "state": "FAILURE", "exc": {
        "type": type_name, "args": list(args), "message": "boom"}, "traceback": "remote tb"}).encode()


def test_exceptions_rebuilt_only_from_allowed_modules():
    app = make_app()
    store(app, "b", failure("builtins.KeyError"))
    assert isinstance(app.AsyncResult("b").get(timeout=1, propagate=False), KeyError)
    store(app, "g", failure("greenq.exceptions.TimeLimitExceeded"))
    assert type(app.AsyncResult("g").get(timeout=1, propagate=False)).__name__ == "TimeLimitExceeded"
    # a module no task lives in and nobody allowed: never imported, a TaskError instead
    store(app, "s", failure("subprocess.CalledProcessError", (1, "ls")))
    exc = app.AsyncResult("s").get(timeout=1, propagate=False)
    assert isinstance(exc, TaskError) and exc.type_name == "subprocess.CalledProcessError"
    assert exc.remote_traceback == "remote tb"
    allowing = GreenQ("t", broker=app.config.broker_url, exception_modules=["subprocess"])
    import subprocess
    assert isinstance(allowing.AsyncResult("s").get(timeout=1, propagate=False), subprocess.CalledProcessError)


def test_exceptions_of_registered_task_modules_are_rebuilt():
    app = make_app()

    @app.task
    def t():
        return 1
    store(app, "own", failure(f"{__name__}.LocalError"))
    assert isinstance(app.AsyncResult("own").get(timeout=1, propagate=False), LocalError)


class LocalError(Exception):
    pass


def test_a_dead_control_loop_stops_the_worker_with_exit_1():
    """If the reaper (or any control loop) dies, /healthz is 503 naming it and
    run() returns 1: a worker that is up but no longer settling is impossible."""
    app = make_app()

    @app.task
    def add(x, y):
        return x + y
    results = [add.delay(i, i) for i in range(5)]
    worker = Worker(app, get_driver("threads"), queues=["default"], concurrency=2, burst=False)

    def broken_reaper():
        raise RuntimeError("bug in the reaper")
    worker.reaper.loop = broken_reaper
    monitor = Monitor(worker, 0, "")
    assert worker.run() == 1
    assert worker.failed == "reaper"
    ok, body = monitor.healthy()
    assert not ok and body["failed"] == "reaper"
    # nothing was lost: what was not settled went back to the queue
    stats = app.broker.queue_stats(["default"])[0]
    done = sum(r.ready() for r in results)
    assert stats.ready + done == 5 and stats.held == 0


def test_a_settler_error_in_one_job_does_not_stop_the_others():
    app = make_app()

    @app.task
    def add(x, y):
        return x + y
    good = [add.delay(i, 1) for i in range(10)]
    worker = Worker(app, get_driver("threads"), queues=["default"], concurrency=2, burst=True,
                    fetch_timeout=FETCH_TIMEOUT)
    real_plan = worker.settler._plan
    calls = []

    def flaky_plan(job, plan):
        calls.append(job)
        if len(calls) == 3:
            raise RuntimeError("bug while recording")
        return real_plan(job, plan)
    worker.settler._plan = flaky_plan
    assert worker.run() == 0
    states = [r.state for r in good]
    assert states.count("SUCCESS") == 9 and states.count("FAILURE") == 1
    failed = [r for r in good if r.state == "FAILURE"][0]
    assert "could not record" in str(failed.get(timeout=1, propagate=False))


def test_permanent_store_errors_are_not_retried_forever():
    """One record the backend refuses for good must not block the batch."""
    app = make_app()

    @app.task
    def add(x, y):
        return x + y
    results = [add.delay(i, 1) for i in range(6)]
    worker = Worker(app, get_driver("threads"), queues=["default"], concurrency=1, burst=True,
                    fetch_timeout=FETCH_TIMEOUT)
    backend = app.backend
    real_store = backend.store_many
    poisoned = results[2].id

    def store_many(records):
        if any(r.task_id == poisoned and b"SUCCESS" in r.data for r in records):
            raise ValueError("record too large for this backend")
        return real_store(records)
    backend.store_many = store_many
    assert worker.run() == 0
    assert [r.state for r in results] == ["SUCCESS", "SUCCESS", "FAILURE", "SUCCESS", "SUCCESS", "SUCCESS"]
    assert "could not be stored" in str(results[2].get(timeout=1, propagate=False))


def test_a_stop_signal_that_lands_in_a_log_write_is_not_lost():
    """SIGTERM while the main thread writes a log line: the handler's own
    line hits "reentrant call inside BufferedWriter" (seen in CI, the worker
    then ignored SIGTERM while it waited for its broker).  The stop is
    recorded before anything is logged, and a failing log line is swallowed."""
    import logging
    from greenq.worker.state import StopState

    class Reentrant(logging.Handler):
        def emit(self, record):
            raise RuntimeError("reentrant call inside <_io.BufferedWriter name='<stderr>'>")

        def handleError(self, record):
            raise RuntimeError("reentrant call inside <_io.BufferedWriter name='<stderr>'>")

    worker = Worker(make_app(), get_driver("threads"), queues=["default"], concurrency=1, burst=False)
    log = logging.getLogger("greenq.worker")
    handler, level = Reentrant(), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        worker.request_stop()
        assert worker.stopping == StopState.WARM and worker.room.is_set()
        worker.request_stop(cold=True)
        assert worker.stopping == StopState.COLD
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


def test_describe_shows_any_exception_in_one_way():
    """greenq.exceptions.describe is the one way an exception is shown in a log
    line or an error text (docs/glossary.md): it never raises, even for a
    task's exception whose str() does, and stays readable."""
    class Unprintable(Exception):
        def __str__(self):
            raise RuntimeError("no")

    class AccessRefused(Exception):
        pass

    assert describe(ValueError("bad")) == "ValueError: bad"
    assert describe(Unprintable()) == "Unprintable: (its message cannot be shown)"
    assert describe(ConnectionResetError()) == "ConnectionResetError"
    assert describe(KeyError("x" * 1000)) == "KeyError: '" + "x" * 299
    assert describe(AccessRefused("<AccessRefused: unknown error>")) == "<AccessRefused: unknown error>"
    assert describe(ValueError("a ValueError inside")) == "ValueError: a ValueError inside"
