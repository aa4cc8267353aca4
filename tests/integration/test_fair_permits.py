"""Fair shares of host and cluster permits between processes
(greenq/resources/fair.py).  Two pools of one scope and resource stand for
two processes (each has a waiters' id of its own), on the real stores: the
host scope's marker files, and the cluster record of the coordination
interface on memory://, SQLite, Redis and RabbitMQ.  A fake wall clock (one
millisecond on at every look) dates the markers.  The real processes:
tests/e2e/test_resources_scopes_e2e.py."""
from __future__ import annotations

import math
import os
import time
import uuid
from typing import Any, Dict, List

import pytest

from greenq.resources import fair
from greenq.resources.base import PermitPool, pool_class
from greenq.resources.connections import ResourcePool
from greenq.resources.registry import Resources
from tests.conftest import make_config
from tests.integration.conftest import Env, _require_module

KEY = "fairness-test-key"


class Clock:
    """A wall clock that moves on a millisecond at every look, so that two
    markers written one after the other never carry the same time."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


class Pools:
    """make(limit) -> a pool of one resource, every pool on one fake clock, no read cached."""

    def __init__(self, kind: str, request: Any, tmp_path: Any, signing_key: str = "") -> None:
        self.kind = kind
        self.scope = "host" if kind == "host" else "cluster"
        self.clock = Clock()
        self.resource = f"r-{uuid.uuid4().hex[:8]}"
        self.env = None if kind == "host" else Env(kind, request, tmp_path)
        settings: Dict[str, Any] = {"lease_seconds": 5}
        if signing_key:
            settings["signing_key"] = signing_key
        self.config = (make_config(broker_url="memory://unused", **settings) if self.env is None
                       else self.env.config(**settings))
        self.made: List[PermitPool] = []

    def __call__(self, limit: int) -> Any:
        pool = pool_class(self.scope)(self.resource, limit, app_key=f"fair-{os.getpid()}", config=self.config,
                                      driver=self.env.driver if self.env else None)
        pool.waiters.clock = self.clock
        self.made.append(pool)
        return pool

    def teardown(self) -> None:
        if self.scope == "cluster" and self.made:
            try:
                self.made[0].coordination.forget(self.made[0].waiters.name)
            except Exception:   # (the memory:// store has nothing to forget)
                pass
        for pool in self.made:
            pool.close()
        if self.env is not None:
            self.env.teardown()


def _no_caching(monkeypatch) -> None:
    monkeypatch.setattr(fair.Waiters, "read_every", 0.0)
    monkeypatch.setattr(fair.RecordWaiters, "read_every", 0.0)
    monkeypatch.setattr(fair, "REFRESH", 0.0)
    monkeypatch.setattr(fair, "MARK_TTL", 5.0)          # longer than the tests' clock moves, unless they say
    monkeypatch.setattr(fair, "TURN", 0.0)              # a turn is one grant, unless they say


KINDS = ["host", "memory", "sqlite", pytest.param("redis", marks=pytest.mark.redis),
         pytest.param("amqp", marks=pytest.mark.amqp)]


@pytest.fixture(params=KINDS)
def pools(request, tmp_path, monkeypatch):
    if request.param != "host":
        _require_module(request.param, "broker")
    _no_caching(monkeypatch)
    made = Pools(request.param, request, tmp_path)
    yield made
    made.teardown()


def test_the_share():
    assert fair.share(45, "a", {}) is None                            # nobody else waits: no bound
    # the place left over goes to whoever has waited longest (the lower key), whatever the clock
    assert fair.share(45, "a", {"b": 2.0}, 1.0) == 23 and fair.share(45, "b", {"a": 1.0}, 2.0) == 22
    assert fair.share(1, "a", {"b": 2.0}, 1.0) == 1 and fair.share(1, "b", {"a": 1.0}, 2.0) == 0
    assert fair.share(1, "a", {"b": 2.0}) == 0                         # no key of its own: at the back
    assert fair.share(1, "a", {"b": 1.0}, 1.0) == 1 and fair.share(1, "b", {"a": 1.0}, 1.0) == 0  # ties: by id
    # the shares of the waiting processes add up to the limit exactly, they differ by
    # one at most, and the extra places go to the longest waiters
    for limit in (1, 2, 3, 7, 45):
        for n in (2, 3, 5):
            keys = {f"p{i}": float((i * 7) % n) + i / 100 for i in range(n)}
            shares = {me: fair.share(limit, me, {o: k for o, k in keys.items() if o != me}, keys[me])
                      for me in keys}
            assert sum(shares.values()) == limit and max(shares.values()) - min(shares.values()) <= 1, shares
            first = sorted(keys, key=keys.get)[:limit % n]
            assert all(shares[me] == limit // n + (me in first) for me in keys), (limit, n, shares)


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


def test_a_limit_of_one_goes_to_the_process_that_has_waited_longest(pools):
    a, b = pools(1), pools(1)
    assert a.try_acquire("a0")
    assert not b.try_acquire("b0")                          # b waits
    a.release("a0")
    assert not a.try_acquire("a1"), "b has waited longer: a's own waiter does not take the permit a freed"
    assert b.try_acquire("b0")
    assert not a.try_acquire("a1")                          # a waits (b holds it) ...
    b.release("b0")
    assert not b.try_acquire("b1"), "... and now it has waited longest"
    assert a.try_acquire("a1")


def test_a_turn_lasts_TURN_seconds_from_its_first_grant(pools, monkeypatch):
    """Within its turn a process takes again what it frees (no hand-over, and
    no poll of the other, per task); then the other has waited longest."""
    monkeypatch.setattr(fair, "TURN", 0.5)
    a, b = pools(1), pools(1)
    assert a.try_acquire("a0")                              # a alone: no turn, at the back once others come
    assert not b.try_acquire("b0")                          # b waits
    a.release("a0")
    assert not a.try_acquire("a1")
    assert b.try_acquire("b0")                              # b's turn begins
    for n in range(1, 4):
        b.release(f"b{n - 1}")
        assert b.try_acquire(f"b{n}"), "within its turn b takes again what it frees"
        assert not a.try_acquire("a1")
    pools.clock.now += 0.5                                  # b's turn is over
    b.release("b3")
    assert not b.try_acquire("b4")
    assert a.try_acquire("a1")                              # a's turn
    a.release("a1")
    assert a.try_acquire("a2") and not b.try_acquire("b4")
    pools.clock.now += 0.5
    a.release("a2")
    assert not a.try_acquire("a3") and b.try_acquire("b4")


def test_a_process_that_stalls_keeps_its_place_in_line(pools):
    """The clock turns of before gave a stalled process's turn to the other:
    now a process that does not ask for a while (a loaded machine) is still
    first in line when it asks again, however long, and whatever the clock."""
    a, b = pools(1), pools(1)
    assert a.try_acquire("a0")
    assert not b.try_acquire("b0")                          # b waits, then stalls
    for _ in range(5):
        pools.clock.now += 0.3                              # more than one of the old turns each time
        a.release("a0")
        assert not a.try_acquire("a0"), "b is first in line"
        assert not a.try_acquire("a0")
    assert b.try_acquire("b0")
    # stalled so long that its marker stopped counting: meanwhile a runs alone ...
    assert not a.try_acquire("a1")                          # a waits (b holds it), first in line now
    b.release("b0")
    assert a.try_acquire("a1")
    assert not b.try_acquire("b1")
    pools.clock.now += fair.MARK_TTL + 0.1                  # b gone quiet longer than a marker counts
    assert a.fair_share() is None
    a.release("a1")
    assert a.try_acquire("a2")                              # a alone: takes it again
    assert not b.try_acquire("b1")                          # ... b is back, and first in line again
    a.release("a2")
    assert not a.try_acquire("a3")
    assert b.try_acquire("b1")


def test_two_processes_alternate_at_a_limit_of_one(pools):
    """Whoever frees the permit asks first (the case that gave one process all
    the work): still each gets every other grant."""
    a, b = pools(1), pools(1)
    got: List[str] = []
    holder = None
    order = [(a, "a"), (b, "b")]
    for n in range(20):
        # the one that just released asks first, then the other; then the holder releases
        taken = None
        for pool, name in (order if holder != "b" else order[::-1]):
            if pool.try_acquire(f"{name}{n}"):
                assert taken is None, "the limit holds"
                taken = (pool, name)
        assert taken is not None, f"round {n}: the free permit stayed free"
        got.append(taken[1])
        holder = taken[1]
        taken[0].release(f"{holder}{n}")
    assert got == ["a", "b"] * 10, got


def test_three_processes_at_a_limit_of_one_are_served_in_order_of_waiting(pools):
    a, b, c = pools(1), pools(1), pools(1)
    assert a.try_acquire("a0")
    assert not c.try_acquire("c0")                          # c waits, then b
    assert not b.try_acquire("b0")
    a.release("a0")
    assert not a.try_acquire("a1") and not b.try_acquire("b0")
    assert c.try_acquire("c0")
    c.release("c0")
    assert not c.try_acquire("c1") and not a.try_acquire("a1")
    assert b.try_acquire("b0")
    b.release("b0")
    assert not b.try_acquire("b1") and not c.try_acquire("c1")
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
    assert not b.try_acquire("b0")                         # another process waits now, and longest
    conns.release("t2")
    assert conns.parked() == 0 and conns.open_connections() == 0, "given back, its connection closed"
    assert not conns.try_acquire("t3")                     # b's: a waits now
    assert b.try_acquire("b0")
    b.release("b0")
    assert not b.try_acquire("b1")
    assert conns.try_acquire("t3")                         # a has waited longest: it takes a permit again
    conns.release("t3")


def test_a_dead_hosts_marker_is_removed_after_a_while(tmp_path):
    waiters = fair.FileWaiters(str(tmp_path))
    gone = tmp_path / "w.1.dead"
    gone.write_text("")
    old = time.time() - fair.FORGET - 5
    os.utime(gone, (old, old))
    live = tmp_path / "w.2.live"
    live.write_text("")
    assert list(waiters._read(time.time())) == ["2.live"]
    assert not gone.exists() and live.exists()


# -- marks that are not times -----------------------------------------------------------
# A mark whose time is not a finite number, or lies far ahead, would count as a
# waiter for ever: every process would keep to a share of the limit (a limit
# of 1: nobody but the forged "first in line" could take it).  Written
# straight into the stores: host, a marker file; cluster, a field of the
# waiters' record through the coordination interface (with a signing key,
# signed with it: what a writer holding the key would do).

FORGED_FIELDS = [b"inf", b"-inf", b"nan", b"1e400", b"1e400 1", b"inf 0", b"nan 0",
                 b"%(future).3f 0", b"%(now).3f -1", b"%(now).3f 1e3", b"%(now).3f 99999999999999999999",
                 b"%(now).3f 1 2", b"\xff\xfe", b""]


@pytest.fixture(params=[pytest.param(kind, id=kind) for kind in ["host", "sqlite"]]
                + [pytest.param("redis", marks=pytest.mark.redis, id="redis"),
                   pytest.param("amqp", marks=pytest.mark.amqp, id="amqp")])
def stores(request, tmp_path, monkeypatch):
    """Like ``pools`` on the real stores, with and without a signing key
    (host: no key; what a process of the user can write is trusted the same)."""
    if request.param != "host":
        _require_module(request.param, "broker")
    _no_caching(monkeypatch)
    made: List[Pools] = []

    def make(signing_key: str = "") -> Pools:
        directory = tmp_path / f"s{len(made)}"
        directory.mkdir()
        made.append(Pools(request.param, request, directory, signing_key))
        return made[-1]
    make.kind = request.param
    yield make
    for pools_ in made:
        pools_.teardown()


def forge_cluster(pool: PermitPool, fields: Dict[str, bytes], raw: bool = False) -> None:
    coordination = pool.coordination.inner if raw else pool.coordination       # type: ignore[attr-defined]
    name = pool.waiters.name                                                    # type: ignore[attr-defined]
    for _ in range(5):
        record = coordination.read(name)
        if coordination.compare_and_set(name, record, {**record, **fields}, ttl=fair.FORGET):
            return
    raise AssertionError("could not write the forged marks")


def forge_host(pool: PermitPool, now: float) -> List[str]:
    """Marker files of processes that do not exist, dated far ahead."""
    directory = pool.waiters.directory                                          # type: ignore[attr-defined]
    names = []
    for n, ns in enumerate([2 ** 62, int((now + 60) * 1e9), int((now + 3 * fair.FUTURE) * 1e9)]):
        path = os.path.join(directory, f"w.{n}.forged")
        with open(path, "w"):
            pass
        os.utime(path, ns=(0, ns))          # (its wait began in 1970: first in line, if it counted)
        names.append(path)
    with pytest.raises((OverflowError, ValueError)):
        os.utime(names[0], (math.inf, math.inf))    # a file's time cannot be inf or nan
    return names


@pytest.mark.parametrize("signed", [False, True], ids=["unsigned", "signed"])
def test_a_mark_that_is_not_a_time_caps_no_share(stores, signed):
    if stores.kind == "host" and signed:
        pytest.skip("host scope: marker files, no signing")
    pools = stores(KEY if signed else "")
    a, b = pools(1), pools(1)
    now = pools.clock.now
    if pools.scope == "host":
        forged = forge_host(a, now)
    else:
        forge_cluster(a, {f"forged-{n}": value % {b"now": now, b"future": now + 60} if b"%" in value else value
                          for n, value in enumerate(FORGED_FIELDS)})
        assert len(a.coordination.read(a.waiters.name)) == len(FORGED_FIELDS)     # they are there
    # a alone: no share, no contended polling, and the whole limit (1)
    assert a.fair_share() is None and a.poll_interval() == fair.REMOTE_POLL
    assert a.try_acquire("a0") and a.in_use() == 1
    # the limit still holds, and b waits as the one other process
    assert not b.try_acquire("b0")
    assert a.fair_share() == 0, "the forged marks count as no process: b is the one other, first in line"
    a.release("a0")
    assert not a.try_acquire("a1") and b.try_acquire("b0") and not a.try_acquire("a1")
    # the marks that never come to count are gone: host, removed by the reader;
    # cluster, dropped by the next writer (b's and a's markers only are left)
    if pools.scope == "host":
        assert not any(os.path.exists(path) for path in forged)
    else:
        assert set(a.coordination.read(a.waiters.name)) == {a.waiters.me, b.waiters.me}


@pytest.mark.parametrize("kind", ["sqlite", pytest.param("redis", marks=pytest.mark.redis)])
def test_an_unsigned_mark_is_ignored_when_a_signing_key_is_set(kind, request, tmp_path, monkeypatch):
    """A writer without the key cannot make a process wait: its live-looking mark is not read."""
    _require_module(kind, "broker")
    _no_caching(monkeypatch)
    pools = Pools(kind, request, tmp_path, KEY)
    try:
        a = pools(1)
        forge_cluster(a, {"intruder": f"{pools.clock.now:.3f} 0".encode()}, raw=True)
        assert a.fair_share() is None and a.try_acquire("a0")
        assert not pools(1).try_acquire("b0") and a.fair_share() == 0
    finally:
        pools.teardown()


def test_a_mark_a_little_ahead_counts_until_it_is_old(pools):
    """A clock a little ahead (two machines) is a waiter's, within ``FUTURE``:
    it counts, and stops counting ``MARK_TTL`` after its time, not never."""
    a = pools(2)
    now = pools.clock.now
    ahead = now + fair.FUTURE / 2
    if pools.scope == "host":
        path = os.path.join(a.waiters.directory, "w.9.ahead")
        with open(path, "w"):
            pass
        os.utime(path, (ahead, ahead))
    else:
        forge_cluster(a, {"ahead": f"{ahead:.3f} 1".encode()})
    assert a.fair_share() == 1
    pools.clock.now = ahead + fair.MARK_TTL + 0.1
    assert a.fair_share() is None
