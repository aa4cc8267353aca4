"""Hub-blocking detection, /healthz and /metrics, and poison messages, with real workers."""
from __future__ import annotations

import json
import signal
import socket
import time
import urllib.error
import urllib.request

import pytest

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_blocked_hub_is_reported_with_the_task(pool, sqlite_env):
    if pool not in ("gevent", "eventlet"):
        pytest.skip("only green drivers have a hub to block")
    import e2e_tasks
    sqlite_env.env["GREENQ_WORKER_BLOCKING_THRESHOLD"] = "0.2"
    sqlite_env.app()
    r = e2e_tasks.block_hub.delay(1.0)
    code, out = sqlite_env.run_worker(pool)
    assert code == 0, out
    assert r.get(timeout=10) is True
    assert "hub blocked" in out and "e2e.block_hub" in out and r.id in out, out
    assert "block_hub" in out.split("hub blocked", 1)[1]  # the stack names the function


def test_healthz_and_metrics(pool, sqlite_env):
    import e2e_tasks
    sqlite_env.app()
    port = _free_port()
    results = [e2e_tasks.add.delay(i, 1) for i in range(5)]
    proc = sqlite_env.worker(pool, "--http", f"127.0.0.1:{port}", burst=False)
    assert [r.get(timeout=20) for r in results] == [1, 2, 3, 4, 5]
    health = json.loads(_get(port, "/healthz"))
    assert health["status"] == "ok" and health["broker_healthy"] is True
    metrics = _get(port, "/metrics")
    assert "greenq_tasks_succeeded_total 5" in metrics and "greenq_up 1" in metrics
    assert 'greenq_task_outcomes_total{outcome="succeeded",task="e2e.add"} 5.0' in metrics, metrics
    assert 'greenq_task_runtime_seconds_count{task="e2e.add"} 5.0' in metrics
    assert 'greenq_task_queue_wait_seconds_count{task="e2e.add"} 5.0' in metrics
    assert 'greenq_queue_messages{queue="default",state="ready"} 0.0' in metrics
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out


def test_one_metrics_endpoint_for_every_child(pool, sqlite_env):
    """--processes 2 --http: the supervisor serves one endpoint merging both children."""
    import e2e_tasks
    sqlite_env.app()
    port = _free_port()
    results = [e2e_tasks.add.delay(i, 1) for i in range(6)]
    proc = sqlite_env.worker(pool, "--processes", "2", "-c", "2", "--http", f"127.0.0.1:{port}", burst=False)
    assert sorted(r.get(timeout=30) for r in results) == [1, 2, 3, 4, 5, 6]
    deadline = time.monotonic() + 20
    while True:       # both children up and answering
        try:
            health = json.loads(_get(port, "/healthz"))
            if {str(child.get("slot")) for child in health["children"]} == {"0", "1"}:
                break
        except urllib.error.HTTPError:
            pass
        assert time.monotonic() < deadline, "the children never answered /healthz"
        time.sleep(0.2)
    assert health["status"] == "ok", health
    metrics = _get(port, "/metrics")
    counts = {child: 0.0 for child in ("0", "1")}
    for line in metrics.splitlines():
        for child in counts:
            if line.startswith(f'greenq_tasks_succeeded_total{{child="{child}"}} '):
                counts[child] = float(line.split()[-1])
    assert sum(counts.values()) == 6, metrics
    assert metrics.count("# TYPE greenq_tasks_succeeded_total counter") == 1
    assert 'greenq_up{child="0"} 1' in metrics and 'greenq_up{child="1"} 1' in metrics
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "Address already in use" not in out


def _get(port: int, path: str) -> str:
    deadline = time.monotonic() + 10
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                return resp.read().decode()
        except (urllib.error.URLError, ConnectionError):
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def test_poison_message_is_dead_lettered_after_max_deliveries(pool, sqlite_env):
    import e2e_tasks
    sqlite_env.env.update(GREENQ_LEASE_SECONDS="1", GREENQ_MAX_DELIVERIES="2")
    sqlite_env.app()
    e2e_tasks.crash_worker.delay()
    fine = e2e_tasks.add.delay(2, 2)
    for attempt in range(2):
        proc = sqlite_env.worker(pool, "-c", "1", "--prefetch", "1", burst=False)
        sqlite_env.wait_marker("crash.started")
        assert proc.wait(timeout=30) == 3
        (sqlite_env.markers / "crash.started").unlink()
        time.sleep(1.1)  # the dead worker's lease runs out
    code, out = sqlite_env.run_worker(pool)
    assert code == 0, out
    assert fine.get(timeout=10) == 4
    listing = sqlite_env.admin("dlq", "list")
    assert "e2e.crash_worker" in listing.stdout and "max_deliveries=2" in listing.stdout, listing.stdout
