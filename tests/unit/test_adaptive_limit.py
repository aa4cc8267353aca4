"""Adaptive limits (issue 20, item 3): greenq/resources/adaptive.py on a fake
clock, driven by the discrete-event downstream of tests/bench/adaptive_sim.py
(latency = base while in_flight <= capacity, base * in_flight / capacity
beyond).  Deterministic: no threads, no sleeps, no randomness outside
Hypothesis."""
from __future__ import annotations

import json
import math

import pytest
from hypothesis import given, settings, strategies as st

from greenq.exceptions import ConfigError
from greenq.resources.adaptive import AdaptiveLimit, resolve_errors
from tests.bench.adaptive_sim import FakeClock, Overloaded, band, settle_time, simulate


def settled(run, since, worker=0):
    """The limits (probes excepted) a worker had from ``since`` on."""
    return [p.limit for p in run.trace if p.t >= since and p.worker == worker and not p.probing]


def limiter(clock, min_limit=1, max_limit=200, **kw):
    return AdaptiveLimit(min_limit, max_limit, clock=clock, **kw)


def finish_probe(lim, clock, latency=0.01):
    """Feed the start-up probe its samples (tasks that started after it began)."""
    assert lim.probing
    clock.now += latency            # tasks that start after the probe did
    while lim.probing:
        clock.now += latency
        lim.on_sample(latency, in_flight=1)
    assert lim.rtt_noload == pytest.approx(latency)


# -- convergence -------------------------------------------------------------------------

@pytest.mark.parametrize("initial", [2, 200], ids=["from-below", "from-above"])
def test_converges_near_capacity(initial):
    clock = FakeClock()
    lim = limiter(clock, initial_limit=initial)
    run = simulate([lim], clock, duration=20.0, capacity=lambda t: 40.0)
    low, high = band(40.0)
    assert 40 < low and high < 40 * 1.4         # the band itself is near the capacity
    assert settle_time(run, 0.0, low, high) is not None
    assert settle_time(run, 0.0, low, high) < 5.0     # 100 base latencies
    tail = settled(run, 10.0)
    assert tail and all(low <= limit <= high for limit in tail), (min(tail), max(tail))
    assert run.errors == 0


def test_follows_capacity_halving_within_bounded_time():
    clock = FakeClock()
    lim = limiter(clock)
    run = simulate([lim], clock, duration=40.0, capacity=lambda t: 40.0 if t < 20.0 else 20.0)
    low, high = band(20.0)
    taken = settle_time(run, 20.0, low, high)
    assert taken is not None and taken < 2.0, taken       # 40 base latencies of 50 ms
    samples_after = [p for p in run.trace if 20.0 <= p.t <= 20.0 + taken]
    assert len(samples_after) < 2000
    assert all(low <= limit <= high for limit in settled(run, 25.0))
    assert max(settled(run, 10.0)[:100]) > high            # it was above the new band before


def test_follows_capacity_doubling_back():
    clock = FakeClock()
    lim = limiter(clock)
    run = simulate([lim], clock, duration=40.0, capacity=lambda t: 20.0 if t < 20.0 else 40.0)
    low, high = band(40.0)
    taken = settle_time(run, 20.0, low, high)
    assert taken is not None and taken < 5.0, taken


# -- errors ------------------------------------------------------------------------------

def test_listed_error_cuts_multiplicatively_once_per_window():
    clock = FakeClock()
    lim = limiter(clock, initial_limit=100, errors=(Overloaded, TimeoutError))
    finish_probe(lim, clock)
    assert lim.limit == 100
    clock.now += 1.0
    assert lim.on_sample(0.5, in_flight=100, error=Overloaded()) == 70
    # tasks that started before the cut fail too: the same overload, no second cut
    clock.now += 0.1
    assert lim.on_sample(0.5, in_flight=100, error=TimeoutError()) == 70
    # one that started after the cut fails: cut again
    clock.now += 1.0
    assert lim.on_sample(0.2, in_flight=70, error=Overloaded()) == 49
    # an error not listed says nothing about overload
    clock.now += 1.0
    assert lim.on_sample(0.2, in_flight=49, error=ValueError("bad input")) == 49


def test_error_subclass_counts():
    clock = FakeClock()
    lim = limiter(clock, initial_limit=50, errors=(OSError,))
    finish_probe(lim, clock)
    clock.now += 1.0
    assert lim.on_sample(0.1, in_flight=10, error=ConnectionResetError()) == 35


def test_errors_from_a_hard_ceiling_keep_the_limit_below_it():
    # latency never rises (capacity 1000), but the downstream refuses above 30
    clock = FakeClock()
    lim = limiter(clock, errors=(Overloaded,))
    run = simulate([lim], clock, duration=30.0, capacity=lambda t: 1000.0, errors_above=30)
    tail = settled(run, 5.0)
    assert max(tail) <= 30 + 8          # one growth step (alpha * log10) above the ceiling at most
    assert sum(tail) / len(tail) >= 30 * 0.7
    assert run.errors < run.samples * 0.05


def test_unlisted_errors_change_nothing():
    clock = FakeClock()
    lim = limiter(clock, errors=(TimeoutError,))
    run = simulate([lim], clock, duration=20.0, capacity=lambda t: 1000.0, errors_above=30)
    assert run.errors > run.samples * 0.5
    assert min(settled(run, 5.0)) > 30      # never cut: they are not Overloaded


# -- bounds, the app-limited guard ---------------------------------------------------------

def test_limit_stays_within_bounds():
    clock = FakeClock()
    lim = limiter(clock, min_limit=10, max_limit=30)
    run = simulate([lim], clock, duration=60.0,
                   capacity=lambda t: 100.0 if t < 20.0 else (1.0 if t < 40.0 else 12.0))
    limits = [p.limit for p in run.trace]
    assert all(10 <= limit <= 30 for limit in limits)
    # both bounds were pressed: capacity 100 wants more than 30, capacity 1 fewer than 10
    assert set(settled(run, 15.0)[:1000]) == {30}
    assert set(p.limit for p in run.trace if 35.0 < p.t < 40.0 and not p.probing) == {10}


def test_unused_limit_does_not_grow():
    clock = FakeClock()
    lim = limiter(clock, initial_limit=10)
    run = simulate([lim], clock, duration=30.0, capacity=lambda t: 1000.0, demand=5)
    assert set(settled(run, 0.0)) == {10}
    # the same downstream with a backlog: it grows (so the guard is what held it)
    clock = FakeClock()
    lim = limiter(clock, initial_limit=10)
    run = simulate([lim], clock, duration=30.0, capacity=lambda t: 1000.0)
    assert max(settled(run, 0.0)) == 200


# -- probing the no-load latency -----------------------------------------------------------

def test_probe_recovers_after_latency_drift():
    # at t = 10 the downstream gets twice as slow for good (same capacity): read
    # against the stale no-load latency, every sample looks queued
    clock = FakeClock()
    lim = limiter(clock, probe_interval=30.0)
    run = simulate([lim], clock, duration=45.0, capacity=lambda t: 40.0,
                   base=lambda t: 0.05 if t < 10.0 else 0.1)
    low, high = band(40.0)
    assert min(settled(run, 10.0)) < low            # the stale estimate pulled it down ...
    probes = [p.t for p in run.trace if p.probing and p.t > 10.0]
    assert probes and 30.0 <= probes[0] < 31.0    # ... until the probe on the 30 s boundary
    assert lim.rtt_noload == pytest.approx(0.1, rel=0.1)      # (the jitter)
    taken = settle_time(run, 30.0, low, high)
    assert taken is not None and taken < 5.0, taken


def test_probe_holds_the_limit_low_and_ignores_tasks_started_before_it():
    clock = FakeClock()
    lim = limiter(clock, initial_limit=50, probe_interval=10.0, probe_samples=3)
    finish_probe(lim, clock, latency=0.01)
    assert lim.limit == 50
    clock.now = 10.0
    lim.on_sample(0.01, in_flight=50)           # the first sample past the boundary starts it
    assert lim.probing and lim.limit == 3
    for _ in range(5):                          # tasks of the full limit: a queued latency
        clock.now += 0.01
        lim.on_sample(0.5, in_flight=50)
    assert lim.probing
    for _ in range(3):
        clock.now += 0.02
        lim.on_sample(0.02, in_flight=3)
    assert not lim.probing and lim.limit == 50
    assert lim.rtt_noload == pytest.approx(0.02)


def test_faster_downstream_lowers_noload_at_once():
    clock = FakeClock()
    lim = limiter(clock)
    simulate([lim], clock, duration=20.0, capacity=lambda t: 40.0,
             base=lambda t: 0.05 if t < 10.0 else 0.025)
    assert lim.rtt_noload == pytest.approx(0.025, rel=0.1)


# -- cluster share -------------------------------------------------------------------------

def test_cluster_workers_never_hold_more_than_the_lease():
    clock = FakeClock()
    workers = [limiter(clock, max_limit=40) for _ in range(3)]
    run = simulate(workers, clock, duration=30.0, capacity=lambda t: 60.0, lease=40)
    assert run.max_held_total <= 40
    assert max(p.held_total for p in run.trace) <= 40


def test_cluster_workers_share_the_downstream():
    clock = FakeClock()
    workers = [limiter(clock) for _ in range(2)]
    run = simulate(workers, clock, duration=30.0, capacity=lambda t: 40.0)
    scale = math.log10(30)
    total = [p.held_total for p in run.trace if p.t > 20.0]
    # each worker keeps alpha..beta queued: the fleet 2 * alpha .. 2 * beta
    assert 40 <= min(total) and max(total) <= 40 + 2 * 6 * scale + 2
    shares = [settled(run, 20.0, worker=w)[-1] for w in (0, 1)]
    assert abs(shares[0] - shares[1]) <= 10


# -- never out of bounds, never raises ------------------------------------------------------

SAMPLE = st.tuples(
    st.floats(min_value=0.0, max_value=100.0),                              # clock step
    st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(0.0, 10.0)),  # latency
    st.integers(min_value=-5, max_value=10_000),                            # in_flight
    st.sampled_from([None, TimeoutError(), ValueError(), KeyboardInterrupt()]))


@settings(max_examples=300, deadline=None)
@given(bounds=st.tuples(st.integers(1, 50), st.integers(0, 500)),
       initial=st.one_of(st.none(), st.integers(-10, 1000)),
       samples=st.lists(SAMPLE, max_size=300))
def test_any_samples_keep_the_limit_in_bounds(bounds, initial, samples):
    min_limit, extra = bounds
    max_limit = min_limit + extra
    clock = FakeClock()
    lim = AdaptiveLimit(min_limit, max_limit, clock=clock, errors=(TimeoutError,),
                        initial_limit=initial, probe_interval=5.0)
    assert min_limit <= lim.limit <= max_limit
    for step, latency, in_flight, error in samples:
        clock.now += step
        result = lim.on_sample(latency, in_flight=in_flight, error=error)
        assert result == lim.limit
        assert isinstance(result, int) and min_limit <= result <= max_limit


# -- configuration --------------------------------------------------------------------------

def test_resolve_errors_builtins_and_dotted_paths():
    assert resolve_errors(["TimeoutError", " json.JSONDecodeError ", "",
                           "greenq.exceptions.ConfigError", "concurrent.futures:TimeoutError"]) == (
        TimeoutError, json.JSONDecodeError, ConfigError, TimeoutError)


@pytest.mark.parametrize("name, message", [
    ("TimeoutErorr", "did you mean 'TimeoutError'"),
    ("json.JSONDecodError", "'json' has no 'JSONDecodError'; did you mean 'JSONDecodeError'"),
    ("no_such_module_xyz.Error", "cannot import module 'no_such_module_xyz'"),
    ("json.dumps", "'json.dumps' is not an exception class"),
    ("len", "'len' is not an exception class"),
])
def test_resolve_errors_unknown_name_is_a_config_error(name, message):
    with pytest.raises(ConfigError, match="errors: .*" + message.replace(".", r"\.")):
        resolve_errors([name])


@pytest.mark.parametrize("kw", [dict(min_limit=0), dict(min_limit=10, max_limit=5),
                                dict(alpha=6.0, beta=3.0), dict(error_backoff=1.5),
                                dict(window_samples=0), dict(probe_interval=0.0),
                                dict(probe_interval=math.inf)])
def test_bad_constants_are_config_errors(kw):
    args = dict(min_limit=1, max_limit=10)
    args.update(kw)
    with pytest.raises(ConfigError, match="adaptive limit"):
        AdaptiveLimit(args.pop("min_limit"), args.pop("max_limit"), **args)
