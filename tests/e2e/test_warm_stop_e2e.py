"""One stop is one warm stop under ``--processes`` (issue 18, item 1).

A terminal's Ctrl-C and systemd's default ``KillMode=control-group`` signal
every process of the worker, and the supervisor forwards the stop too: each
child used to see two signals and went cold, abandoning its running tasks.
Here a real supervisor runs in its own process group, signalled the way a
terminal and systemd do; every task must finish once.  A deliberate second
signal, later than the window, is still a cold shutdown.
"""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from greenq.worker.signals import STOP_SIGNAL_WINDOW

pytestmark = pytest.mark.e2e

TASKS = 4
WORKER = ("--processes", "2", "-c", "2", "--prefetch", "2")   # one task per slot, two per child


def _start(env, pool, seconds: float):
    """Send TASKS slow tasks, start the supervisor in a process group of its
    own, and return (results, proc) once every task has started."""
    import e2e_tasks
    env.app()
    results = [e2e_tasks.slow.delay(f"t{i}", seconds) for i in range(TASKS)]
    proc = env.worker(pool, *WORKER, burst=False, start_new_session=True)
    for i in range(TASKS):
        env.wait_marker(f"t{i}.started", timeout=60)
    return results, proc


def _finish(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=60)
    return out


@pytest.mark.parametrize("how", ["group SIGTERM", "group SIGINT", "supervisor SIGTERM"])
def test_one_stop_lets_every_running_task_finish(pool, sqlite_env, how):
    """``group SIGTERM``: systemd's KillMode=control-group; ``group SIGINT``:
    Ctrl-C in a terminal; ``supervisor SIGTERM``: KillMode=mixed (the
    supervisor alone, which forwards it)."""
    _stop_once(sqlite_env, pool, how)


def test_a_group_stop_is_warm_on_every_broker(pool, any_env):
    if any_env.kind == "sqlite":
        pytest.skip("SQLite: test_one_stop_lets_every_running_task_finish covers it")
    _stop_once(any_env, pool, "group SIGTERM")


def _stop_once(env, pool, how: str) -> None:
    results, proc = _start(env, pool, 2.0)
    target, name = how.split()
    signum = getattr(signal, name)
    if target == "group":
        os.killpg(os.getpgid(proc.pid), signum)
    else:
        proc.send_signal(signum)
    out = _finish(proc)
    assert proc.returncode == 0, out
    assert "cold" not in out and "abandoned" not in out, out
    assert out.count("warm shutdown") == 2, out          # once per child
    # the supervisor saw each child's notice and did not signal it again
    assert "stop signal repeated" not in out, out
    assert [r.get(timeout=10) for r in results] == [f"t{i}" for i in range(TASKS)], out
    for i in range(TASKS):                               # each ran once, to its end
        assert env.marker_count(f"t{i}.started") == 1, out
        assert env.marker_count(f"t{i}.finished") == 1, out


def test_a_second_signal_after_the_window_is_a_cold_stop(pool, sqlite_env):
    """CONTRACT section 2: a second SIGTERM is cold shutdown, when it is a
    second signal and not a copy of the first."""
    results, proc = _start(sqlite_env, pool, 60.0)
    os.killpg(os.getpgid(proc.pid), signal.SIGTERM)
    time.sleep(STOP_SIGNAL_WINDOW + 0.5)       # the window is a span of time: let it pass
    assert proc.poll() is None                 # still warm: waiting for the 60 s tasks
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)           # the operator's second signal, to the supervisor
    out = _finish(proc)
    assert proc.returncode == 0, out
    assert time.monotonic() - started < 15, out
    assert out.count("cold shutdown: stopping running tasks") == 2, out
    assert out.count("cold shutdown: abandoned") == TASKS, out
    assert [r.state for r in results] == ["PENDING"] * TASKS
    assert all(sqlite_env.marker_count(f"t{i}.finished") == 0 for i in range(TASKS))
    app = sqlite_env.app()
    stats = app.broker.queue_stats([app.config.default_queue])
    assert stats[0].ready == TASKS and stats[0].held == 0, (stats, out)   # every message back at once
