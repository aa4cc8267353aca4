"""The client side of issue 18 with real worker processes: ``get()`` inside
a task is refused at once (Celery's rule) instead of every slot waiting."""
from __future__ import annotations

import time

import pytest

from greenq.result import SYNC_SUBTASK_RULE

pytestmark = pytest.mark.e2e


def _app(env):
    """client_config_tasks' app pointed at ``env``'s broker (this pytest
    process is the unpatched client)."""
    from greenq.config import load
    import client_config_tasks
    app = client_config_tasks.app
    app.close()
    app.config = load(search=False, env={k: v for k, v in env.env.items() if k.startswith("GREENQ_")})
    app._codec = None
    return app


def test_get_inside_a_task_fails_at_once(pool, sqlite_env):
    """Four tasks each waiting on a subtask on a -c 2 worker: before the fix
    every slot waited and every wait timed out (20 s); now each fails with
    the rule at once, and a task that opts out gets its subtask's value."""
    import client_config_tasks as t
    _app(sqlite_env)
    parents = [t.waits.delay(i) for i in range(4)]
    grouped = t.waits_group.delay(3)
    opted_out = t.waits.delay(10, opt_out=True)
    proc = sqlite_env.worker(pool, "-A", "client_config_tasks", "-c", "2", burst=False)
    try:
        started = time.monotonic()
        for result in parents + [grouped]:
            exc = result.get(timeout=15, propagate=False)
            assert isinstance(exc, RuntimeError), (exc, sqlite_env.dump())
            assert "Never call result.get() within a task" in str(exc)
            assert result.state == "FAILURE"
        assert time.monotonic() - started < 10        # refused, not timed out
        assert opted_out.get(timeout=15) == 11
    finally:
        proc.terminate()
        proc.wait(30)


def test_rule_names_the_way_out():
    assert "disable_sync_subtasks=False" in SYNC_SUBTASK_RULE and "chord" in SYNC_SUBTASK_RULE
