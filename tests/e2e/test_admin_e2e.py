"""The admin tool against a real broker and a real worker."""
from __future__ import annotations

import json
import signal
import time

import pytest

pytestmark = pytest.mark.e2e


def test_call_wait_and_result(pool, sqlite_env):
    proc = sqlite_env.worker(pool, burst=False)
    called = sqlite_env.admin("call", "e2e.add", "--args", "[20, 22]", "--wait", "--timeout", "30")
    assert called.returncode == 0, called.stderr
    task_id, outcome = called.stdout.splitlines()
    assert json.loads(outcome) == {"state": "SUCCESS", "result": 42}
    shown = sqlite_env.admin("result", task_id, "--json")
    assert json.loads(shown.stdout) == {"id": task_id, "state": "SUCCESS", "result": 42}
    failed = sqlite_env.admin("call", "e2e.fail", "--args", '["gone"]', "--wait", "--timeout", "30")
    assert failed.returncode == 1 and "KeyError" in failed.stdout
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0


def test_call_rejects_bad_json(sqlite_env):
    bad = sqlite_env.admin("call", "e2e.add", "--args", "[1,")
    assert bad.returncode == 2 and "--args" in bad.stderr and "not JSON" in bad.stderr


def test_queues_and_purge(sqlite_env):
    import e2e_tasks
    sqlite_env.app()
    for i in range(3):
        e2e_tasks.add.delay(i, i)
    e2e_tasks.add.apply_async((1, 1), countdown=600)
    listing = sqlite_env.admin("queues")
    row = [line.split() for line in listing.stdout.splitlines() if line.startswith("default")][0]
    assert row[1:] == ["3", "1", "0", "0"], listing.stdout
    refused = sqlite_env.admin("purge", "default")
    assert refused.returncode == 2 and "--yes" in refused.stderr
    purged = sqlite_env.admin("purge", "default", "--yes")
    assert purged.returncode == 0 and "purged 4" in purged.stdout, purged.stdout
    listing = sqlite_env.admin("queues")
    row = [line.split() for line in listing.stdout.splitlines() if line.startswith("default")][0]
    assert row[1:3] == ["0", "0"]


def test_config_show_masks_passwords_and_check_fails_with_2(sqlite_env):
    sqlite_env.env["GREENQ_BROKER_URL"] = "redis://:hunter2@127.0.0.1:6379/3"
    shown = sqlite_env.admin("config", "show")
    assert shown.returncode == 0, shown.stderr
    assert "hunter2" not in shown.stdout and "redis://:***@127.0.0.1:6379/3" in shown.stdout
    assert "environment GREENQ_BROKER_URL" in shown.stdout
    (sqlite_env.tmp / "bad.ini").write_text("[greenq]\nbroker = redis://x\n")
    checked = sqlite_env.admin("--config", "bad.ini", "config", "check")
    assert checked.returncode == 2
    assert "bad.ini" in checked.stderr and "did you mean 'broker_url'" in checked.stderr


def test_revoke_terminate_stops_a_running_task(pool, sqlite_env):
    import e2e_tasks
    sqlite_env.app()
    r = e2e_tasks.slow_steps.delay("victim", 30)
    proc = sqlite_env.worker(pool, burst=False)
    sqlite_env.wait_marker("victim.started")
    started = time.monotonic()
    revoked = sqlite_env.admin("revoke", r.id, "--terminate")
    assert revoked.returncode == 0, revoked.stderr
    with pytest.raises(Exception) as info:
        r.get(timeout=15)
    assert type(info.value).__name__ == "TaskRevokedError"
    assert r.state == "REVOKED" and time.monotonic() - started < 15
    assert sqlite_env.marker_count("victim.finished") == 0
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
