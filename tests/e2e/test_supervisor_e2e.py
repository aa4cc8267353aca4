"""The supervisor: children replaced after their task budget, and a child whose
hub is stuck killed and replaced."""
from __future__ import annotations

import signal

import pytest

pytestmark = pytest.mark.e2e


def test_children_are_replaced_after_max_tasks(pool, sqlite_env):
    import e2e_tasks
    app = sqlite_env.app()
    results = app.enqueue_many([e2e_tasks.pid.s(i) for i in range(40)])
    proc = sqlite_env.worker(pool, "--processes", "2", "--max-tasks-per-child", "10", "-c", "2",
                             burst=False)
    pids = {r.get(timeout=60) for r in results}
    assert len(pids) >= 4, pids          # 40 tasks, 10 per child: at least four children ran them
    assert proc.pid not in pids
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "starting a replacement" in out


def test_child_with_a_stuck_hub_is_killed_and_replaced(pool, sqlite_env):
    if pool != "gevent":
        pytest.skip("one green driver is enough for this slow test")
    import e2e_tasks
    sqlite_env.env.update(GREENQ_LEASE_SECONDS="5", GREENQ_MAX_DELIVERIES="1")
    sqlite_env.app()
    stuck = e2e_tasks.block_hub.delay(60)
    proc = sqlite_env.worker(pool, "--processes", "1", "--max-tasks-per-child", "1000", "-c", "1",
                             "--prefetch", "1",
                             burst=False)
    after = e2e_tasks.add.delay(1, 1)     # runs in the replacement child
    assert after.get(timeout=60) == 2
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "hub stuck" in out and "killing it" in out, out
    assert not stuck.ready()
    listing = sqlite_env.admin("dlq", "list")
    assert "e2e.block_hub" in listing.stdout, listing.stdout   # not run a second time
