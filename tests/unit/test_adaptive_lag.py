"""A CPU-bound worker's own delays are not the downstream's queue, when the
caller measures them (``AdaptiveLimit.on_sample(lag=...)``; a gevent worker
does: greenq/resources/lag.py, docs/resources.md "The worker's own delays"): in the
simulation (tests/bench/adaptive_sim.py) a worker that resumes each task
0.15 ms later per task in flight, beside a 5.5 ms downstream that takes 45
at once, keeps the throughput of a fixed limit of 45 when its loop lag is
given to the limit, and loses about 40 % of it when it is not (the limit read
the lag as a queue and sank to 19)."""
from __future__ import annotations

from greenq.resources.adaptive import LAG_FLOOR, AdaptiveLimit
from tests.bench.adaptive_sim import FakeClock, cpu_bound


def test_a_cpu_bound_worker_keeps_the_fixed_limits_throughput_when_its_lag_is_given():
    out = cpu_bound(duration=40.0)
    given, not_given, fixed = out["lag given"], out["lag not given"], out["fixed 45"]
    assert given[1] >= 0.9 * fixed[1], out            # within 10 % of the best fixed limit
    assert not_given[1] < 0.75 * fixed[1], out         # what it cost before (the lag read as a queue)
    assert given[0] >= 45, out                        # the limit stays at the downstream's capacity or above


def test_the_lag_is_taken_off_the_probe_and_the_windows_down_to_floors():
    clock = FakeClock()
    # a limit held at 1: every sample is a window of its own
    limit = AdaptiveLimit(1, 1, clock=clock, probe_samples=1, window_samples=1)
    clock.now = 1.0
    limit.on_sample(0.010, in_flight=1, lag=0.004)    # the probe: 4 ms of it the worker's own
    assert abs(limit.rtt_noload - 0.006) < 1e-9
    clock.now = 2.0
    limit.on_sample(0.010, in_flight=1, lag=0.004)    # the same: the downstream's no-load latency
    assert limit.decisions["faster"] == 0 and abs(limit.last_window[0] - 0.006) < 1e-9
    clock.now = 3.0
    limit.on_sample(0.016, in_flight=1, lag=0.004)    # 6 ms more, none of it the worker's: a queue
    assert abs(limit.last_window[0] - 0.012) < 1e-9
    clock.now = 4.0
    limit.on_sample(0.040, in_flight=1, lag=1.0)      # a lag read far too high: a quarter is kept
    assert abs(limit.last_window[0] - 0.040 * LAG_FLOOR) < 1e-9
    clock.now = 5.0
    limit.on_sample(0.012, in_flight=1, lag=1.0)      # ... and never less than the no-load latency:
    assert abs(limit.last_window[0] - 0.006) < 1e-9   # the lag spares a drain, it never starts a probe
    assert limit.decisions["faster"] == 0 and abs(limit.rtt_noload - 0.006) < 1e-9


def test_the_probe_takes_off_the_least_the_lag_can_have_been_a_window_the_most():
    """A meter that can only bound the lag (the answer came somewhere while the
    hub ran other green threads): the no-load latency is not read too low, and
    a window reads a queue only where its latency proves one."""
    clock = FakeClock()
    limit = AdaptiveLimit(1, 1, clock=clock, probe_samples=1, window_samples=1)
    clock.now = 1.0
    limit.on_sample(0.010, in_flight=1, lag=0.002, lag_high=0.009)
    assert abs(limit.rtt_noload - 0.008) < 1e-9
    clock.now = 2.0
    limit.on_sample(0.016, in_flight=1, lag=0.002, lag_high=0.009)    # 0.007 to 0.014: no queue proven
    assert abs(limit.last_window[0] - 0.008) < 1e-9
    clock.now = 3.0
    limit.on_sample(0.030, in_flight=1, lag=0.002, lag_high=0.009)    # at least 0.021: a queue
    assert abs(limit.last_window[0] - 0.021) < 1e-9
    clock.now = 4.0
    limit.on_sample(0.030, in_flight=1, lag=0.002, lag_high=float("nan"))   # unreadable: the least
    assert abs(limit.last_window[0] - 0.028) < 1e-9


def test_without_a_lag_the_samples_are_read_as_measured():
    clock = FakeClock()
    limit = AdaptiveLimit(1, 1, clock=clock, probe_samples=1, window_samples=1)
    clock.now = 1.0
    limit.on_sample(0.010, in_flight=1)
    clock.now = 2.0
    limit.on_sample(0.016, in_flight=1, lag=0.0)
    assert limit.rtt_noload == 0.010 and limit.last_window[0] == 0.016


def test_the_loop_lag_meter_exists_only_for_an_adaptive_resource_on_gevent():
    """No adaptive resource, or a driver other than gevent: no meter, no switch
    hook, nothing measured (the samples go without a lag, as before)."""
    import greenlet

    from greenq.drivers import get_driver
    from greenq.resources.registry import Resources
    from tests.unit.test_resources import make_app

    before = greenlet.gettrace()
    fixed = Resources(make_app(pg={"limit": 3}, gv={"limit": 3}).config, app_key="t",
                      driver=get_driver("gevent"))
    fixed.pool("pg")
    assert fixed.lag is None and fixed.lag_begin("pg") is None and fixed.lag_end(None) == (0.0, 0.0)
    threads = Resources(make_app(pg={"limit": 3, "adaptive": True}).config, app_key="t",
                        driver=get_driver("threads"))
    threads.pool("pg")
    assert threads.lag is None and "pg" in threads.adaptive and threads.lag_begin("pg") is None
    assert greenlet.gettrace() is before
