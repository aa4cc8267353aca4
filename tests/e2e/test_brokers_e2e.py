"""The core scenarios on every broker (SQLite, Redis, RabbitMQ), with real workers."""
from __future__ import annotations

import signal

import pytest

pytestmark = pytest.mark.e2e


def test_results_retries_and_delays(pool, any_env):
    import e2e_tasks
    app = any_env.app()
    many = app.enqueue_many([e2e_tasks.add.s(i, 1) for i in range(200)])
    failed = e2e_tasks.fail.delay("k")
    retried = e2e_tasks.flaky.delay(2)
    delayed = e2e_tasks.add.apply_async((40, 2), countdown=0.5)
    proc = any_env.worker(pool, "-c", "50", burst=False)
    assert [r.get(timeout=30) for r in many] == [i + 1 for i in range(200)]
    assert isinstance(failed.get(timeout=10, propagate=False), KeyError)
    assert retried.get(timeout=20) == 2
    assert delayed.get(timeout=20) == 42
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


def test_kill9_then_the_next_worker_runs_it(pool, any_env):
    import e2e_tasks
    any_env.env["GREENQ_LEASE_SECONDS"] = "1"
    any_env.app()
    r = e2e_tasks.slow.delay("k9", 4.0)
    first = any_env.worker(pool, burst=False)
    any_env.wait_marker("k9.started")
    first.send_signal(signal.SIGKILL)
    first.wait()
    second = any_env.worker(pool, burst=False)
    assert r.get(timeout=30) == "k9"
    second.send_signal(signal.SIGTERM)
    out, _ = second.communicate(timeout=30)
    assert second.returncode == 0, out
    assert any_env.marker_count("k9.started") == 2
    assert any_env.marker_count("k9.finished") == 1


def test_sigterm_finishes_the_task(pool, any_env):
    import e2e_tasks
    any_env.app()
    r = e2e_tasks.slow.delay("term", 1.0)
    proc = any_env.worker(pool, burst=False)
    any_env.wait_marker("term.started")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert r.get(timeout=10) == "term"
