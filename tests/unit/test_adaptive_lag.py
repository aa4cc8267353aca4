"""A CPU-bound worker's own delays are not the downstream's queue
(greenq/resources/lag.py, ``AdaptiveLimit.on_sample(lag=...)``): in the
simulation (tests/bench/adaptive_sim.py) a worker that resumes each task
0.15 ms later per task in flight, beside a 5.5 ms downstream that takes 45
at once, keeps the throughput of a fixed limit of 45 when its loop lag is
given to the limit, and loses about 40 % of it when it is not (the limit read
the lag as a queue and sank to 19)."""
from __future__ import annotations

import threading
import time

from greenq.resources import lag as lag_module
from greenq.resources.adaptive import LAG_FLOOR, AdaptiveLimit
from tests.bench.adaptive_sim import FakeClock, cpu_bound


def test_a_cpu_bound_worker_keeps_the_fixed_limits_throughput_when_its_lag_is_given():
    out = cpu_bound(duration=40.0)
    given, not_given, fixed = out["lag given"], out["lag not given"], out["fixed 45"]
    assert given[1] >= 0.9 * fixed[1], out            # within 10 % of the best fixed limit
    assert not_given[1] < 0.75 * fixed[1], out         # what it cost before (the lag read as a queue)
    assert given[0] >= 45, out                        # the limit stays at the downstream's capacity or above


def test_the_lag_is_taken_off_the_latency_down_to_a_floor():
    clock = FakeClock()
    limit = AdaptiveLimit(1, 50, clock=clock, probe_samples=1, window_samples=1, initial_limit=1)
    clock.now = 1.0
    limit.on_sample(0.010, in_flight=1, lag=0.004)    # the probe: 6 ms of the downstream's
    assert abs(limit.rtt_noload - 0.006) < 1e-9
    clock.now = 2.0
    limit.on_sample(0.010, in_flight=1, lag=1.0)      # a lag read far too high: a quarter is kept
    # a window faster than the probe, within probe_interval / 6 of it: its latency is the no-load one
    assert limit.decisions["faster"] == 1 and abs(limit.rtt_noload - 0.010 * LAG_FLOOR) < 1e-9


class LateDriver:
    """A driver whose sleep wakes 10 ms late, for ``ticks`` sleeps, then stops the meter."""

    def __init__(self, ticks: int) -> None:
        self.ticks = ticks
        self.meter = None
        self.done = threading.Event()

    def spawn(self, fn):
        thread = threading.Thread(target=lambda: (fn(), self.done.set()), daemon=True)
        thread.start()
        return thread

    def sleep(self, seconds):
        time.sleep(seconds + 0.010)
        self.ticks -= 1
        if self.ticks <= 0:
            self.meter.close()


def test_the_loop_lag_is_a_moving_average_of_how_late_the_loop_wakes():
    driver = LateDriver(ticks=40)
    driver.meter = meter = lag_module.LoopLag.__new__(lag_module.LoopLag)
    meter.driver, meter.value, meter._closed = driver, 0.0, False
    meter.handle = driver.spawn(meter._run)
    assert driver.done.wait(10)
    # 40 measures of >= 10 ms late: the average (weight 0.1) is at least 10 ms x (1 - 0.9^40)
    assert 0.0098 <= meter.value < 0.1, meter.value
