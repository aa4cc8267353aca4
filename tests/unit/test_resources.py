"""Resource permits (issue 20, CONTRACT section 11): ``[resource:NAME]``, the
``resources`` task option, the Permits admission step and ``app.resource``.

Workers here run in-process with the threads driver and --burst; each is run
in a thread joined with a deadline, so a permit that is never given back
fails the test instead of hanging it."""
from __future__ import annotations

import threading
import time
from types import SimpleNamespace as NS

import pytest

from greenq import GreenQ
from greenq import config as config_module
from greenq.drivers import get_driver
from greenq.exceptions import ConfigError
from greenq.resources import PermitPool, ResourceSettings, make_pool
from greenq.resources.process import ProcessPool
from greenq.resources.registry import Resources
from greenq.resources.step import Permits
from greenq.worker.admission import Admission
from greenq.worker.consumer import Worker
from greenq.worker.jobs import Job

FETCH_TIMEOUT = 0.1
DEADLINE = 30.0


def make_app(name="res", **resources):
    app = GreenQ(name, broker=f"memory://{name}-{time.monotonic_ns()}", config_file=False)
    for resource, spec in resources.items():
        for key, value in spec.items():
            app.config.set(f"resource:{resource}", key, value, origin="test")
    return app


def run(worker, deadline=DEADLINE):
    """worker.run() in a thread, with a deadline: a leaked permit fails, not hangs."""
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("code", worker.run()), daemon=True)
    thread.start()
    thread.join(deadline)
    if thread.is_alive():
        worker.request_stop(cold=True)
        thread.join(10)
        raise AssertionError("the worker did not finish: a permit was not given back?")
    return out["code"]


class Gauge:
    """Counts holders at once: ``max`` is the most seen."""

    def __init__(self):
        self.lock = threading.Lock()
        self.now = self.max = 0

    def __enter__(self):
        with self.lock:
            self.now += 1
            self.max = max(self.max, self.now)

    def __exit__(self, *exc):
        with self.lock:
            self.now -= 1


# -- the pool and its settings ------------------------------------------------------
def test_the_process_pool_counts_holders_and_obeys_a_lowered_limit():
    pool = make_pool("pg", ResourceSettings("pg", 2), app_key="greenq", config=None)
    assert isinstance(pool, ProcessPool) and isinstance(pool, PermitPool)
    assert pool.try_acquire("a") and pool.try_acquire("b") and not pool.try_acquire("c")
    assert pool.in_use() == 2
    pool.release("nobody")                      # an unknown holder: no-op
    pool.set_limit(1)
    pool.release("a")
    assert not pool.try_acquire("c"), "above the lowered limit"
    pool.release("b")
    assert pool.try_acquire("c") and pool.in_use() == 1
    pool.close()
    assert pool.in_use() == 0


def test_resource_sections_are_read_and_checked(tmp_path):
    ini = tmp_path / "greenq.ini"
    ini.write_text("[resource:pg]\nlimit = 40\nscope = cluster\nadaptive = true\nmin_limit = 4\n"
                   "errors = psycopg.OperationalError, TimeoutError\n\n[resource:api]\nlimit = 3\n")
    cfg = config_module.load(str(ini), env={})
    assert cfg.resource_settings() == {
        "pg": ResourceSettings("pg", 40, "cluster", True, 4, ("psycopg.OperationalError", "TimeoutError")),
        "api": ResourceSettings("api", 3, "process", False, 1, ())}
    bad = {
        "limit = 0\n": "limit = '0': must be >= 1",
        f"limit = {config_module.MAX_RESOURCE_LIMIT + 1}\n": "above the ceiling",
        "limit = 5\nscope = planet\n": "expected one of process, host, cluster",
        "limit = 5\nmin_limit = 6\n": "min_limit = 6 is above limit = 5",
        "scope = host\n": "needs a limit",
        "limit = 5\nerrors = not a name\n": "not a dotted exception name",
        "limit = 5\nlimt = 4\n": "unknown key 'limt'.*limit",
    }
    for body, message in bad.items():
        ini.write_text("[resource:pg]\n" + body)
        with pytest.raises(ConfigError, match=message):
            config_module.load(str(ini), env={})


def test_the_resources_option_of_a_wrong_type_is_refused_at_decoration():
    app = make_app(pg={"limit": 1})
    for value, error in (("pg", TypeError), ({"pg": 0}, ValueError), ({"pg": 1.5}, ValueError),
                         ({"pg": True}, ValueError), ({"": 1}, ValueError), ({3: 1}, TypeError)):
        with pytest.raises(error, match="resources"):
            app.task(resources=value)(lambda: None)
    assert app.task(resources={"pg": 2})(lambda: None).option("resources") == {"pg": 2}


def test_a_task_naming_an_unknown_resource_stops_the_worker_at_start_with_the_nearest_name():
    app = make_app(postgres={"limit": 1}, stripe={"limit": 1})

    @app.task(resources={"postgre": 1})
    def report():
        pass
    with pytest.raises(ConfigError, match=r"task .*report: resource 'postgre'.*\[resource:postgres\]"):
        Worker(app, get_driver("threads"), queues=["default"], concurrency=1, burst=True)
    from greenq.cli.common import check_app
    with pytest.raises(ConfigError, match="did you mean"):
        check_app(app)


# -- the admission step ----------------------------------------------------------------
def fake_job(n, priority=0, wanted=None, body=b""):
    j = Job(NS(message_id=f"m{n}", body=body, queue="default"))
    j.msg = NS(task="t", id=f"id{n}", eta=None, priority=priority)
    j.task = NS(name="t", option=lambda key: (wanted or {"pg": 1}) if key == "resources" else None)
    return j


def test_waiters_are_served_by_priority_then_arrival_and_take_all_or_none():
    app = make_app(pg={"limit": 1}, redis={"limit": 1})
    resources = Resources(app.config, app_key="t")
    ran = []
    admission = Admission(get_driver("threads"), run=ran.append, defer=lambda j, eta: None)
    step = admission.add(Permits(resources))
    first = fake_job(0)
    admission.offer(first)
    assert ran == [first] and resources.pool("pg").in_use() == 1
    jobs = [fake_job(1, 0), fake_job(2, 5), fake_job(3, 0), fake_job(4, 9)]
    for j in jobs:
        admission.offer(j)
    assert ran == [first] and admission.parked == 4
    order = []
    for _ in range(4):
        step.release(ran[-1])           # the running one ends: the head waiter is asked again
        admission.serve()
        order.append(ran[-1].msg.id)
    assert order == ["id4", "id2", "id1", "id3"]
    # all or none: one needing pg and redis while pg is held takes no redis either
    both = fake_job(5, wanted={"pg": 1, "redis": 1})
    admission.offer(both)
    assert ran[-1] is not both and resources.pool("redis").in_use() == 0
    step.release(ran[-1])
    admission.serve()
    assert ran[-1] is both and resources.pool("redis").in_use() == 1 == resources.pool("pg").in_use()


def test_at_most_max_waiting_wait_per_resource_and_the_rest_are_deferred():
    app = make_app(pg={"limit": 1})
    resources = Resources(app.config, app_key="t")
    ran, deferred = [], []
    admission = Admission(get_driver("threads"), run=ran.append, defer=lambda j, eta: deferred.append(eta))
    admission.add(Permits(resources))
    admission.max_waiting = 2
    for n in range(5):
        admission.offer(fake_job(n))
    assert len(ran) == 1 and admission.parked == 2 == admission.exempt
    assert len(deferred) == 2 and all(time.time() < eta <= time.time() + 1.5 for eta in deferred)


def test_an_overflow_is_due_again_about_when_the_waiters_here_are_served():
    """A job deferred over the bound comes back when the waiters it could not
    join have had their turn (the recent wait there, at least OVERFLOW_MIN),
    not a fixed second later: with a fixed second a backlog left the queue for
    that long while the few waiters took a fraction of it, and the permit stood
    idle (limit 1, two processes: held a tenth of the time)."""
    from greenq.worker.admission import OVERFLOW_MIN
    app = make_app(pg={"limit": 1})
    resources = Resources(app.config, app_key="t")
    ran, deferred = [], []
    admission = Admission(get_driver("threads"), run=ran.append, defer=lambda j, eta: deferred.append(eta))
    step = admission.add(Permits(resources))
    admission.max_waiting = 2
    for n in range(5):
        admission.offer(fake_job(n))
    assert len(deferred) == 2 and all(eta <= time.time() + OVERFLOW_MIN for eta in deferred), deferred
    step.release(ran[-1])               # the head waiter is served: its wait is what an overflow waits now
    admission.serve()
    assert len(ran) == 2 and admission.parked == 1
    admission.offer(fake_job(5))        # one more may wait
    admission.offer(fake_job(6))
    assert len(deferred) == 3 and deferred[-1] <= time.time() + OVERFLOW_MIN
    admission._drained["pg"] = 30.0     # waiters served slowly: never later than overflow_backoff
    admission.offer(fake_job(7))
    assert len(deferred) == 4 and time.time() + 0.5 < deferred[-1] <= time.time() + step.overflow_backoff


# -- in a worker ------------------------------------------------------------------------
def test_the_limit_is_never_exceeded():
    app = make_app(pg={"limit": 3})
    gauge = Gauge()

    @app.task(resources={"pg": 1})
    def query(n):
        with gauge:
            time.sleep(0.02)
        return n
    results = [query.delay(n) for n in range(30)]
    worker = Worker(app, get_driver("threads"), queues=["default"], concurrency=10, burst=True,
                    fetch_timeout=FETCH_TIMEOUT)
    assert run(worker) == 0
    assert [r.get(timeout=5) for r in results] == list(range(30))
    assert gauge.max == 3, gauge.max
    assert worker.resources.pool("pg").in_use() == 0


def test_no_head_of_line_blocking_free_tasks_run_while_waiters_wait():
    """-c 2, prefetch 2, one pg permit held by a task that waits for the free
    tasks to be done, and more pg tasks queued before the free ones: the free
    ones are fetched and run (the waiters hold no room), so the holder sees
    them all finish; before, the waiters filled the prefetch and nothing more
    was fetched until the holder gave up."""
    app = make_app(pg={"limit": 1})
    free_done = threading.Event()
    finished = []
    gauge = Gauge()
    lock = threading.Lock()

    @app.task(resources={"pg": 1})
    def holder():
        with gauge:
            return free_done.wait(10)

    @app.task(resources={"pg": 1})
    def waiter(n):
        with gauge:
            return n

    @app.task
    def free(n):
        with lock:
            finished.append(n)
            if len(finished) == 10:
                free_done.set()
    first = holder.delay()
    waiters = [waiter.delay(n) for n in range(6)]
    frees = [free.delay(n) for n in range(10)]
    worker = Worker(app, get_driver("threads"), queues=["default"], concurrency=2, prefetch=2, burst=True,
                    fetch_timeout=FETCH_TIMEOUT)
    assert run(worker) == 0
    assert first.get(timeout=5) is True, "the free tasks did not finish while the permit was held"
    assert [r.get(timeout=5) for r in waiters] == list(range(6))
    assert all(r.successful() for r in frees) and gauge.max == 1


def test_permits_are_released_on_failure_retry_and_time_limits():
    """limit 1: every task after one that ended badly would wait for ever if
    its permit was kept."""
    app = make_app(pg={"limit": 1})
    gauge = Gauge()
    tries = []

    @app.task(resources={"pg": 1})
    def fails():
        with gauge:
            raise ValueError("boom")

    @app.task(resources={"pg": 1}, bind=True, max_retries=1)
    def retries(self):
        with gauge:
            tries.append(1)
            if len(tries) == 1:
                raise self.retry(countdown=0)
            return "second"

    @app.task(resources={"pg": 1}, time_limit=0.3)
    def overruns():
        with gauge:
            for _ in range(200):
                time.sleep(0.02)

    @app.task(resources={"pg": 1}, soft_time_limit=0.2)
    def soft():
        with gauge:
            for _ in range(200):
                time.sleep(0.02)

    @app.task(resources={"pg": 1})
    def last():
        return "ran"
    results = [fails.delay(), retries.delay(), overruns.delay(), soft.delay(), last.delay()]
    worker = Worker(app, get_driver("threads"), queues=["default"], concurrency=4, burst=True,
                    fetch_timeout=FETCH_TIMEOUT)
    assert run(worker) == 0
    assert results[0].failed() and results[2].failed()
    assert results[1].get(timeout=5) == "second" and len(tries) == 2
    assert "TimeLimitExceeded" in repr(results[2].result) or "time limit" in str(results[2].result)
    assert results[3].failed() and "SoftTimeLimitExceeded" in repr(results[3].result)
    assert results[4].get(timeout=5) == "ran"
    permits = worker.admission.step("permits")
    assert permits.held() == 0 and worker.resources.pool("pg").in_use() == 0 and gauge.max == 1


@pytest.mark.parametrize("cold", [False, True])
def test_permits_are_released_when_the_worker_stops(cold):
    app = make_app(pg={"limit": 2})
    started = threading.Semaphore(0)
    box = {}

    @app.task(resources={"pg": 1})
    def long():
        started.release()
        for _ in range(100):
            time.sleep(0.02)
        return "done"
    for _ in range(3):
        long.delay()
    worker = Worker(app, get_driver("threads"), queues=["default"], concurrency=3, fetch_timeout=FETCH_TIMEOUT,
                    shutdown_timeout=10)
    thread = threading.Thread(target=lambda: box.setdefault("code", worker.run()), daemon=True)
    thread.start()
    assert started.acquire(timeout=10) and started.acquire(timeout=10)   # both permit holders run
    permits = worker.admission.step("permits")
    assert permits.held() == 2 and worker.admission.parked == 1
    worker.request_stop(cold=cold)
    thread.join(DEADLINE)
    assert not thread.is_alive() and box["code"] == 0
    assert permits.held() == 0 and worker.resources.pool("pg").in_use() == 0
    assert worker.stats.succeeded == (0 if cold else 2)


def test_app_resource_in_a_task_shares_the_worker_pool():
    app = make_app(api={"limit": 2}, pg={"limit": 5})
    gauge, task_gauge = Gauge(), Gauge()

    @app.task
    def call(n):
        with app.resource("api"):
            with gauge:
                time.sleep(0.02)
        return n

    @app.task(resources={"api": 1})
    def whole(n):
        with task_gauge, gauge:
            time.sleep(0.02)
        return n
    results = [call.delay(n) for n in range(10)] + [whole.delay(n) for n in range(5)]
    worker = Worker(app, get_driver("threads"), queues=["default"], concurrency=4, burst=True,
                    fetch_timeout=FETCH_TIMEOUT)
    assert run(worker) == 0
    assert [r.get(timeout=5) for r in results] == list(range(10)) + list(range(5))
    assert gauge.max == 2, gauge.max
    assert worker.resources.pool("api").in_use() == 0


def test_admission_permits_and_app_resource_on_one_resource_with_fewer_runners_than_tasks():
    """-c 2, api limit 1: two `call` tasks (app.resource inside) are queued
    before a `whole` task (resources={"api": 1}), and wait to take their
    permit until every task was received.  Before, `whole` took the permit at
    admission and sat in the run queue behind them while both runners waited
    in app.resource for it: the worker never finished.  Now the permit is
    taken only for a free runner, which runs `whole` at once."""
    app = make_app(api={"limit": 1})
    gauge = Gauge()
    received = []
    all_received = threading.Event()

    @app.task
    def call(n):
        assert all_received.wait(10)
        with app.resource("api"):
            with gauge:
                time.sleep(0.01)
        return n

    @app.task(resources={"api": 1})
    def whole(n):
        with gauge:
            time.sleep(0.01)
        return n
    results = [call.delay(0), call.delay(1), whole.delay(0), call.delay(2), whole.delay(1), call.delay(3)]
    worker = Worker(app, get_driver("threads"), queues=["default"], concurrency=2, prefetch=8, burst=True,
                    fetch_timeout=FETCH_TIMEOUT)

    def on_received(job):
        received.append(job)
        if len(received) == len(results):
            all_received.set()
    worker.hooks.on("task_received", on_received)
    assert run(worker, deadline=20) == 0
    assert [r.get(timeout=5) for r in results] == [0, 1, 0, 2, 1, 3]
    assert gauge.max == 1 and worker.resources.pool("api").in_use() == 0


def test_in_a_worker_a_permit_is_taken_only_for_a_free_runner():
    """The worker's chain (not run): an offered task with free permits is
    parked, holding nothing, and a TAKE is queued for the runners; a free
    runner's take() gets it with its permits."""
    from greenq.worker.admission import TAKE
    app = make_app(pg={"limit": 2})

    @app.task(resources={"pg": 1})
    def query():
        return None
    worker = Worker(app, get_driver("threads"), queues=["default"], concurrency=2)
    first, second = fake_job(1), fake_job(2)
    worker.admission.offer(first)
    worker.admission.offer(second)
    pool = worker.resources.pool("pg")
    assert pool.in_use() == 0 and worker.admission.parked == 2
    assert worker.runq.get(block=False) is TAKE and worker.runq.empty()    # one TAKE for both
    assert worker.admission.exempt == 0, "not refused yet: they count against prefetch like queued jobs"
    assert worker.admission.take(True) is first and pool.in_use() == 1
    assert worker.runq.get(block=False) is TAKE                             # the next free runner's turn
    assert worker.admission.take(True) is second and pool.in_use() == 2
    assert worker.admission.take(False) is None and worker.admission.parked == 0
    third = fake_job(3, body=b"x" * 10)
    worker.admission.offer(third)
    assert worker.admission.exempt == 0 and worker.admission.take(True) is None    # asked: pg is full
    assert worker.admission.exempt == 1 and worker.admission.exempt_bytes == 10   # refused: waits, exempt
    worker.admission.step("permits").release(first)
    assert worker.admission.take(False) is third and worker.admission.exempt == 0
    # a step added later goes before the permits: what they grant goes to a runner at once
    from greenq.worker.admission import RateLimit
    worker.admission.add(RateLimit())
    assert [step.name for step in worker.admission.steps] == ["rate_limit", "permits"]
    app.close()


def test_priority_holds_per_resource_across_different_sets():
    """A task needing pg and redis waits for redis: a lower priority task
    needing only pg does not take pg before it (nor one needing only redis);
    and when pg frees, the highest priority of all the tasks needing pg gets
    it, whatever else they need."""
    app = make_app(pg={"limit": 1}, redis={"limit": 1})
    resources = Resources(app.config, app_key="t")
    ran = []
    admission = Admission(get_driver("threads"), run=ran.append, defer=lambda j, eta: None)
    step = admission.add(Permits(resources))
    busy = fake_job(0, wanted={"redis": 1})
    admission.offer(busy)
    high = fake_job(1, priority=9, wanted={"pg": 1, "redis": 1})
    low_pg = fake_job(2, priority=0, wanted={"pg": 1})
    low_redis = fake_job(3, priority=0, wanted={"redis": 1})
    for j in (high, low_pg, low_redis):
        admission.offer(j)
    assert ran == [busy], "a lower priority overtook a waiter on a resource it waits for"
    assert resources.pool("pg").in_use() == 0 and admission.parked == 3
    assert admission.waiting_at("permits") == {"pg": 2, "redis": 2}
    step.release(busy)
    admission.serve()
    assert ran == [busy, high]
    step.release(high)
    admission.serve()
    assert ran == [busy, high, low_pg, low_redis]
    # pg held; waiting: an early low-priority pg task, then a high-priority pg+redis one
    step.release(low_pg), step.release(low_redis)
    holder, early = fake_job(4, wanted={"pg": 1}), fake_job(5, priority=1, wanted={"pg": 1})
    late = fake_job(6, priority=7, wanted={"pg": 1, "redis": 1})
    for j in (holder, early, late):
        admission.offer(j)
    assert ran[-1] is holder and admission.parked == 2
    step.release(holder)
    admission.serve()
    assert ran[-1] is late and admission.parked == 1
    step.release(late)
    admission.serve()
    assert ran[-1] is early and admission.parked == 0


def test_priority_across_sets_in_a_worker_chain():
    """The same order where runners take the grants (a worker's chain)."""
    app = make_app(pg={"limit": 1}, redis={"limit": 1})

    @app.task(resources={"pg": 1})
    def query():
        return None
    worker = Worker(app, get_driver("threads"), queues=["default"], concurrency=4)
    admission, step = worker.admission, worker.admission.step("permits")
    busy = fake_job(0, wanted={"redis": 1})
    admission.offer(busy)
    assert admission.take(True) is busy
    high = fake_job(1, priority=9, wanted={"pg": 1, "redis": 1})
    low = fake_job(2, priority=0, wanted={"pg": 1})
    admission.offer(high)
    admission.offer(low)
    assert admission.take(True) is None and worker.resources.pool("pg").in_use() == 0
    step.release(busy)
    assert admission.take(False) is high and admission.take(False) is None
    step.release(high)
    assert admission.take(False) is low
    app.close()


def test_waiting_bytes_are_bounded_per_resource():
    app = make_app(pg={"limit": 1}, redis={"limit": 1})
    resources = Resources(app.config, app_key="t")
    ran, deferred = [], []
    admission = Admission(get_driver("threads"), run=ran.append, defer=lambda j, eta: deferred.append(j))
    admission.add(Permits(resources))
    admission.max_waiting_bytes = 250
    admission.offer(fake_job(0, body=b"x" * 100))
    waiters = [fake_job(n, body=b"x" * 100) for n in (1, 2, 3)]
    for j in waiters:
        admission.offer(j)
    assert len(ran) == 1 and admission.parked == 2 and deferred == waiters[2:]
    assert admission.exempt == 2 and admission.exempt_bytes == 200
    held = fake_job(4, wanted={"redis": 1})
    admission.offer(held)
    big = fake_job(5, wanted={"redis": 1}, body=b"x" * 1000)
    admission.offer(big)                            # one may always wait, however big
    assert admission.parked == 3 and admission.exempt_bytes == 1200 and deferred == waiters[2:]


def test_waiting_messages_take_no_prefetch_bytes():
    """prefetch_bytes 400 kB, -c 2, prefetch 8: a pg task (limit 1) holds the
    permit until the free tasks are done, and six pg tasks of 90 kB each are
    queued before them.  The waiters' bytes no longer fill prefetch_bytes (their
    number was already not counted against the prefetch), so the free tasks are
    fetched and run while they wait; at most 400 kB of them wait (the rest go
    back to the broker, and run later).  Before, four waiters filled the bytes
    and nothing more was fetched until the holder gave up."""
    app = make_app(pg={"limit": 1})
    app.config.set("greenq", "max_message_size", "100000", origin="test")
    app.config.set("worker", "prefetch_bytes", "400000", origin="test")
    free_done = threading.Event()
    finished = []
    lock = threading.Lock()
    most = {"bytes": 0}

    @app.task(resources={"pg": 1})
    def holder():
        return free_done.wait(10)

    @app.task(resources={"pg": 1})
    def waiter(n, pad):
        return n

    @app.task
    def free(n):
        with lock:
            most["bytes"] = max(most["bytes"], worker.held_bytes)
            finished.append(n)
            if len(finished) == 10:
                free_done.set()
    first = holder.delay()
    waiters = [waiter.delay(n, "p" * 90_000) for n in range(6)]
    frees = [free.delay(n) for n in range(10)]
    worker = Worker(app, get_driver("threads"), queues=["default"], concurrency=2, prefetch=8, burst=True,
                    fetch_timeout=FETCH_TIMEOUT)
    assert worker.prefetch_bytes == 400_000
    assert run(worker) == 0
    assert first.get(timeout=5) is True, "the free tasks did not finish while the permit was held"
    assert [r.get(timeout=5) for r in waiters] == list(range(6))
    assert all(r.successful() for r in frees)
    # held while free tasks ran: the waiting (at least two of 90 kB, at most 400 kB of them) and the rest
    assert 180_000 < most["bytes"] <= 2 * 400_000, most


def test_app_resource_outside_a_worker_uses_the_configured_pool():
    app = make_app(api={"limit": 1})
    with app.resource("api"):
        assert app.permits().pool("api").in_use() == 1
        with pytest.raises(TimeoutError):
            with app.resource("api", timeout=0.05):
                pass
    assert app.permits().pool("api").in_use() == 0
    with pytest.raises(ConfigError, match="did you mean"):
        with app.resource("apii"):
            pass


def test_every_resource_setting_is_documented():
    from pathlib import Path
    root = Path(__file__).resolve().parents[2]
    example = (root / "conf" / "greenq.ini").read_text()
    reference = (root / "docs" / "configuration.md").read_text()
    assert "[resource:pg]" in example and "### [resource:NAME]" in reference
    for key in config_module.RESOURCE_SETTINGS:
        assert f"\n;{key} =" in example, f"conf/greenq.ini lacks [resource:NAME] {key}"
        assert f"`{key}`" in reference, f"docs/configuration.md lacks [resource:NAME] {key}"
    assert (root / "docs" / "resources.md").exists()


def test_raising_a_limit_wakes_the_waiters():
    app = make_app(pg={"limit": 1})
    resources = Resources(app.config, app_key="t")
    ran = []
    admission = Admission(get_driver("threads"), run=ran.append, defer=lambda j, eta: None)
    admission.add(Permits(resources))
    for n in range(3):
        admission.offer(fake_job(n))
    assert len(ran) == 1 and admission.parked == 2
    resources.set_limit("pg", 3)
    admission.serve()
    assert len(ran) == 3 and admission.parked == 0 and resources.pool("pg").in_use() == 3


def test_an_adaptive_resource_cuts_its_limit_on_a_listed_error_and_its_waiters_follow():
    """``adaptive = true``: the pool's limit in force starts inside [min_limit,
    limit] and a listed exception raised while holding a permit cuts it (the
    algorithm itself: tests/unit/test_adaptive_limit.py); other exceptions do not."""
    app = make_app(api={"limit": "40", "adaptive": "true", "min_limit": "2", "errors": "TimeoutError"})
    pool = app.permits().pool("api")
    adaptive = app.permits().adaptive["api"]
    assert adaptive.probing and 2 <= pool.limit <= 40        # it first measures the no-load latency
    while adaptive.probing:
        with app.resource("api"):
            pass
    start = pool.limit
    assert 2 <= start <= 40
    with pytest.raises(KeyError):
        with app.resource("api"):
            raise KeyError("not an overload")
    assert pool.limit == start
    with pytest.raises(TimeoutError):
        with app.resource("api"):
            raise TimeoutError("the API is overloaded")
    assert 2 <= pool.limit < start
    assert app.permits().adaptive["api"].limit == pool.limit
    assert pool.in_use() == 0


def test_a_fixed_resource_has_no_adaptive_limit():
    app = make_app(api={"limit": "5"})
    pool = app.permits().pool("api")
    with pytest.raises(TimeoutError):
        with app.resource("api"):
            raise TimeoutError("overloaded")
    assert pool.limit == 5 and "api" not in app.permits().adaptive
