"""The host and cluster permit pools (greenq/resources/host.py, cluster.py),
run as one suite over the scopes: ``host`` (lock files of this machine) and
``cluster`` on every broker (memory, sqlite, redis, amqp; the namespaces of
tests/integration/conftest.py's ``Env``, as ``broker_env`` gives them).

Several processes are several pool objects (a flock and a lease both tell
two pools of one process apart like two processes), and, where it matters,
a real process (permit_holder.py) killed with SIGKILL."""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from typing import Any, List

import pytest

from greenq.resources import fair
from greenq.resources.base import PermitPool, pool_class
from tests.conftest import make_config, own_prefix
from tests.integration.conftest import Env, _require_module

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
LEASE = 2.0            # [greenq] lease_seconds of these tests (at least 1)


class Apps:
    """Pools of one scope for two apps (0 and 1) that must never share a
    permit; every pool of one app shares its namespace.  Closed after the test."""

    def __init__(self, kind: str, request: Any, tmp_path: Any) -> None:
        self.kind = kind
        self.scope = "host" if kind == "host" else "cluster"
        self.resource = f"r-{uuid.uuid4().hex[:8]}"
        self.env = None if kind == "host" else Env(kind, request, tmp_path)
        self.pools: List[PermitPool] = []
        if self.env is None:
            tag = f"gqtest-{uuid.uuid4().hex[:8]}"
            self.url = "memory://unused"
            self.prefixes = ["greenq", "greenq"]
            self.app_keys = [tag, tag + "-b"]             # one prefix, two apps (two brokers, say)
        else:
            self.url = self.env.broker_url
            if kind == "amqp":
                self.prefixes = [own_prefix(), own_prefix()]
            elif kind == "redis":
                mine = self.env.config().key_prefix
                self.prefixes = [mine, mine + "-b"]       # both swept by the redis_prefix fixture
            else:
                self.prefixes = ["greenq", "gqother"]
            self.app_keys = list(self.prefixes)

    def config(self, app: int = 0) -> Any:
        return make_config(broker_url=self.url, key_prefix=self.prefixes[app], lease_seconds=LEASE)

    def pool(self, limit: int, app: int = 0) -> PermitPool:
        made: PermitPool = pool_class(self.scope)(self.resource, limit, app_key=self.app_keys[app],
                                                  config=self.config(app),
                                                  driver=self.env.driver if self.env else None)
        self.pools.append(made)
        return made

    def holder_process(self, limit: int, count: int) -> subprocess.Popen:
        """A real process holding ``count`` permits of app 0, renewing them until killed."""
        env = dict(os.environ, PYTHONPATH=ROOT, HYPOTHESIS_NO_PLUGINS="1")
        proc = subprocess.Popen([sys.executable, os.path.join(HERE, "permit_holder.py"), self.scope, self.url,
                                 self.prefixes[0], self.app_keys[0], self.resource, str(limit), str(count),
                                 str(LEASE)],
                                env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.strip() == "HOLDING", f"{line!r} {proc.stderr.read() if proc.poll() is not None else ''}"
        return proc

    def teardown(self) -> None:
        for made in self.pools:
            made.close()
        if self.env is not None:
            self.env.teardown()
        # host: the lock files are in the test's own $GREENQ_PERMITS_DIR (tests/conftest.py), removed after it


@pytest.fixture(params=["host", "memory", "sqlite",
                        pytest.param("redis", marks=pytest.mark.redis),
                        pytest.param("amqp", marks=pytest.mark.amqp)])
def apps(request, tmp_path, monkeypatch):
    if request.param != "host":
        _require_module(request.param, "broker")
    # several pools of this process stand for processes here, and these tests
    # check the limit: no waiter's marker counts, so no fair share bounds a
    # pool (fairness between processes: tests/integration/test_fair_permits.py)
    monkeypatch.setattr(fair, "MARK_TTL", -1.0)
    made = Apps(request.param, request, tmp_path)
    yield made
    made.teardown()


def test_a_released_permit_comes_back(apps):
    a, b = apps.pool(2), apps.pool(2)
    assert a.try_acquire("h1") and a.try_acquire("h2")
    assert a.try_acquire("h1")                              # a holder asking again keeps its permit
    assert a.in_use() == 2
    assert b.try_acquire("h3") is False                     # full: another "process" holds both
    a.release("h1")
    assert a.in_use() == 1
    assert b.try_acquire("h3") is True                      # free at once
    assert b.in_use() == 1
    assert a.try_acquire("h4") is False
    a.release("h1")                                         # again: nothing
    a.release("nobody")
    assert b.try_acquire("h4") is False
    b.renew()
    a.renew()
    assert (a.in_use(), b.in_use()) == (1, 1)               # renewing keeps them


def test_several_pools_never_exceed_the_limit(apps):
    """Pools in threads (each its own, as processes would be) take, hold a
    moment and give back, many times: at no moment do more than ``limit`` hold."""
    limit, workers, rounds = 3, 6, 10
    pools = [apps.pool(limit) for _ in range(workers)]
    holding, most, errors = [0], [0], []
    lock, start = threading.Lock(), threading.Barrier(workers)

    def work(n: int) -> None:
        try:
            start.wait()
            for r in range(rounds):
                holder = f"w{n}-{r}"
                while not pools[n].try_acquire(holder):
                    time.sleep(0.001)
                with lock:
                    holding[0] += 1
                    most[0] = max(most[0], holding[0])
                time.sleep(0.002)
                with lock:
                    holding[0] -= 1
                pools[n].release(holder)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)
    threads = [threading.Thread(target=work, args=(n,)) for n in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    assert 1 <= most[0] <= limit
    assert sum(p.in_use() for p in pools) == 0


def test_lowering_the_limit_hands_out_nothing_until_enough_are_back(apps):
    pool, other = apps.pool(3), apps.pool(3)
    for holder in ("a", "b", "c"):
        assert pool.try_acquire(holder)
    pool.set_limit(2)
    other.set_limit(2)
    assert pool.limit == 2
    assert pool.in_use() == 3                               # nobody's permit is taken back
    assert pool.try_acquire("d") is False
    pool.release("c")
    assert pool.try_acquire("d") is False                   # two still held: the new limit
    assert other.try_acquire("d") is False
    pool.release("a")
    assert other.try_acquire("d") is True
    assert pool.try_acquire("e") is False
    pool.set_limit(3)                                       # raising works at once
    assert pool.try_acquire("e") is True


def test_a_share_bounds_one_process_and_the_sum_stays_within_the_shared_limit(apps):
    """An adaptive limit moves each process's share (``set_share``), not the
    places they share: two processes with shares of 2 hold 4 of a limit of 5
    together (a lowered shared limit would cap them at 2 together), and
    shares that add up to more than the limit still never exceed it."""
    pool, other = apps.pool(5), apps.pool(5)
    pool.set_share(2)
    other.set_share(2)
    assert (pool.limit, pool.shared_limit) == (2, 5)
    assert pool.try_acquire("a") and pool.try_acquire("b") and not pool.try_acquire("c")
    assert other.try_acquire("a") and other.try_acquire("b") and not other.try_acquire("c")
    other.set_share(4)
    assert other.try_acquire("c")                           # the 5th place
    assert not other.try_acquire("d"), "over the shared limit"
    pool.release("a")
    assert other.try_acquire("d") and pool.in_use() + other.in_use() == 5
    pool.set_share(9)
    assert pool.limit == 5, "a share never exceeds the shared limit"


def test_two_apps_never_share_permits(apps):
    """Property: whatever the two apps (different app_key / key_prefix) take
    and give back, through two pools each, each app's answers are those of
    its own counter of ``limit`` permits, as if the other did not exist."""
    from hypothesis import HealthCheck, given, settings, strategies as st
    limit = 2
    pools = [[apps.pool(limit, app), apps.pool(limit, app)] for app in (0, 1)]
    op = st.tuples(st.integers(0, 1), st.integers(0, 1), st.booleans(), st.integers(0, 2))

    @settings(max_examples=25 if apps.kind in ("redis", "amqp") else 60, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(op, max_size=14))
    def run(ops: List[Any]) -> None:
        held: List[set] = [set(), set()]
        try:
            for app, p, take, h in ops:
                holder = f"p{p}-h{h}"                       # a holder belongs to one pool
                if take:
                    expected = holder in held[app] or len(held[app]) < limit
                    assert pools[app][p].try_acquire(holder) is expected, (app, holder, held)
                    if expected:
                        held[app].add(holder)
                else:
                    pools[app][p].release(holder)
                    held[app].discard(holder)
        finally:
            for app in (0, 1):
                for holder in held[app]:
                    pools[app][int(holder[1])].release(holder)
    run()


def test_a_killed_holders_permits_come_back(apps):
    """SIGKILL a real process holding two of three permits: while it lives
    (renewing past the lease) the pool stays full; host permits are free the
    moment it is dead, cluster permits within the lease (RabbitMQ: plus the
    missed heartbeats), and the limit still holds."""
    if apps.kind == "memory":
        pytest.skip("memory:// lives in one process")
    me = apps.pool(3)
    proc = apps.holder_process(3, 2)
    try:
        assert me.try_acquire("mine")
        assert me.try_acquire("waiting") is False
        if apps.scope == "cluster":
            until = time.monotonic() + LEASE * 1.5              # it renews: still full after the lease
            while time.monotonic() < until:
                me.renew()
                assert me.try_acquire("waiting") is False
                time.sleep(LEASE / 4)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
        killed = time.monotonic()
        if apps.scope == "host":
            assert me.try_acquire("waiting") and me.try_acquire("third")      # at once
        else:
            for holder in ("waiting", "third"):
                while not me.try_acquire(holder):
                    me.renew()
                    assert time.monotonic() - killed < LEASE * 3 + 1, "the killed holder's permits never came back"
                    time.sleep(0.05)
        assert me.in_use() == 3
        assert me.try_acquire("fourth") is False                # the limit still holds
        assert apps.pool(3).try_acquire("fifth") is False
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# -- a partitioned cluster worker ------------------------------------------------------

@pytest.fixture
def cluster_pool():
    config = make_config(broker_url=f"memory://{uuid.uuid4().hex[:8]}", lease_seconds=1)
    made: List[PermitPool] = []

    def make(limit: int) -> Any:
        made.append(pool_class("cluster")("db", limit, app_key="greenq", config=config))
        return made[-1]
    yield make
    for p in made:
        p.close()


def test_a_failed_renewal_loses_the_permits_and_nothing_new_is_handed_out(cluster_pool, caplog, monkeypatch):
    pool, other = cluster_pool(3), cluster_pool(3)
    assert pool.try_acquire("a") and pool.try_acquire("b")

    def unreachable(*args: Any) -> bool:
        raise ConnectionError("partitioned")
    with monkeypatch.context() as m:
        m.setattr(pool.coordination, "renew", unreachable)
        m.setattr(pool.coordination, "acquire", unreachable)
        with caplog.at_level(logging.WARNING, logger="greenq.resources"):
            pool.renew()
        assert pool.in_use() == 0                          # it cannot prove them: not counted
        assert "no longer counts as held" in caplog.text
        assert pool.try_acquire("c") is False              # and it hands out nothing it cannot prove
    assert other.try_acquire("x") is True
    assert other.try_acquire("y") is False                 # the broker still counts a and b
    pool.release("a")                                      # a lost permit's release still reaches the broker
    assert other.try_acquire("y") is True


def test_a_permit_not_renewed_for_a_lease_stops_counting(cluster_pool):
    pool = cluster_pool(2)
    assert pool.try_acquire("a")
    pool.renew()
    assert pool.in_use() == 1
    time.sleep(1.05)                                       # lease_seconds = 1, and no renewal
    assert pool.in_use() == 0


def test_a_renewal_the_broker_refuses_drops_only_that_permit(cluster_pool):
    pool = cluster_pool(2)
    assert pool.try_acquire("a") and pool.try_acquire("b")
    pool.coordination.release(pool.lease, pool._place_holder("a"))   # the broker gave "a"'s place away
    pool.renew()
    assert pool.in_use() == 1
    assert pool.try_acquire("b") and pool.try_acquire("c")


# -- host: a forked child ------------------------------------------------------------

def test_a_forked_child_neither_keeps_nor_frees_its_parents_host_permits(tmp_path):
    """A flock is shared by the copies of a descriptor, so a child forked
    while its parent holds a permit would keep the permit alive after the
    parent died, and could free it under the parent (``close``): the child
    forgets the parent's permits at fork."""
    app_key = f"gqtest-{uuid.uuid4().hex[:8]}"
    config = make_config()
    pool = pool_class("host")("db", 1, app_key=app_key, config=config)
    other = pool_class("host")("db", 1, app_key=app_key, config=config)
    try:
        assert pool.try_acquire("parent")
        pid = os.fork()
        if pid == 0:                                        # the child: close its pools and leave
            code = 0 if pool.in_use() == 0 else 3
            pool.close()
            other.close()
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0       # the child held nothing
        assert other.try_acquire("x") is False              # and its close freed nothing of the parent's
        pool.release("parent")
        assert other.try_acquire("x") is True
    finally:
        pool.close()
        other.close()


def test_host_permits_are_the_apps_of_one_prefix_on_one_broker(tmp_path):
    """Two apps of the default key_prefix on two brokers do not share host
    permits; one broker named with other credentials or options is the same
    app (its workers must share)."""
    from greenq.resources.host import broker_identity
    prefix = f"gqtest-{uuid.uuid4().hex[:8]}"
    urls = ["redis://:secret@127.0.0.1:6379/3", "redis://other@127.0.0.1:6379/3?socket_timeout=5",
            "redis://127.0.0.1:6379/4", f"sqlite:///{tmp_path}/a.sqlite3"]
    assert broker_identity(urls[0]) == broker_identity(urls[1]) == "redis://127.0.0.1:6379/3"
    assert broker_identity("sqlite:///greenq.sqlite3") == f"sqlite:{os.path.abspath('greenq.sqlite3')}"
    pools = [pool_class("host")("db", 1, app_key=prefix, config=make_config(broker_url=url)) for url in urls]
    try:
        assert pools[0].try_acquire("a")
        assert pools[1].try_acquire("b") is False           # the same broker: the same app
        assert pools[2].try_acquire("c") is True            # another database: another app
        assert pools[3].try_acquire("d") is True
    finally:
        for made in pools:
            made.close()


# -- under gevent and eventlet ---------------------------------------------------------

PATCHED_PYTEST = """
import sys
if sys.argv[1] == "gevent":
    from gevent import monkey
    monkey.patch_all()
else:
    import eventlet
    eventlet.monkey_patch()
import pytest
sys.exit(pytest.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("driver", ["gevent", "eventlet"])
def test_the_pools_patched(driver):
    """This file's suite (but this test) in a subprocess patched for ``driver``,
    with ``GREENQ_TEST_DRIVER`` handing the driver to every cluster pool's
    coordination (as test_green_drivers.py does for the other suites)."""
    pytest.importorskip(driver)
    env = dict(os.environ, GREENQ_TEST_DRIVER=driver, PYTHONPATH=ROOT, HYPOTHESIS_NO_PLUGINS="1")
    proc = subprocess.run([sys.executable, "-c", PATCHED_PYTEST, driver, "-q", "-x", "-p", "no:cacheprovider",
                           os.path.abspath(__file__), "-k", "not patched and not sweeping_beside"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"


# -- host: sweeping the lock files of apps that are gone -----------------------------

def _age(path: str, seconds: float) -> None:
    """Make ``path`` look ``seconds`` old (its mtime)."""
    then = time.time() - seconds
    os.utime(path, (then, then))


def test_a_sweep_removes_old_lock_files_nobody_holds_and_nothing_else():
    from greenq.resources import host
    stale = host.STALE_SECONDS * 2
    config = make_config()
    live = pool_class("host")("db", 3, app_key="gqtest-live", config=config)
    gone = pool_class("host")("db", 2, app_key="gqtest-gone", config=config)
    idle = pool_class("host")("db", 1, app_key="gqtest-idle", config=config)
    try:
        assert live.try_acquire("h0") and live.try_acquire("h1") and live.try_acquire("h2")
        live.release("h1")
        live.release("h2")                                 # files 0 (held), 1 and 2 (free)
        assert gone.try_acquire("g") and idle.try_acquire("i")
        gone.close()                                       # an app that stopped
        idle.release("i")                                  # an app still running, idle
        stray = os.path.join(host.permit_root(), "not-ours")
        os.mkdir(stray)
        with open(os.path.join(stray, "notes"), "w"):
            pass
        for directory in (live.directory, gone.directory, idle.directory):
            for name in os.listdir(directory):
                _age(os.path.join(directory, name), stale)
            _age(directory, stale)
            _age(os.path.dirname(directory), stale)
        _age(os.path.join(stray, "notes"), stale)
        _age(stray, stale)
        os.utime(os.path.join(live.directory, "2"))        # file 2 is young

        assert host.sweep() == 3                           # live's 1, gone's 0, idle's 0
        assert sorted(os.listdir(live.directory)) == ["0", "2"]
        assert not os.path.exists(os.path.dirname(gone.directory))     # the app's directory too
        assert not os.path.exists(os.path.dirname(idle.directory))
        assert os.listdir(stray) == ["notes"]              # not a lock file: left alone

        # the limit still holds over the files made again
        other = pool_class("host")("db", 3, app_key="gqtest-live", config=config)
        assert other.try_acquire("x") and other.try_acquire("y")
        assert other.try_acquire("z") is False
        other.close()
        # an open pool whose directory was swept makes it again
        assert idle.try_acquire("i") and os.path.isdir(idle.directory)
        assert pool_class("host")("db", 1, app_key="gqtest-idle", config=config).try_acquire("j") is False
        assert host.sweep(older_than=0) == 2               # any age: live's free 1 and 2, no held one
        assert sorted(os.listdir(live.directory)) == ["0"] and os.listdir(idle.directory) == ["0"]
    finally:
        live.close()
        idle.close()


def test_sweeping_beside_processes_taking_the_permit_never_hands_it_out_twice(tmp_path):
    """Three processes take and give back the one permit of a resource as
    fast as they can while a fourth sweeps its lock file away whenever it is
    free: a taker that opened the file just before it was unlinked must not
    keep a lock on it (it would share the permit with whoever makes the file
    again).  Every holder checks, while it holds the permit, that nobody else does."""
    inside = str(tmp_path / "inside")
    run = [sys.executable, os.path.join(HERE, "permit_sweep_race.py")]
    env = dict(os.environ, PYTHONPATH=ROOT, HYPOTHESIS_NO_PLUGINS="1")
    procs = [subprocess.Popen([*run, role, "gqtest-race", "50", inside], env=env, cwd=str(tmp_path),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for role in ("holder", "holder", "holder", "sweeper")]
    outs = [proc.communicate(timeout=90) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0, 0, 0], outs
    assert int(outs[3][0].strip()) == 50, outs              # the file was swept away 50 times
    assert all(int(out.strip()) > 0 for out, _ in outs[:3]), outs   # beside every holder taking it


def test_the_permit_root_is_greenq_permits_dir_when_set(tmp_path, monkeypatch):
    from greenq.exceptions import ConfigError
    from greenq.resources import host
    monkeypatch.setenv(host.ROOT_ENV, str(tmp_path / "mine"))
    pool = pool_class("host")("db", 1, app_key="gqtest-root", config=make_config())
    try:
        assert pool.try_acquire("a")
        assert pool.directory.startswith(str(tmp_path / "mine") + os.sep)
        assert os.stat(tmp_path / "mine").st_mode & 0o777 == 0o700
        assert os.stat(os.path.dirname(pool.directory)).st_mode & 0o777 == 0o700
    finally:
        pool.close()
    monkeypatch.setenv(host.ROOT_ENV, str(tmp_path / "missing" / "mine"))
    with pytest.raises(ConfigError, match="GREENQ_PERMITS_DIR"):
        pool_class("host")("db", 1, app_key="gqtest-root", config=make_config())
    os.chmod(tmp_path / "mine", 0o755)
    monkeypatch.setenv(host.ROOT_ENV, str(tmp_path / "mine"))
    with pytest.raises(ConfigError, match="mode 0700"):
        pool_class("host")("db", 1, app_key="gqtest-root", config=make_config())
