"""A clean stop on Redis returns the unstarted backlog at once (issue 7,
deliverable 4): with a 60 s lease, the messages a worker held but never
started must be ready again as soon as it exits, with their delivery count
not raised."""
from __future__ import annotations

import signal
import sys

import pytest

from tests.e2e.conftest import HERE, Env

pytestmark = [pytest.mark.e2e, pytest.mark.redis]


@pytest.fixture
def redis_env(tmp_path, redis_url, redis_prefix):
    sys.path.insert(0, str(HERE))
    env = Env(tmp_path, redis_url, {"GREENQ_KEY_PREFIX": redis_prefix, "GREENQ_LEASE_SECONDS": "60"})
    yield env
    env.cleanup()


def test_sigterm_returns_the_unstarted_backlog_at_once(pool, redis_env):
    import e2e_tasks
    app = redis_env.app()
    running = e2e_tasks.slow.delay("stop", 1.0)
    backlog = app.enqueue_many([e2e_tasks.add.s(i, 1) for i in range(30)])
    proc = redis_env.worker(pool, "-c", "1", "--prefetch", "20", burst=False)
    redis_env.wait_marker("stop.started")
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert running.get(timeout=5) == "stop"
    [stats] = app.broker.queue_stats(["default"])
    assert (stats.held, stats.ready) == (0, len(backlog)), (stats, out[-3000:])
    got = app.broker.fetch(["default"], 100, 1.0)
    assert len(got) == len(backlog)
    assert {d.deliveries for d in got} == {1}
