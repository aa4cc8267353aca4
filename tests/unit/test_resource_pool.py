"""Connections that hold permits: ``app.resource_pool`` (greenq/resources/connections.py,
docs/resources.md recipe "A database pool sized from its permit").

The invariant under test everywhere: connections open in a process never
exceed the permits it holds (tasks' plus parked), so never the limit.  The
pool-level tests drive the permits by hand on a fake clock; the worker tests
run a real in-process worker (threads driver, --burst) whose tasks use the
pool, with a fake downstream that counts its open connections from its side."""
from __future__ import annotations

import random
import threading
import time

import pytest

from greenq import GreenQ
from greenq.drivers import get_driver
from greenq.exceptions import ConfigError
from greenq.resources.connections import ResourcePool
from greenq.worker.consumer import Worker

FETCH_TIMEOUT = 0.1
DEADLINE = 30.0


def make_app(**resources):
    app = GreenQ("rpool", broker=f"memory://rpool-{time.monotonic_ns()}", config_file=False)
    for resource, spec in resources.items():
        for key, value in spec.items():
            app.config.set(f"resource:{resource}", key, value, origin="test")
    return app


class Downstream:
    """A fake database: counts the connections open at once, from its side."""

    def __init__(self):
        self.lock = threading.Lock()
        self.open = self.most = self.opened = 0

    def connect(self):
        with self.lock:
            self.open += 1
            self.opened += 1
            self.most = max(self.most, self.open)
        return Conn(self)


class Conn:
    def __init__(self, server):
        self.server = server
        self.closed = False

    def query(self, value):
        assert not self.closed, "a closed connection was used"
        return value

    def close(self):
        assert not self.closed, "closed twice"
        self.closed = True
        with self.server.lock:
            self.server.open -= 1


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def bound_pool(limit=3, idle_seconds=5.0, max_age=300.0, **section):
    app = make_app(pg={"limit": limit, **section})
    db = Downstream()
    clock = Clock()
    pool = app.resource_pool("pg", open=db.connect, idle_seconds=idle_seconds, max_age=max_age)
    pool.clock = clock
    app.permits()                       # a script's permits: the pool binds to them
    return app, pool, db, clock


def check(pool, db, app):
    inner = pool.inner
    assert db.open == pool.open_connections()
    assert db.open <= pool.holders() + pool.parked() == pool.in_use() == inner.in_use() <= max(inner.limit, inner.in_use())
    assert inner.in_use() <= app.config.resource_settings()["pg"].limit


# -- the pool on its own ------------------------------------------------------------
def test_a_connection_keeps_its_permit_and_the_next_holder_takes_both():
    app, pool, db, _ = bound_pool(limit=2)
    assert app.permits().pool("pg") is pool and pool.inner is not None
    assert pool.try_acquire("t1")
    with pool.connection() as conn:
        assert conn.query(1) == 1
    pool.release("t1")
    assert (db.open, pool.parked(), pool.inner.in_use(), pool.holders(), pool.in_use()) == (1, 1, 1, 0, 1)
    assert pool.try_acquire("t2") and pool.parked() == 0 and pool.inner.in_use() == 1
    with pool.connection() as again:
        assert again is conn
    pool.release("t2")
    assert db.opened == 1 and db.open == 1
    check(pool, db, app)
    pool.close()
    assert db.open == 0 and pool.inner.in_use() == 0


def test_a_connection_needs_a_permit():
    app, pool, db, _ = bound_pool(limit=2)
    with pytest.raises(RuntimeError, match="needs a permit"):
        with pool.connection():
            pass
    assert pool.try_acquire("t1")
    with pool.connection():
        with pytest.raises(RuntimeError, match="1 connections out for 1 permits"):
            with pool.connection():
                pass
    pool.release("t1")
    assert db.opened == 1 and db.open == 1


def test_a_holder_without_a_connection_gives_its_permit_back():
    app, pool, db, _ = bound_pool(limit=2)
    assert pool.try_acquire("t1")
    pool.release("t1")
    assert pool.parked() == 0 and pool.inner.in_use() == 0 and db.opened == 0


def test_a_block_that_raises_closes_its_connection_and_frees_the_permit():
    app, pool, db, _ = bound_pool(limit=1)
    assert pool.try_acquire("t1")
    with pytest.raises(KeyError):
        with pool.connection():
            raise KeyError("broken")
    pool.release("t1")
    assert db.open == 0 and pool.parked() == 0 and pool.inner.in_use() == 0


def test_an_idle_connection_is_closed_and_its_permit_given_back_after_idle_seconds():
    app, pool, db, clock = bound_pool(limit=2, idle_seconds=5.0)
    for holder in ("a", "b"):
        assert pool.try_acquire(holder)
    with pool.connection(), pool.connection():
        pass
    pool.release("a")
    pool.release("b")
    assert db.open == 2 and pool.parked() == 2
    clock.now += 4.0
    pool.renew()
    assert db.open == 2, "closed before idle_seconds"
    clock.now += 1.5
    pool.renew()
    assert db.open == 0 and pool.parked() == 0 and pool.inner.in_use() == 0


def test_an_old_connection_is_closed_on_its_return():
    app, pool, db, clock = bound_pool(limit=2, max_age=30.0)
    assert pool.try_acquire("a")
    with pool.connection():
        clock.now += 31.0
    pool.release("a")
    assert db.open == 0 and pool.parked() == 0 and pool.inner.in_use() == 0


def test_a_lowered_limit_closes_idle_connections_down_to_it():
    app, pool, db, clock = bound_pool(limit=4)
    for holder in "abcd":
        assert pool.try_acquire(holder)
    with pool.connection(), pool.connection(), pool.connection():
        pass
    pool.release("a")
    pool.release("b")
    # a's permit went back (c and d stand under the 3 idle connections with b's)
    assert db.open == 3 and pool.parked() == 1 and pool.holders() == 2 and pool.inner.in_use() == 3
    app.permits().pool("pg").set_share(2)     # as an adaptive limit does
    # 2 permits held by holders (c, d; one connection idle for them), none parked
    assert pool.parked() == 0 and pool.inner.in_use() == 2 and db.open == 2
    check(pool, db, app)
    app.permits().set_limit("pg", 1)          # below the holders: nothing is taken from them
    assert pool.inner.in_use() == 2 and db.open <= 2
    pool.release("c")
    pool.release("d")
    assert pool.inner.in_use() <= 1 and db.open <= 1
    check(pool, db, app)


def test_a_lost_permit_takes_its_idle_connection_with_it():
    """The scope's pool proves fewer permits than we count (a cluster permit
    lost after failed renewals; which one, only it knows): every parked permit
    goes, with its connection, and the holders' are left alone."""
    app, pool, db, _ = bound_pool(limit=3)
    for holder in "ab":
        assert pool.try_acquire(holder)
    with pool.connection(), pool.connection():
        pass
    pool.release("a")
    pool.release("b")
    assert pool.parked() == 2
    inner = pool.inner
    lost = next(iter(inner._holders)) if hasattr(inner, "_holders") else None
    assert lost is not None, "the process pool's holders"
    inner.release(lost)                       # gone behind our back
    pool.renew()
    assert inner.in_use() == 0 and pool.parked() == 0 and db.open == 0


@pytest.mark.parametrize("seed", range(20))
def test_random_use_never_opens_more_connections_than_permits(seed):
    rng = random.Random(seed)
    app, pool, db, clock = bound_pool(limit=5, idle_seconds=3.0, max_age=20.0)
    holders, out = [], []                     # held permits; (holder, context manager) using a connection
    names = iter(range(10**6))
    for _ in range(400):
        op = rng.random()
        if op < 0.3:
            holder = f"h{next(names)}"
            if pool.try_acquire(holder):
                holders.append(holder)
        elif op < 0.55 and len(out) < len(holders):
            cm = pool.connection()
            cm.__enter__()
            out.append(cm)
        elif op < 0.75 and out:
            cm = out.pop(rng.randrange(len(out)))
            if rng.random() < 0.1:
                cm.__exit__(KeyError, KeyError("x"), None)
            else:
                cm.__exit__(None, None, None)
        elif op < 0.9 and len(holders) > len(out):
            pool.release(holders.pop(rng.randrange(len(holders))))
        elif op < 0.95:
            clock.now += rng.random() * 4
            pool.renew()
        else:
            app.permits().set_limit("pg", rng.randint(1, 5))
        check(pool, db, app)
    for cm in out:
        cm.__exit__(None, None, None)
    for holder in holders:
        pool.release(holder)
    check(pool, db, app)
    pool.close()
    assert db.open == 0 and pool.inner.in_use() == 0


def test_resource_pool_is_checked_at_once():
    app = make_app(pg={"limit": 2})
    with pytest.raises(ConfigError, match="did you mean"):
        app.resource_pool("pgg", open=object)
    app.resource_pool("pg", open=object)
    with pytest.raises(ValueError, match="exists already"):
        app.resource_pool("pg", open=object)
    with pytest.raises(ValueError, match="idle_seconds"):
        ResourcePool("pg", open=object, idle_seconds=-1)


# -- in a worker ----------------------------------------------------------------------
def run(worker):
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("code", worker.run()), daemon=True)
    thread.start()
    thread.join(DEADLINE)
    if thread.is_alive():
        worker.request_stop(cold=True)
        thread.join(10)
        raise AssertionError("the worker did not finish: a permit was not given back?")
    return out["code"]


@pytest.mark.parametrize("adaptive", [False, True])
def test_a_worker_reuses_connections_and_never_opens_more_than_the_limit(adaptive):
    section = {"limit": 3}
    if adaptive:
        section.update(adaptive="true", errors="TimeoutError")
    app = make_app(pg=section)
    db = Downstream()
    pool = app.resource_pool("pg", open=db.connect)

    @app.task(resources={"pg": 1})
    def query(n):
        with pool.connection() as conn:
            time.sleep(0.005)
            return conn.query(n)
    results = [query.delay(n) for n in range(60)]
    worker = Worker(app, get_driver("threads"), queues=["default"], concurrency=10, burst=True,
                    fetch_timeout=FETCH_TIMEOUT)
    assert run(worker) == 0
    assert [r.get(timeout=5) for r in results] == list(range(60))
    assert db.most <= 3, db.most
    assert db.opened <= 10, f"{db.opened} connections opened for 60 tasks: not reused"
    assert db.open == 0, "the worker's stop closes the idle connections"
    assert worker.resources.pool("pg") is pool and pool.inner.in_use() == 0


def test_a_task_without_the_permit_cannot_take_a_connection():
    app = make_app(pg={"limit": 3})
    db = Downstream()
    pool = app.resource_pool("pg", open=db.connect)

    @app.task
    def rogue():
        with pool.connection():
            return "took one"
    result = rogue.delay()
    worker = Worker(app, get_driver("threads"), queues=["default"], concurrency=2, burst=True,
                    fetch_timeout=FETCH_TIMEOUT)
    assert run(worker) == 0
    with pytest.raises(Exception, match="needs a permit"):
        result.get(timeout=5)
    assert db.opened == 0


def test_an_adaptive_limit_learns_from_the_connections_not_the_holders():
    """With a resource pool, the adaptive limit's samples are the time each
    connection was out (the downstream's time) and the failures to open one;
    the holders' own samples (the admission step's, app.resource's) are ignored."""
    app, pool, db, clock = bound_pool(limit=5, adaptive="true", errors="ConnectionRefusedError")
    adaptive = app.permits().adaptive["pg"]
    seen = []
    real = adaptive.on_sample
    adaptive.on_sample = lambda latency, in_flight, error=None, held=None, lag=0.0, lag_high=None: (
        seen.append((latency >= 0.02, in_flight, type(error).__name__, held)),
        real(latency, in_flight=in_flight, error=error, held=held, lag=lag))[1]
    assert pool.try_acquire("a") and pool.try_acquire("b")
    with pool.connection(), pool.connection():
        time.sleep(0.02)
    app.permits().sample("pg", 9.0, 2, None)          # what the admission step sends: ignored
    # in flight: the connections out; held: the permits (for the app-limited guard)
    assert seen == [(True, 2, "NoneType", 2), (True, 1, "NoneType", 2)], seen
    pool.release("a")
    pool.release("b")
    refused = ConnectionRefusedError("too many clients")

    def refuse():
        raise refused
    pool._open = refuse
    for conn, _, _ in pool._idle:
        conn.close()
    pool._idle.clear()
    pool._trim()
    assert pool.try_acquire("c")
    with pytest.raises(ConnectionRefusedError):
        with pool.connection():
            pass
    assert seen[-1] == (False, 1, "ConnectionRefusedError", 1)


def test_an_open_refused_with_a_listed_error_is_tried_again_before_the_task_sees_it():
    """An adaptive limit finds a ceiling latency did not show by the refusals
    it is told of (``errors``): the first refusal is its sample (the cut), and
    the open is tried again (OPEN_RETRIES), so the task meets no error while
    the connections over the new limit close; another error is not retried."""
    from greenq.resources import connections
    app, pool, db, _ = bound_pool(limit=5, adaptive="true", errors="ConnectionRefusedError")
    adaptive = app.permits().adaptive["pg"]
    seen = []
    real = adaptive.on_sample
    adaptive.on_sample = lambda latency, in_flight, error=None, held=None, lag=0.0, lag_high=None: (
        seen.append(type(error).__name__), real(latency, in_flight=in_flight, error=error, held=held, lag=lag))[1]
    refusals = [ConnectionRefusedError("too many clients")] * 2

    def open_after_two_refusals():
        if refusals:
            raise refusals.pop()
        return db.connect()
    pool._open = open_after_two_refusals
    assert pool.try_acquire("a")
    with pool.connection() as conn:
        assert conn.query(7) == 7
    assert (pool.open_retries, db.opened, seen) == (2, 1, ["ConnectionRefusedError", "NoneType"]), seen
    pool.release("a")
    check(pool, db, app)

    refusing = [0]

    def always_refused():
        refusing[0] += 1
        raise ConnectionRefusedError("too many clients")
    pool._open = always_refused
    for idle, _, _ in pool._idle:
        idle.close()
    pool._idle.clear()
    pool._trim()
    assert pool.try_acquire("b")
    with pytest.raises(ConnectionRefusedError):
        with pool.connection():
            pass
    assert refusing[0] == 1 + connections.OPEN_RETRIES     # then the task sees it
    assert seen.count("ConnectionRefusedError") == 2         # one sample per connection asked for
    pool.release("b")

    failing = [0]

    def broken():
        failing[0] += 1
        raise OSError("no route to host")                    # not one of the errors: not retried
    pool._open = broken
    assert pool.try_acquire("c")
    with pytest.raises(OSError, match="no route"):
        with pool.connection():
            pass
    assert failing[0] == 1
    pool.release("c")
    pool.close()
