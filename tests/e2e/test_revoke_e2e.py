"""Revocations with real workers on every broker: a revoke is broadcast over
the control plane and kept by each worker (greenq/worker/revocations.py); a
worker started later loads it from the result backend; a worker without a
control plane reads the backend every second."""
from __future__ import annotations

import json
import signal
import time
import uuid

import pytest

from greenq.worker.revocations import SYNC_PUSHED

pytestmark = pytest.mark.e2e


def _revoked_ids(env, name: str) -> list:
    done = env.admin("inspect", "revoked", "-d", name, "--json", "--timeout", "2")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)[name]


def _wait_ping(env, name: str) -> None:
    deadline = time.monotonic() + 30
    while True:
        done = env.admin("inspect", "ping", "-d", name, "--json", "--timeout", "1")
        if done.returncode == 0 and name in json.loads(done.stdout or "{}"):
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} never answered ping\n{env.dump()}")


def _terminated_within(env, r, seconds: float) -> float:
    started = time.monotonic()
    revoked = env.admin("revoke", r.id, "--terminate")
    assert revoked.returncode == 0, revoked.stderr
    with pytest.raises(Exception) as info:
        r.get(timeout=seconds)
    assert type(info.value).__name__ == "TaskRevokedError", info.value
    return time.monotonic() - started


def test_revoke_is_broadcast_and_a_later_worker_loads_it(any_env, pool):
    import e2e_tasks
    env = any_env
    env.app()
    worker = env.worker(pool, "-n", "rv", "-c", "2", burst=False)
    _wait_ping(env, "rv")

    # terminate: the broadcast reaches the worker at once; the backend is re-read
    # only every SYNC_PUSHED (30) s while the control plane is up, so the kill
    # within a few seconds came over the control plane
    r = e2e_tasks.slow_steps.delay("victim", 60)
    env.wait_marker("victim.started")
    took = _terminated_within(env, r, 15)
    assert took < SYNC_PUSHED / 3, f"terminate took {took:.1f} s"
    assert r.state == "REVOKED" and env.marker_count("victim.finished") == 0
    assert r.id in _revoked_ids(env, "rv")

    # revoked before it is sent: once the worker knows the revoke (a broadcast
    # is asynchronous, as in Celery: a message fetched before it arrives runs),
    # it drops the task
    early = uuid.uuid4().hex
    assert env.admin("revoke", early).returncode == 0
    deadline = time.monotonic() + 10
    while early not in _revoked_ids(env, "rv"):
        assert time.monotonic() < deadline, "the revoke never reached the worker"
    dropped = e2e_tasks.slow.apply_async(("early", 0), task_id=early)
    with pytest.raises(Exception):
        dropped.get(timeout=20)
    assert dropped.state == "REVOKED" and env.marker_count("early.started") == 0
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0

    # a worker started after the revoke loads it from the result backend
    later = uuid.uuid4().hex
    assert env.admin("revoke", later).returncode == 0
    skipped = e2e_tasks.slow.apply_async(("later", 0), task_id=later)
    ran = e2e_tasks.add.delay(2, 3)
    code, out = env.run_worker(pool, "-n", "late")
    assert code == 0, out
    assert ran.get(timeout=10) == 5
    with pytest.raises(Exception):
        skipped.get(timeout=10)
    assert skipped.state == "REVOKED" and env.marker_count("later.started") == 0, out


def test_without_control_plane_the_backend_is_read_every_second(sqlite_env, pool):
    import e2e_tasks
    sqlite_env.app()
    r = e2e_tasks.slow_steps.delay("victim", 60)
    proc = sqlite_env.worker(pool, "--without-control", burst=False)
    sqlite_env.wait_marker("victim.started")
    assert _terminated_within(sqlite_env, r, 15) < 6.0
    assert sqlite_env.marker_count("victim.finished") == 0
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
