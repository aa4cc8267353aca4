"""A task that blocks the hub past its time limit (issue 18, item 12): the
limit cannot fire while the hub is blocked, so the task ends as it ends (here
SUCCESS); the watchdog's warning says so, and the stored result carries
``hub_blocked``, the seconds the task kept the hub blocked."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.e2e


def test_a_task_blocking_the_hub_past_its_time_limit_is_noted(pool, sqlite_env):
    if pool not in ("gevent", "eventlet"):
        pytest.skip("only green drivers have a hub to block")
    import e2e_tasks
    sqlite_env.env["GREENQ_WORKER_BLOCKING_THRESHOLD"] = "0.2"
    sqlite_env.app()
    blocker = e2e_tasks.block_hub.apply_async((1.5,), time_limit=0.5)
    quick = e2e_tasks.add.delay(1, 2)
    code, out = sqlite_env.run_worker(pool)
    assert code == 0, out
    assert blocker.get(timeout=10) is True, out           # the limit could not fire: it ran to its end
    warning = next(line for line in out.splitlines() if "hub blocked for" in line)
    assert f"task e2e.block_hub[{blocker.id}]" in warning, warning
    assert "time limits cannot fire while the hub is blocked" in warning, warning
    assert "time_limit 0.5 s" in warning, warning
    assert 1.0 <= blocker.hub_blocked <= 5.0, (blocker.hub_blocked, out)
    assert "hub unblocked after" in out and f"(task e2e.block_hub[{blocker.id}])" in out, out
    assert quick.get(timeout=10) == 3 and quick.hub_blocked is None
