"""Issue 20, item 5 "Seeing it": the resources section of ``inspect stats``,
the resource metrics of /metrics, the wait warning, the heartbeat's summary
and the dashboard's Resources panel (docs/resources.md, "Seeing it").

The worker here is built, not run: jobs are offered to its admission chain
by hand, so the numbers (permits held, tasks parked, how long they waited on
a fake clock) are exact."""
from __future__ import annotations

import logging
import time
from types import SimpleNamespace as NS

import pytest

from greenq import GreenQ
from greenq.control.commands import COMMANDS, worker_info
from greenq.drivers import get_driver
from greenq.events import Tally, clean
from greenq.resources.observe import HEARTBEAT_RESOURCES, WaitTimes, heartbeat_summary
from greenq.resources.registry import Resources
from greenq.resources.step import Permits
from greenq.worker import admission as admission_module
from greenq.worker.admission import Admission
from greenq.worker.consumer import Worker
from greenq.worker.jobs import Job
from greenq.worker.monitor import Monitor


class Clock:
    """The admission chain's clock (``time.monotonic``), moved by hand."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now

    @staticmethod
    def time():
        return time.time()


@pytest.fixture
def clock(monkeypatch):
    c = Clock()
    monkeypatch.setattr(admission_module, "time", c)
    return c


def make_app(name="obs", **resources):
    app = GreenQ(name, broker=f"memory://{name}-{time.monotonic_ns()}", config_file=False)
    for resource, spec in resources.items():
        for key, value in spec.items():
            app.config.set(f"resource:{resource}", key, value, origin="test")
    return app


def fake_job(n, wanted=None, priority=0):
    j = Job(NS(message_id=f"m{n}", body=b"", queue="default"))
    j.msg = NS(task="t", id=f"id{n}", eta=None, priority=priority)
    j.task = NS(name="t", option=lambda key: (wanted or {"pg": 1}) if key == "resources" else None)
    return j


def take_all(worker):
    """What the worker's free runners do: take every job the permits step grants now."""
    taken = []
    while True:
        job = worker.admission.take(True)
        if job is None:
            return taken
        taken.append(job)


def saturated_worker(clock):
    """A worker (not run) whose pg (limit 2) is held by two jobs, with three
    waiting on pg and one on pg and api; search is adaptive and unused."""
    app = make_app(pg={"limit": 2, "scope": "process"}, api={"limit": 5},
                   search={"limit": 50, "min_limit": 2, "adaptive": True})

    @app.task(resources={"pg": 1})
    def query():
        return None
    worker = Worker(app, get_driver("threads"), queues=["default"], concurrency=4)
    admission = worker.admission
    holders = [fake_job(0), fake_job(1)]
    waiters = [fake_job(2), fake_job(3), fake_job(4), fake_job(5, wanted={"pg": 1, "api": 1})]
    for job in holders + waiters:
        admission.offer(job)
    assert take_all(worker) == holders
    return app, worker, holders, waiters


def agent_of(worker):
    return NS(worker=worker, name="w1", events_enabled=False)


def test_stats_has_a_resources_section_for_a_saturated_resource(clock):
    app, worker, holders, waiters = saturated_worker(clock)
    section = COMMANDS["stats"](agent_of(worker))["resources"]
    assert section["pg"] == {"limit": 2, "configured_limit": 2, "scope": "process", "adaptive": False,
                             "in_use": 2, "waiting": 4, "wait_count": 0, "wait_seconds_sum": 0.0,
                             "wait_seconds_max": 0.0}
    assert section["api"]["waiting"] == 1 and section["api"]["in_use"] == 0       # pg and api: counts for both
    assert section["search"]["adaptive"] is True and section["search"]["limit"] == 50
    assert "search" not in worker.resources.pools            # stats made no pool
    # one holder ends after 2.5 s: the head waiter got its permit after waiting 2.5 s
    step = worker.admission.step(Permits.name)
    clock.now += 2.5
    step.release(holders[0])
    assert take_all(worker) == waiters[:1]
    clock.now += 1.0
    step.release(holders[1])
    assert take_all(worker) == waiters[1:2]
    section = COMMANDS["stats"](agent_of(worker))["resources"]
    assert (section["pg"]["in_use"], section["pg"]["waiting"]) == (2, 2)
    assert (section["pg"]["wait_count"], section["pg"]["wait_seconds_sum"], section["pg"]["wait_seconds_max"]) \
        == (2, 6.0, 3.5)
    app.close()


def test_a_worker_without_resources_has_an_empty_section_and_no_heartbeat_field():
    app = make_app()

    @app.task
    def noop():
        return None
    worker = Worker(app, get_driver("threads"), queues=["default"], concurrency=1)
    assert COMMANDS["stats"](agent_of(worker))["resources"] == {}
    assert "resources" not in worker_info(agent_of(worker))
    assert Monitor(worker, 0, "").metrics().count("greenq_resource_") == 0
    app.close()


def test_metrics_have_the_resource_gauges_and_the_wait_histogram(clock):
    app, worker, holders, waiters = saturated_worker(clock)
    monitor = Monitor(worker, 0, "")
    text = monitor.metrics()
    assert 'greenq_resource_limit{resource="pg"} 2\n' in text
    assert 'greenq_resource_limit{resource="search"} 50\n' in text
    assert 'greenq_resource_in_use{resource="pg"} 2\n' in text
    assert 'greenq_resource_waiting{resource="pg"} 4\n' in text
    assert 'greenq_resource_waiting{resource="api"} 1\n' in text
    assert 'greenq_resource_wait_seconds_count{resource="pg"} 0\n' in text
    step = worker.admission.step(Permits.name)
    clock.now += 2.5
    step.release(holders[0])
    assert take_all(worker) == waiters[:1]
    text = monitor.metrics()
    assert 'greenq_resource_in_use{resource="pg"} 2\n' in text
    assert 'greenq_resource_waiting{resource="pg"} 3\n' in text
    assert "# TYPE greenq_resource_wait_seconds histogram" in text
    assert 'greenq_resource_wait_seconds_bucket{resource="pg",le="1.0"} 0\n' in text
    assert 'greenq_resource_wait_seconds_bucket{resource="pg",le="5.0"} 1\n' in text
    assert 'greenq_resource_wait_seconds_bucket{resource="pg",le="+Inf"} 1\n' in text
    assert 'greenq_resource_wait_seconds_sum{resource="pg"} 2.5\n' in text
    assert 'greenq_resource_wait_seconds_count{resource="pg"} 1\n' in text
    app.close()


def test_the_metrics_parse_as_prometheus_text_and_merge_per_child(clock):
    prometheus = pytest.importorskip("prometheus_client.parser")
    from greenq.worker.supervisor import merge
    app, worker, holders, waiters = saturated_worker(clock)
    text = Monitor(worker, 0, "").metrics()
    families = {f.name: f for f in prometheus.text_string_to_metric_families(text)}
    assert families["greenq_resource_wait_seconds"].type == "histogram"
    waiting = {s.labels["resource"]: s.value for s in families["greenq_resource_waiting"].samples}
    assert waiting == {"api": 1, "pg": 4, "search": 0}
    merged = merge([(0, text), (1, text)])
    samples = [s for f in prometheus.text_string_to_metric_families(merged) if f.name == "greenq_resource_limit"
               for s in f.samples]
    assert {(s.labels["child"], s.labels["resource"]) for s in samples} >= {("0", "pg"), ("1", "pg")}
    app.close()


def test_the_wait_warning_fires_once_per_task(clock, caplog):
    app = make_app(pg={"limit": 1})
    resources = Resources(app.config, app_key="t")
    ran = []
    admission = Admission(get_driver("threads"), run=ran.append, defer=lambda j, eta: None)
    step = admission.add(Permits(resources, wait_warning=5.0))
    holder, slow, quick = fake_job(0), fake_job(1), fake_job(2)
    for job in (holder, slow):
        admission.offer(job)
    caplog.set_level(logging.WARNING, logger="greenq.resources")
    clock.now += 4.0
    admission.watch(force=True)
    assert not caplog.records                                    # under the threshold
    admission.offer(quick)
    clock.now += 2.0                                             # slow: 6 s, quick: 2 s
    admission.watch(force=True)
    admission.watch(force=True)
    clock.now += 10.0
    admission.watch()                                            # WATCH_EVERY has passed: a real look
    warned = [r.getMessage() for r in caplog.records]
    assert len(warned) == 2, warned                              # slow once; quick (12 s) once
    assert "t[id1] has waited 6.0 s for a permit of pg (pg 1/1 in use)" in warned[0]
    assert "resource_wait_warning = 5 s" in warned[0] and "t[id2] has waited 12.0 s" in warned[1]
    step.release(holder)
    admission.serve()                                            # slow is admitted: no second warning
    assert ran == [holder, slow] and len(caplog.records) == 2
    step.release(slow)
    admission.serve()
    assert ran[-1] is quick and len(caplog.records) == 2
    assert (step.waits["pg"].count, step.waits["pg"].max) == (2, 16.0)


def test_a_long_wait_noticed_only_at_admission_is_warned_then(clock, caplog):
    app = make_app(pg={"limit": 1})
    resources = Resources(app.config, app_key="t")
    ran = []
    admission = Admission(get_driver("threads"), run=ran.append, defer=lambda j, eta: None)
    step = admission.add(Permits(resources, wait_warning=5.0))
    holder, waiter = fake_job(0), fake_job(1)
    admission.offer(holder)
    admission.offer(waiter)
    caplog.set_level(logging.WARNING, logger="greenq.resources")
    clock.now += 7.0
    step.release(holder)
    admission.serve()                                            # no watch ran meanwhile
    assert ran == [holder, waiter]
    assert [r.getMessage() for r in caplog.records if "has waited 7.0 s" in r.getMessage()] != []
    assert len(caplog.records) == 1


def test_no_warning_when_off_and_tasks_without_resources_never_park(clock, caplog):
    app = make_app(pg={"limit": 1})
    resources = Resources(app.config, app_key="t")
    ran = []
    admission = Admission(get_driver("threads"), run=ran.append, defer=lambda j, eta: None)
    step = admission.add(Permits(resources))                     # wait_warning 0: off
    caplog.set_level(logging.WARNING, logger="greenq.resources")
    free = fake_job(9)
    free.task = NS(name="f", option=lambda key: None)
    for job in (fake_job(0), fake_job(1), free):
        admission.offer(job)
    clock.now += 1000.0
    admission.watch(force=True)
    assert not caplog.records and ran[-1] is free and step.waits == {}


def test_the_wait_warning_is_read_from_the_worker_section():
    app = make_app(pg={"limit": 1})
    app.config.set("worker", "resource_wait_warning", 12.5, origin="test")

    @app.task(resources={"pg": 1})
    def query():
        return None
    worker = Worker(app, get_driver("threads"), queues=["default"], concurrency=1)
    assert worker.admission.step(Permits.name).wait_warning == 12.5
    app.close()
    default = make_app(pg={"limit": 1})
    default.task(resources={"pg": 1})(lambda: None)
    worker = Worker(default, get_driver("threads"), queues=["default"], concurrency=1)
    assert worker.admission.step(Permits.name).wait_warning == 30.0
    default.close()


def test_wait_times_ignore_nonsense_and_count_above_every_bucket():
    times = WaitTimes()
    for seconds in (0.0005, 2.0, 4000.0, -1.0, float("nan")):
        times.observe(seconds)
    cumulative = dict(times.cumulative())
    assert times.count == 5 and times.max == 4000.0 and times.sum == 4002.0005
    assert cumulative["0.001"] == 3 and cumulative["5.0"] == 4 and cumulative["300.0"] == 4
    assert cumulative["+Inf"] == 5


# -- the heartbeat and the dashboard --------------------------------------------------
def test_the_heartbeat_carries_a_small_resources_summary_that_readers_keep(clock):
    app, worker, holders, waiters = saturated_worker(clock)
    info = worker_info(agent_of(worker))
    assert info["resources"]["pg"] == {"scope": "process", "limit": 2, "configured_limit": 2, "in_use": 2,
                                       "waiting": 4}
    event = {"type": "worker-heartbeat", "worker": "w1", "timestamp": time.time(), **info}
    kept = clean(event, Tally())
    assert kept["resources"] == info["resources"]
    big = {f"r{i}": {"scope": "process", "limit": 1, "configured_limit": 1, "in_use": 0, "waiting": 0,
                     "wait_count": 3} for i in range(HEARTBEAT_RESOURCES + 5)}
    summary = heartbeat_summary(big)
    assert len(summary) == HEARTBEAT_RESOURCES and "wait_count" not in summary["r0"]
    app.close()


@pytest.mark.parametrize("bad", [
    "pg", {"pg": {"scope": "galaxy", "limit": 1, "configured_limit": 1, "in_use": 0, "waiting": 0}},
    {"pg": {"scope": "process", "limit": -1, "configured_limit": 1, "in_use": 0, "waiting": 0}},
    {"pg": {"scope": "process", "limit": 1}},
    {f"r{i}": {"scope": "process", "limit": 1, "configured_limit": 1, "in_use": 0, "waiting": 0}
     for i in range(HEARTBEAT_RESOURCES + 1)},
])
def test_a_malformed_resources_field_is_dropped(bad):
    tally = Tally()
    kept = clean({"type": "worker-heartbeat", "worker": "w1", "timestamp": 1.0, "resources": bad}, tally)
    assert "resources" not in kept and tally.dropped == 1


def heartbeat(worker, when, host="h1", **resources):
    return {"type": "worker-heartbeat", "worker": worker, "hostname": host, "timestamp": when,
            "resources": {name: {"scope": scope, "limit": limit, "configured_limit": configured,
                                 "in_use": in_use, "waiting": waiting}
                          for name, (scope, limit, configured, in_use, waiting) in resources.items()}}


def test_the_dashboard_panel_json_sums_the_fleet_and_keeps_the_limit_over_time():
    from greenq.dashboard.state import BUCKET, FleetState
    now = [10000.0]
    state = FleetState(clock=lambda: now[0])
    state.apply([heartbeat("w1", now[0], pg=("process", 10, 10, 10, 4), api=("cluster", 30, 40, 5, 0),
                           db=("host", 8, 8, 3, 0)),
                 heartbeat("w2", now[0], pg=("process", 10, 10, 7, 0), api=("cluster", 25, 40, 2, 1),
                           db=("host", 8, 8, 2, 0)),
                 heartbeat("w3", now[0], host="h2", db=("host", 8, 8, 1, 0))])
    now[0] += BUCKET
    state.apply([heartbeat("w1", now[0], pg=("process", 6, 10, 6, 9)),
                 heartbeat("w2", now[0], pg=("process", 10, 10, 10, 0), api=("cluster", 25, 40, 2, 1))])
    panel = {r["name"]: r for r in state.resource_list()}
    assert set(panel) == {"api", "db", "pg"}
    pg = panel["pg"]
    assert (pg["scope"], pg["limit"], pg["configured_limit"], pg["in_use"], pg["waiting"], pg["workers"]) \
        == ("process", 16, 10, 16, 9, 2)
    assert [(p["limit"], p["in_use"], p["waiting"]) for p in pg["history"]] == [(20, 17, 4), (16, 16, 9)]
    assert pg["history"][1]["t"] - pg["history"][0]["t"] == BUCKET
    assert panel["api"]["history"][0]["limit"] == 40            # cluster: 30 + 25, at most 40
    assert panel["api"]["limit"] == 25                          # now: only w2 reports it
    assert panel["db"]["history"][0]["limit"] == 16             # host: 8 per machine, two machines
    now[0] += 3600 * 2                                          # everybody silent: no figures, no history
    quiet = {r["name"]: r for r in state.resource_list()}
    assert quiet["pg"]["limit"] is None and quiet["pg"]["history"] == []


def test_the_dashboard_serves_the_panel_json():
    import json

    from greenq.dashboard.server import Dashboard
    from greenq.dashboard.state import FleetState
    state = FleetState()
    state.apply([heartbeat("w1", time.time(), pg=("process", 3, 4, 2, 1))])
    app = make_app()
    dash = Dashboard(app, state)
    status = []
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/api/resources", "QUERY_STRING": "",
               "HTTP_HOST": "127.0.0.1:5555", "wsgi.input": None}
    body = b"".join(dash(environ, lambda s, h: status.append(s)))
    assert status == ["200 OK"]
    [pg] = json.loads(body)
    assert (pg["name"], pg["limit"], pg["configured_limit"], pg["in_use"], pg["waiting"]) == ("pg", 3, 4, 2, 1)
    assert [p["limit"] for p in pg["history"]] == [3]
    app.close()


def test_inspect_stats_prints_one_line_per_resource(clock):
    from greenq.cli.inspect import _human
    app, worker, holders, waiters = saturated_worker(clock)
    text = _human("stats", COMMANDS["stats"](agent_of(worker)))
    assert "    pg: limit 2 (configured 2, process), in use 2, waiting 4; waited: 0 tasks" in text
    assert "    search: limit 50 (configured 50, process, adaptive)" in text
    app.close()
