"""The worker's copy of the revoked ids (greenq/worker/revocations.py), with
the in-process memory broker and backend."""
from __future__ import annotations

import time

import greenq.worker.revocations as revocations_module
from greenq import GreenQ
from greenq.backends.base import Revocation
from greenq.drivers import get_driver
from greenq.worker.consumer import Worker


def make_worker(**kw):
    app = GreenQ("t", broker=f"memory://{time.monotonic_ns()}", **kw)

    @app.task
    def add(x, y):
        return x + y
    return app, add, Worker(app, get_driver("threads"), queues=["default"], concurrency=4, burst=True)


def test_add_reports_only_new_terminations_and_upgrades():
    _, _, w = make_worker()
    rev = w.revocations
    now = time.time()
    assert rev.add([Revocation("a", False, now), Revocation("b", True, now)]) == ["b"]
    assert "a" in rev and "b" in rev and "c" not in rev
    assert rev.add([Revocation("b", True, now)]) == []           # known already
    assert rev.add([Revocation("b", False, now)]) == []          # terminate is never undone
    assert rev.terminates("b")
    assert rev.add([Revocation("a", True, now + 1)]) == ["a"]    # upgraded to terminate
    assert rev.terminates("a") and rev.newest == now + 1


def test_copy_is_bounded_and_forgets_the_expired(monkeypatch):
    monkeypatch.setattr(revocations_module, "REVOCATIONS_MAX", 3)
    _, _, w = make_worker(result_expires=100)
    rev = w.revocations
    now = time.time()
    rev.add([Revocation("expired", False, now - 500)])
    rev.add([Revocation(f"t{i}", False, now + i) for i in range(5)])
    assert list(rev.ids) == ["t2", "t3", "t4"]


def test_worker_loads_revocations_once_not_per_batch():
    """A burst of 300 tasks in batches: the backend is read at start (and by
    the re-read loop), never once per fetched batch as before."""
    app, add, w = make_worker()
    skipped = add.delay(0, 0)
    skipped.revoke()
    results = [add.delay(i, i) for i in range(300)]
    backend = app.backend
    calls = {"revoked": 0, "revocations": 0}
    real_revoked, real_revocations = backend.revoked, backend.revocations

    def counting_revoked(ids):
        calls["revoked"] += 1
        return real_revoked(ids)

    def counting_revocations(since=0.0):
        calls["revocations"] += 1
        return real_revocations(since)
    backend.revoked, backend.revocations = counting_revoked, counting_revocations
    w.batch = 10                                   # at least 30 fetched batches
    assert w.run() == 0
    assert [r.get(timeout=1) for r in results] == [2 * i for i in range(300)]
    assert skipped.state == "REVOKED"
    assert calls["revoked"] == 0
    assert 1 <= calls["revocations"] <= 5, calls
    assert w.stats.revoked == 1 and w.stats.succeeded == 300


def test_revoke_command_is_checked_and_known_at_once():
    from greenq.control.commands import COMMANDS

    class Agent:
        pass
    _, _, w = make_worker()
    agent = Agent()
    agent.worker = w
    at = time.time()
    assert COMMANDS["revoke"](agent, ids=["x", "y"], terminate=True, at=at) == "2 revoked (terminate)"
    assert w.revocations.terminates("x") and w.revocations.ids["y"] == (True, at)
    assert COMMANDS["revoke"](agent, ids=["old"], at=123.0) == "1 revoked"   # older than result_expires
    assert "old" not in w.revocations
    assert COMMANDS["revoked"](agent) == ["x", "y"]
    for bad in ({"ids": "x"}, {"ids": [1]}, {"ids": [""]}, {"ids": ["x"], "terminate": "yes"}):
        try:
            COMMANDS["revoke"](agent, **bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad}")
