"""Fair shares of host and cluster permits between processes
(greenq/resources/fair.py).  Two pools of one scope and resource stand for
two processes (each has a waiters' id of its own); a fake wall clock picks
whose turn it is.  The real processes: tests/e2e/test_resources_scopes_e2e.py."""
from __future__ import annotations

import os
import time
import uuid
from typing import Any, List

import pytest

from greenq.resources import fair
from greenq.resources.base import PermitPool, pool_class
from greenq.resources.connections import ResourcePool
from greenq.resources.registry import Resources
from tests.conftest import make_config


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def turn_of(pool: PermitPool, others: List[PermitPool], clock: Clock) -> None:
    """Move ``clock`` on to the next slice that is ``pool``'s turn (limit 1: the one extra place)."""
    ids = sorted([pool.waiters.me] + [o.waiters.me for o in others])   # type: ignore[attr-defined]
    slot = ids.index(pool.waiters.me)                                    # type: ignore[attr-defined]
    k = int(clock.now / fair.SLICE) + 1
    while k % len(ids) != slot:
        k += 1
    clock.now = k * fair.SLICE + fair.SLICE / 2


@pytest.fixture(params=["host", "memory", "sqlite"])
def pools(request, tmp_path, monkeypatch):
    """make(limit) -> a pool of one resource; every pool on one fake clock, no read cached."""
    monkeypatch.setattr(fair, "HOST_READ", 0.0)
    monkeypatch.setattr(fair, "CLUSTER_READ", 0.0)
    monkeypatch.setattr(fair.Waiters, "read_every", 0.0)
    monkeypatch.setattr(fair.RecordWaiters, "read_every", 0.0)
    monkeypatch.setattr(fair, "REFRESH", 0.0)
    monkeypatch.setattr(fair, "MARK_TTL", 5.0)          # longer than the turns the tests move through
    clock = Clock()
    scope = "host" if request.param == "host" else "cluster"
    url = (f"memory://fair-{uuid.uuid4().hex[:8]}" if request.param == "memory"
           else f"sqlite:///{tmp_path / 'broker.sqlite3'}" if request.param == "sqlite" else "memory://unused")
    config = make_config(broker_url=url, lease_seconds=5)
    resource = f"r-{uuid.uuid4().hex[:8]}"
    made: List[PermitPool] = []

    def make(limit: int) -> Any:
        pool = pool_class(scope)(resource, limit, app_key=f"fair-{os.getpid()}", config=config)
        pool.waiters.clock = clock
        made.append(pool)
        return pool
    make.clock = clock
    yield make
    for pool in made:
        pool.close()


def test_the_share():
    assert fair.share(45, "a", [], 0.0) is None                       # nobody else waits: no bound
    assert {fair.share(45, "a", ["b"], t) for t in (0.0, fair.SLICE)} == {22, 23}
    assert {fair.share(1, "a", ["b"], t) for t in (0.0, fair.SLICE)} == {0, 1}
    # at any moment the shares of the waiting processes add up to the limit or more, and
    # each process's turn comes once every n slices
    for limit in (1, 2, 3, 7, 45):
        for n in (2, 3, 5):
            ids = [f"p{i}" for i in range(n)]
            for k in range(n):
                t = k * fair.SLICE + 0.01
                shares = [fair.share(limit, me, [o for o in ids if o != me], t) for me in ids]
                assert sum(shares) >= limit and max(shares) - min(shares) <= 1, (limit, n, shares)


def test_a_process_that_holds_its_share_while_another_waits_gets_no_more(pools):
    a, b = pools(4), pools(4)
    assert all(a.try_acquire(f"a{i}") for i in range(4))    # nobody else waits: the whole limit
    assert a.fair_share() is None and a.poll_interval() == fair.REMOTE_POLL
    assert not b.try_acquire("b0")                         # b waits now (its marker)
    assert a.fair_share() == 2 and a.poll_interval() == fair.CONTENDED_POLL
    for i in range(4):
        a.release(f"a{i}")
    # a takes its share (2 of 4) and no more while b waits, though 2 are free ...
    assert a.try_acquire("a4") and a.try_acquire("a5") and not a.try_acquire("a6")
    # ... which b takes (both wait now: b's share is 2 as well)
    assert b.try_acquire("b0") and b.try_acquire("b1") and not b.try_acquire("b2")
    assert a.in_use() == b.in_use() == 2 and b.fair_share() == 2


def test_a_limit_of_one_goes_by_turns(pools):
    a, b = pools(1), pools(1)
    clock = pools.clock
    assert a.try_acquire("a0")
    assert not b.try_acquire("b0")                          # b waits
    turn_of(b, [a], clock)
    a.release("a0")
    assert not a.try_acquire("a1"), "b's turn: a's own waiter does not take the permit a freed"
    assert b.try_acquire("b0")
    turn_of(a, [b], clock)
    b.release("b0")
    assert not b.try_acquire("b1")
    assert a.try_acquire("a1")


def test_a_marker_counts_only_while_it_is_refreshed(pools):
    a, b = pools(2), pools(2)
    assert a.try_acquire("a0") and a.try_acquire("a1")
    assert not b.try_acquire("b0")                          # b waits
    assert a.fair_share() == 1
    pools.clock.now += fair.MARK_TTL + 0.01                 # b stopped asking (or died)
    assert a.fair_share() is None and a.poll_interval() == fair.REMOTE_POLL


def test_a_closed_pool_waits_no_more(pools):
    a, b = pools(2), pools(2)
    assert a.try_acquire("a0") and a.try_acquire("a1")
    assert not b.try_acquire("b0")
    assert a.fair_share() == 1
    b.close()
    assert a.fair_share() is None


def test_a_parked_permit_goes_back_to_the_scope_when_another_process_waits(pools):
    a, b = pools(1), pools(1)
    config = a.config
    resources = Resources(config, app_key=a.app_key, settings={})
    resources.pools[a.name] = a
    conns = ResourcePool(a.name, open=object, close=lambda conn: None)
    conns.bind(resources)
    assert conns.try_acquire("t1")
    with conns.connection():
        pass
    conns.release("t1")
    assert conns.parked() == 1                             # nobody else waits: kept with its connection
    assert conns.try_acquire("t2") and conns.parked() == 0
    with conns.connection():
        pass
    assert not b.try_acquire("b0")                         # another process waits now
    turn_of(b, [a], pools.clock)
    conns.release("t2")
    assert conns.parked() == 0 and conns.open_connections() == 0, "given back, its connection closed"
    assert b.try_acquire("b0")
    b.release("b0")
    turn_of(a, [b], pools.clock)
    assert conns.try_acquire("t3")                         # a's turn: it takes a permit again
    conns.release("t3")


def test_a_dead_hosts_marker_is_removed_after_a_while(tmp_path):
    waiters = fair.FileWaiters(str(tmp_path))
    gone = tmp_path / "w.1.dead"
    gone.write_text("")
    old = time.time() - fair.FORGET - 5
    os.utime(gone, (old, old))
    live = tmp_path / "w.2.live"
    live.write_text("")
    assert waiters._read(time.time()) == ["2.live"]
    assert not gone.exists() and live.exists()
