"""The supervisor: children replaced after their task budget, a child whose
hub is stuck killed and replaced, crash loops backed off, one --http
endpoint for every child."""
from __future__ import annotations

import json
import re
import signal
import socket
import time
import urllib.error
import urllib.request

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
    assert "restarting in 0.0 s" in out     # a clean exit: replaced at once


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
    # dead-lettered after its one delivery, not run again; its caller learns it at once
    assert stuck.state == "FAILURE"
    assert "dead-lettered" in str(stuck.get(timeout=1, propagate=False))
    listing = sqlite_env.admin("dlq", "list")
    assert "e2e.block_hub" in listing.stdout, listing.stdout   # not run a second time


def test_children_that_keep_crashing_are_restarted_with_backoff(pool, sqlite_env):
    import e2e_tasks
    sqlite_env.app()
    for _ in range(3):
        e2e_tasks.crash_worker.delay()     # each kills the child that runs it, at once
    proc = sqlite_env.worker(pool, "--processes", "1", "--max-tasks-per-child", "1000", "-c", "1",
                             "--prefetch", "1", burst=False)
    deadline = time.monotonic() + 60
    while sqlite_env.marker_count("crash.started") < 3:
        assert time.monotonic() < deadline, sqlite_env.dump()
        time.sleep(0.05)
    assert e2e_tasks.add.delay(2, 2).get(timeout=60) == 4     # the fourth child lives
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    restarts = re.findall(r"exited with exit code 3 after [\d.]+ s \(failure (\d) in a row\); "
                          r"restarting in ([\d.]+) s", out)
    assert restarts == [("1", "0.5"), ("2", "1.0"), ("3", "2.0")], out
    assert "Traceback" not in out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> "tuple[int, str]":
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def _total(metrics: str, name: str) -> float:
    """The sum over children of one metric (samples labelled child="N")."""
    return sum(float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
               if line.startswith(name + '{child="'))


def test_one_http_endpoint_serves_every_child(pool, sqlite_env):
    import e2e_tasks
    app = sqlite_env.app()
    port = _free_port()
    proc = sqlite_env.worker(pool, "--processes", "2", "-c", "2", "--http", f"127.0.0.1:{port}",
                             burst=False)
    results = app.enqueue_many([e2e_tasks.pid.s(i) for i in range(12)])
    assert len({r.get(timeout=60) for r in results}) >= 1
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:   # until both children serve their figures through the supervisor
        try:
            status, metrics = _get(base + "/metrics")
        except OSError:
            status, metrics = 0, ""
        if status == 200 and "greenq_processes_alive 2" in metrics and \
                _total(metrics, "greenq_tasks_succeeded_total") == 12 and \
                _total(metrics, "greenq_concurrency") == 4:
            break   # two children of two slots each, labelled child="0" and child="1"
        assert time.monotonic() < deadline, (metrics, sqlite_env.dump())
        time.sleep(0.1)
    assert metrics.count("# TYPE greenq_tasks_succeeded_total counter") == 1
    status, body = _get(base + "/healthz")
    health = json.loads(body)
    assert status == 200 and health["alive"] == 2 and len(health["children"]) == 2, body
    assert all(child["status"] == "ok" for child in health["children"])
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "Address already in use" not in out and "Traceback" not in out and "exited with" not in out, out
