"""The adaptive limit near a ceiling that only errors show (issue 20; the
PostgreSQL benchmark's "too many clients"): after a listed error the limit
stays below the level that failed for ``ceiling_hold`` seconds, then grows by
1 a window near it, and forgets it a full ``alpha`` above it.  And the
counter of parked permits handed to the next holder (ResourcePool.handoffs).
Fake clocks, no threads, no sleeps."""
from __future__ import annotations

import pytest

from greenq.exceptions import ConfigError
from greenq.resources.adaptive import AdaptiveLimit
from tests.bench.adaptive_sim import FakeClock, Overloaded, simulate
from tests.unit.test_resource_pool import bound_pool

NOLOAD = 0.01


def started_limit(clock, initial, hold=10.0):
    lim = AdaptiveLimit(1, 200, clock=clock, errors=(Overloaded,), initial_limit=initial, ceiling_hold=hold)
    clock.now += NOLOAD
    while lim.probing:                      # the start-up probe: no-load latency 10 ms
        clock.now += NOLOAD
        lim.on_sample(NOLOAD, in_flight=1)
    return lim


def healthy_window(lim, clock):
    """One window of samples at the no-load latency with the limit all used: a grow, unless held."""
    before = sum(lim.decisions.values())
    while sum(lim.decisions.values()) == before:
        clock.now += 2 * NOLOAD
        lim.on_sample(NOLOAD, in_flight=lim.limit, held=lim.limit)
    return lim.limit


def test_the_limit_stays_below_the_failed_level_for_the_hold_then_creeps_past_it():
    clock = FakeClock()
    lim = started_limit(clock, initial=40)
    clock.now += 0.1
    assert lim.on_sample(0.05, in_flight=40, error=Overloaded()) == 28       # x 0.7, ceiling 40
    failed_at = clock.now
    seen = []
    while True:
        limit = healthy_window(lim, clock)
        if clock.now >= failed_at + 10.0:
            break
        seen.append(limit)
    assert max(seen) == 39 and seen[-1] == 39          # quickly back to just below it, and held there
    assert seen.index(39) < 5 and len(seen) > 8
    assert lim.decisions["ceiling"] > 0
    # the hold is over: 1 a window past the level, then alpha again once a full alpha above it
    steps = [limit] + [healthy_window(lim, clock) for _ in range(7)]
    deltas = [b - a for a, b in zip([39] + steps, steps)]
    assert deltas[:4] == [1, 1, 1, 1], steps
    assert max(deltas) > 1, steps                      # forgotten: growth by alpha * log10(limit)
    assert clock.now < 60.0                            # (no periodic probe in between)


def test_an_error_during_the_hold_lowers_the_remembered_level():
    clock = FakeClock()
    lim = started_limit(clock, initial=40)
    clock.now += 0.1
    assert lim.on_sample(0.05, in_flight=40, error=Overloaded()) == 28
    clock.now += 1.0
    assert lim.on_sample(0.05, in_flight=28, error=Overloaded()) == 19       # a second cut: ceiling 28
    seen = [healthy_window(lim, clock) for _ in range(12)]
    assert max(seen) == 27


def test_a_hard_ceiling_costs_few_errors_with_the_hold():
    # latency never rises (capacity 1000), the downstream refuses above 30: errors are the only signal
    runs = {}
    for hold in (0.0, 10.0):
        clock = FakeClock()
        lim = AdaptiveLimit(1, 200, clock=clock, errors=(Overloaded,), ceiling_hold=hold)
        run = simulate([lim], clock, duration=120.0, capacity=lambda t: 1000.0, errors_above=30)
        tail = [p.limit for p in run.trace if p.t >= 5.0 and not p.probing]
        runs[hold] = (run.errors, run.samples, sum(tail) / len(tail), max(tail))
    errors, samples, mean, most = runs[10.0]
    assert errors < samples * 0.005, runs              # (seen: 0.09 %; without the hold 4.6 %)
    assert errors * 10 < runs[0.0][0], runs
    assert mean >= 30 * 0.9 and most <= 31, runs       # (seen: a mean of 29.9; without the hold 26.2)


def test_ceiling_hold_is_checked():
    with pytest.raises(ConfigError, match="ceiling_hold"):
        AdaptiveLimit(1, 10, ceiling_hold=-1.0)
    with pytest.raises(ConfigError, match="ceiling_hold"):
        AdaptiveLimit(1, 10, ceiling_hold=float("inf"))


def test_parked_permits_taken_are_counted_with_the_time_they_waited():
    app, pool, db, clock = bound_pool(limit=2)
    assert pool.handoffs() == (0, 0.0)
    for holder, parked_for in (("t1", 0.25), ("t2", 0.75)):
        assert pool.try_acquire(holder)
        with pool.connection():
            pass
        pool.release(holder)                # parked with the idle connection
        assert pool.parked() == 1
        clock.now += parked_for
    assert pool.try_acquire("t3") and pool.parked() == 0
    assert pool.handoffs() == (2, pytest.approx(0.5))     # t2 took t1's after 0.25 s, t3 t2's after 0.75 s
    pool.release("t3")
    pool.close()


def test_refusals_that_fail_at_once_cut_once_per_no_load_latency():
    """A refused connect fails at once (latency ~0, so it "started" after any
    cut): a burst of them cuts once, not once each (seen: 7 cuts in a row took
    a worker's limit from 24 to 3.9 in the PostgreSQL benchmark)."""
    clock = FakeClock()
    limit = AdaptiveLimit(1, 100, clock=clock, initial_limit=40, probe_samples=1, errors=(Overloaded,))
    clock.now = 0.5
    limit.on_sample(0.010, in_flight=3)                 # the probe: 10 ms without load
    for step in range(5):                               # five refusals within 5 ms
        clock.now = 1.0 + step * 0.001
        limit.on_sample(0.0, in_flight=40, error=Overloaded())
    assert limit.decisions["error"] == 1 and limit.limit == 28
    clock.now = 1.02                                    # more than one no-load latency later: again
    limit.on_sample(0.0, in_flight=28, error=Overloaded())
    assert limit.decisions["error"] == 2
