"""Runners spawned on demand under a green driver (greenq/worker/runners.py):
runners_on_demand.py runs a real Worker in a process patched for the driver
(this pytest process must stay unpatched) and checks the runner count with
tasks in flight, after a burst, across resizes, and under a hard time limit."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "integration", "runners_on_demand.py")

pytestmark = pytest.mark.timeout(150)


@pytest.mark.parametrize("driver", ["gevent", "eventlet"])
def test_runners_are_spawned_on_demand_and_go_when_idle(driver):
    pytest.importorskip(driver)
    env = dict(os.environ, PYTHONPATH=ROOT, HYPOTHESIS_NO_PLUGINS="1")
    proc = subprocess.run([sys.executable, SCRIPT, driver], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("OK"), (
        f"exit {proc.returncode}\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")


def test_threads_start_every_runner_at_once():
    """Under threads (an OS thread each) the runners start with the worker, as before."""
    import time

    from greenq import GreenQ
    from greenq.drivers import get_driver
    from greenq.worker.consumer import Worker
    app = GreenQ("eager", broker=f"memory://eager-{time.monotonic_ns()}")
    worker = Worker(app, get_driver("threads"), queues=["default"], concurrency=3)
    runners = worker.runners
    assert not runners.on_demand
    runners.start(3)
    try:
        assert len(runners.all) == 3 == runners.count == runners.target
        runners.submit(None)            # a retirement notice: one runner ends, none is spawned for it
        runners.count -= 1
        from tests.conftest import until
        assert until(lambda: len(runners.all) == 2), len(runners.all)
        assert runners.trim(time.monotonic() + 3600) == 0   # threads are not trimmed
    finally:
        runners.stop()
    from tests.conftest import until
    assert until(lambda: len(runners.all) == 0), len(runners.all)
