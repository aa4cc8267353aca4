"""The adaptive limit under a worker's own noise (greenq/resources/adaptive.py;
docs/resources.md "Why the low latencies, not the median" and the probe's
FASTER_PROBE_GAP): latency the worker adds to some tasks is not read as a
queue downstream, and windows faster than the last probe do not start a
probe more than once per probe_interval / 6.  Fake clock, no randomness."""
from __future__ import annotations

import pytest

from greenq.resources.adaptive import FASTER_PROBE_GAP, AdaptiveLimit
from tests.bench.adaptive_sim import FakeClock

BASE = 0.01


def ready(initial=20, **kw):
    clock = FakeClock()
    lim = AdaptiveLimit(1, 200, clock=clock, initial_limit=initial, **kw)
    clock.now += BASE
    while lim.probing:                          # the start-up probe at no load
        clock.now += BASE
        lim.on_sample(BASE, in_flight=1)
    assert lim.rtt_noload == pytest.approx(BASE)
    return lim, clock


def window(lim, clock, latencies, in_flight):
    before = dict(lim.decisions)
    clock.now += max(latencies)                 # tasks that start after the last decision
    for latency in latencies:
        clock.now += 0.001
        lim.on_sample(latency, in_flight=in_flight)
    return {k: v - before.get(k, 0) for k, v in lim.decisions.items() if v != before.get(k, 0)}


def test_delays_of_some_tasks_are_not_a_queue_but_delays_of_all_are():
    lim, clock = ready()
    start = lim.limit
    # 2 of 20 tasks at the no-load latency, 18 three times slower (the worker's
    # CPU, a late green thread): the median reads 13 queued of 20, the low quantile none
    noisy = [BASE] * 2 + [3 * BASE] * 18
    assert window(lim, clock, noisy, in_flight=start) == {"grow": 1}
    assert lim.limit > start
    # every task three times slower: a queue downstream
    grown = lim.limit
    assert window(lim, clock, [3 * BASE] * 20, in_flight=grown) == {"drain": 1}
    assert lim.limit < grown
    median = AdaptiveLimit(1, 200, clock=clock, quantile=0.5)
    assert median._low(noisy) == 3 * BASE and lim._low(noisy) == BASE


def test_faster_windows_probe_at_most_once_per_gap_and_lower_the_noload_between():
    lim, clock = ready(initial=10)
    gap = FASTER_PROBE_GAP * lim.probe_interval
    began = clock.now
    probes = 0
    while clock.now - began < gap - 1.0:        # windows faster than the no-load latency, for ~9 s
        latency = 0.85 * lim.rtt_noload
        decided = window(lim, clock, [latency] * 10, in_flight=lim.limit)
        assert not lim.probing, "a faster window within the gap started a probe"
        probes += decided.get("faster", 0)
        assert lim.rtt_noload == pytest.approx(latency)   # it became the no-load latency
    assert probes > 5
    clock.now = began + gap + 0.1               # the gap is over: the probe that was due
    lim.on_sample(lim.rtt_noload, in_flight=lim.limit)
    assert lim.probing
