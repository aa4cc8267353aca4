"""The worker's copy of the revoked ids (greenq/worker/revocations.py), with
the in-process memory broker and backend."""
from __future__ import annotations

import time

import greenq.worker.revocations as revocations_module
from greenq import GreenQ
from greenq.backends.base import Revocation
from greenq.drivers import get_driver
from greenq.worker.consumer import Worker
from greenq.worker.revocations import CLOCK_SKEW, SYNC_OVERLAP


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
    assert rev.terminates("a")
    assert rev.newest == 0.0          # only what sync() reads from the backend moves the re-read cursor


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
    for bad_at in ("NaN", float("nan"), float("inf"), -5.0, True, None, 10 ** 400, at + 10 ** 9):
        before = time.time()
        assert COMMANDS["revoke"](agent, ids=["at"], at=bad_at) == "1 revoked"
        assert before <= w.revocations.ids.pop("at")[1] <= time.time(), bad_at     # taken as now
    ahead = time.time() + CLOCK_SKEW / 2                                 # within the allowance: kept
    COMMANDS["revoke"](agent, ids=["skewed"], at=ahead)
    assert w.revocations.ids["skewed"] == (False, ahead)
    assert w.revocations.newest == 0.0
    for bad in ({"ids": "x"}, {"ids": [1]}, {"ids": [""]}, {"ids": ["x"], "terminate": "yes"}):
        try:
            COMMANDS["revoke"](agent, **bad)
        except ValueError:
            continue
        raise AssertionError(f"accepted {bad}")


def test_a_future_at_does_not_make_the_re_read_skip_later_revocations():
    """A broadcast (or a backend record) whose ``at`` is far ahead of the
    worker's clock -- a sender with a wrong clock, a garbled command -- used to
    move the re-read cursor: every later re-read asked for revocations made
    after (that ``at`` - 60 s) and missed those recorded meanwhile.  The cursor
    now moves only with what the backend returned, and never past the worker's
    own clock; the far-future ``at`` is taken as now, so the entry expires."""
    from greenq.control.commands import COMMANDS

    class Agent:
        pass
    app, add, w = make_worker(result_expires=3600)
    agent = Agent()
    agent.worker = w
    w.backend = app.backend            # as Worker.run does
    rev = w.revocations
    rev.first_load()
    assert rev.loaded and rev.newest == 0.0
    year = 365 * 24 * 3600.0

    COMMANDS["revoke"](agent, ids=["future-cmd"], at=time.time() + year)
    rev.received(["future-direct"], False, time.time() + year)     # past the command's check too
    assert "future-cmd" in rev and "future-direct" in rev

    # a revoke recorded in the backend afterwards (the broadcast was missed)
    later = add.delay(1, 1)
    app.backend.revoke(later.id)
    rev.sync()
    assert later.id in rev, "the re-read skipped a revocation recorded after the far-future broadcast"
    assert rev.newest <= time.time()
    for tid in ("future-cmd", "future-direct"):                     # taken as now: it expires
        assert rev.ids[tid][1] <= time.time()

    # a backend record stamped far ahead (the revoker's clock) is read, but the
    # cursor stays at the worker's clock: a revoke recorded next is still read
    store = app.backend._store
    ahead = add.delay(2, 2).id
    app.backend.revoke(ahead)
    with store.lock:
        terminate, at, expires_at = store.revoked[ahead]
        store.revoked[ahead] = (terminate, at + year, expires_at + year)
    rev.sync()
    assert ahead in rev and rev.ids[ahead][1] <= time.time()
    assert rev.newest <= time.time()
    last = add.delay(3, 3).id
    app.backend.revoke(last)
    rev.sync()
    assert last in rev


def test_the_cursor_follows_the_backend_with_its_overlap():
    app, add, w = make_worker()
    w.backend = app.backend            # as Worker.run does
    rev = w.revocations
    asked = []
    real = app.backend.revocations

    def spying(since=0.0):
        asked.append(since)
        return real(since)
    app.backend.revocations = spying
    rev.sync()
    first = add.delay(0, 0).id
    app.backend.revoke(first)
    recorded = real()[-1].at
    rev.sync()                                   # reads it: the cursor moves to its ``at``
    assert first in rev and rev.newest == recorded
    rev.received(["pushed"], False, recorded + 30)   # a broadcast: kept, cursor unchanged
    assert "pushed" in rev and rev.newest == recorded
    rev.sync()
    assert asked == [0.0, 0.0, recorded - SYNC_OVERLAP]
