"""Adaptive limits in simulation (issue 20, item 3): a discrete-event loop on a
fake clock, no threads, no sleeps, the same result on every run.

The downstream serves ``capacity`` tasks at once in ``base`` seconds; beyond
that it queues, and a task's latency is ``base * in_flight / capacity`` (the
in_flight at its start, every worker's tasks counted), plus up to ``jitter``
(10 %) of it, spread evenly.  Each worker has an
unbounded backlog (or ``demand`` tasks at most) and starts a task whenever it
holds fewer permits than its limit in force and the cluster lease (``lease``
places across the fleet) has one free.  With ``errors_above`` (or
``refuse_above(t)``), a task that starts with more than that many in flight fails fast with ``Overloaded`` (a
database's "too many clients").

    python tests/bench/adaptive_sim.py            # capacity 40 -> 20 at t = 30 s

prints the limit's trace and the settle time.  The real-service benchmark is
separate (issue 20, "Show"); tests/unit/test_adaptive_limit.py drives the
same loop with assertions.
"""
from __future__ import annotations

import heapq
import os
import sys
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

if __name__ == "__main__":      # run as a script from anywhere: greenq from this checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from greenq.resources.adaptive import AdaptiveLimit  # noqa: E402


class FakeClock:
    """The simulation's time; pass it as ``clock=``."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Point:
    t: float
    worker: int
    limit: int
    probing: bool
    held_total: int


@dataclass
class Run:
    trace: List[Point] = field(default_factory=list)
    failed: List[bool] = field(default_factory=list)        # beside trace: that sample failed
    samples: int = 0
    errors: int = 0
    max_held_total: int = 0


#: tasks' latencies vary by up to ``jitter`` of theirs, spread evenly by this
#: step (no random numbers: each run is the same), so that tasks do not end in lockstep
GOLDEN = (5 ** 0.5 - 1) / 2
#: a refused task fails fast: this fraction of the base latency ("too many clients")
REFUSED = 0.1


class Overloaded(Exception):
    """What the simulated downstream raises above its hard ceiling (``errors_above``)."""


def simulate(limiters: List[AdaptiveLimit], clock: FakeClock, *, duration: float,
             capacity: Callable[[float], float], base: Callable[[float], float] | float = 0.05,
             demand: Optional[int] = None, lease: Optional[int] = None,
             errors_above: Optional[int] = None, jitter: float = 0.1,
             refuse_above: Optional[Callable[[float], int]] = None, on_sample: Optional[Callable[[Run], None]] = None,
             client_lag: Optional[Callable[[int], float]] = None, feed_lag: bool = True,
             ) -> Run:
    """Run until ``duration`` simulated seconds; ``capacity(t)`` and ``base(t)``
    may change over time.  Returns the limit after every sample, per worker.
    ``client_lag(n)``: a CPU-bound worker's own delay with ``n`` of its tasks
    in flight, added to each task's latency (its loop resumes the task that
    late); ``feed_lag``: the worker's loop lag is given to its limit
    (``on_sample(lag=...)``, as greenq/resources/lag.py measures it)."""
    fixed = None if callable(base) else float(base)

    def base_at(t: float) -> float:
        return fixed if fixed is not None else base(t)  # type: ignore[operator]
    run = Run()
    held = [0] * len(limiters)
    events: List[Tuple[float, int, int, float, int, bool]] = []
    seq = 0
    turn = 0
    while clock.now < duration:
        turn = (turn + 1) % len(limiters)           # the workers take turns at free places
        for w in [(turn + i) % len(limiters) for i in range(len(limiters))]:
            limiter = limiters[w]                    # start what the limits and the lease allow
            while held[w] < min(limiter.limit, demand if demand is not None else 1 << 30) \
                    and (lease is None or sum(held) < lease):
                held[w] += 1
                total = sum(held)
                ceiling = refuse_above(clock.now) if refuse_above is not None else errors_above
                failed = ceiling is not None and total > ceiling
                latency = base_at(clock.now) * (REFUSED if failed else max(1.0, total / capacity(clock.now)))
                latency *= 1.0 + jitter * ((seq * GOLDEN) % 1.0)
                if client_lag is not None:
                    latency += client_lag(held[w])
                seq += 1
                heapq.heappush(events, (clock.now + latency, seq, w, latency, held[w], failed))
        run.max_held_total = max(run.max_held_total, sum(held))
        if not events:
            break
        end, _, w, latency, in_flight, failed = heapq.heappop(events)
        clock.now = end
        held[w] -= 1
        run.samples += 1
        run.errors += failed
        lag = client_lag(in_flight) if client_lag is not None and feed_lag else 0.0
        limiters[w].on_sample(latency, in_flight=in_flight, error=Overloaded() if failed else None, lag=lag)
        run.trace.append(Point(end, w, limiters[w].limit, limiters[w].probing, sum(held)))
        run.failed.append(failed)
        if on_sample is not None:
            on_sample(run)
    return run


def band(capacity: float, alpha: float = 3.0, beta: float = 6.0) -> Tuple[int, int]:
    """Where the limit settles for one worker: capacity + alpha..beta (scaled by
    log10 of the limit), with one of slack either side for the integer limit."""
    import math
    scale = max(1.0, math.log10(capacity))
    return int(capacity + alpha * scale) - 1, int(capacity + beta * scale) + 1


def settle_time(run: Run, since: float, low: int, high: int, worker: int = 0,
                until: float = float("inf")) -> Optional[float]:
    """Seconds from ``since`` until the limit entered [low, high] for good (up to
    ``until``; probe dips excepted); None if it never did."""
    last_out = since
    inside = False
    for point in run.trace:
        if not since <= point.t < until or point.worker != worker or point.probing:
            continue
        if low <= point.limit <= high:
            if not inside:
                inside, last_out = True, point.t
        else:
            inside = False
    return last_out - since if inside else None


def capacity_halves(c_before: float = 40.0, c_after: float = 20.0, at: float = 30.0,
                    duration: float = 90.0, base: float = 0.05) -> Tuple[Run, AdaptiveLimit]:
    clock = FakeClock()
    limiter = AdaptiveLimit(1, 200, clock=clock)
    run = simulate([limiter], clock, duration=duration, base=base,
                   capacity=lambda t: c_before if t < at else c_after)
    return run, limiter


def error_rate(run: Run, start: float, end: float) -> Tuple[int, int]:
    """(errors, samples) of the samples that ended in [start, end)."""
    errors = samples = 0
    for point, failed in zip(run.trace, run.failed):
        if start <= point.t < end:
            samples += 1
            errors += failed
    return errors, samples


def mean_limit(run: Run, start: float, end: float, worker: int = 0) -> float:
    limits = [p.limit for p in run.trace
              if start <= p.t < end and p.worker == worker and not p.probing]
    return sum(limits) / len(limits)


def print_trace(run: Run, at: float, base: float) -> None:
    print(f"{'t (s)':>7} {'limit':>6} {'in use':>7}")
    next_t = 0.0
    for point in run.trace:
        if point.t >= next_t:
            print(f"{point.t:7.2f} {point.limit:6d} {point.held_total:7d}"
                  f"{'  (probe)' if point.probing else ''}")
            near = at - 1 <= point.t <= at + 40 * base
            next_t = point.t + (base if near else 5.0)


def cpu_bound(duration: float = 60.0, per_task: float = 0.00015, base: float = 0.0055,
              capacity: float = 45.0) -> "dict[str, Tuple[float, float]]":
    """A CPU-bound worker beside a downstream that takes ``capacity`` at once:
    each task in flight delays the others' resumption by ``per_task`` seconds
    (0.15 ms: at 45 in flight, 6.75 ms on a 5.5 ms query, the PostgreSQL
    benchmark's windows).  Returns, per variant, (mean limit, tasks per second)
    from t = 10 s: the loop lag given to the limit, and not."""
    out = {}
    for label, feed in (("lag given", True), ("lag not given", False)):
        clock = FakeClock()
        limiter = AdaptiveLimit(1, 200, clock=clock)
        run = simulate([limiter], clock, duration=duration, base=base, capacity=lambda t: capacity,
                       client_lag=lambda n: per_task * n, feed_lag=feed)
        done = sum(1 for p in run.trace if p.t >= 10.0)
        out[label] = (mean_limit(run, 10.0, duration), done / (duration - 10.0))
    fixed_clock = FakeClock()
    fixed = AdaptiveLimit(45, 45, clock=fixed_clock)         # a fixed limit of 45 (it never moves)
    run = simulate([fixed], fixed_clock, duration=duration, base=base, capacity=lambda t: capacity,
                   client_lag=lambda n: per_task * n)
    out["fixed 45"] = (45.0, sum(1 for p in run.trace if p.t >= 10.0) / (duration - 10.0))
    print(f"\n== a CPU-bound worker: {per_task * 1e3:g} ms of its own delay per task in flight, on a"
          f" {base * 1e3:g} ms downstream of capacity {capacity:g} (limit in [1, 200]), from t = 10 s")
    for label, (limit, rate) in out.items():
        print(f"{label:>14}: mean limit {limit:5.1f}, {rate:7.1f} tasks/s ({100 * rate / out['fixed 45'][1]:.0f} %"
              f" of the fixed limit's)")
    return out


def main() -> None:
    at, duration = 30.0, 90.0
    for base in (0.05, 0.5):
        run, limiter = capacity_halves(at=at, duration=duration, base=base)
        print(f"\n== latency: capacity 40 -> 20 at t = {at:g} s; base latency {base * 1000:g} ms;"
              f" limit in [1, 200]")
        print_trace(run, at, base)
        low, high = band(40.0)
        first = settle_time(run, 0.0, low, high, until=at)
        low2, high2 = band(20.0)
        second = settle_time(run, at, low2, high2)
        print(f"samples {run.samples}, errors {run.errors}")
        print(f"capacity 40: band [{low}, {high}], entered {first:.2f} s after the start"
              if first is not None else f"capacity 40: never settled in [{low}, {high}]")
        print(f"capacity 20: band [{low2}, {high2}], entered {second:.2f} s after the change"
              f" ({second / base:.0f} base latencies)"
              if second is not None else f"capacity 20: never settled in [{low2}, {high2}]")

    base = 0.05
    clock = FakeClock()
    limiter = AdaptiveLimit(1, 200, clock=clock, errors=(Overloaded,))
    run = simulate([limiter], clock, duration=duration, base=base, capacity=lambda t: 1000.0,
                   errors_above=None, refuse_above=lambda t: 40 if t < at else 20)
    print(f"\n== errors only: the downstream refuses above 40, then above 20 from t = {at:g} s"
          f" (latency flat; base {base * 1000:g} ms; errors = Overloaded)")
    print_trace(run, at, base)
    for label, start, end, best in (("before", 5.0, at, 40), ("after", at + 5.0, duration, 20)):
        errors, samples = error_rate(run, start, end)
        print(f"{label}: mean limit {mean_limit(run, start, end):.1f} (best fixed {best}),"
              f" errors {errors}/{samples} = {100.0 * errors / samples:.2f} %")
    reacted = next(p.t for p in run.trace if p.t >= at and p.limit <= 20)
    print(f"after the change: the limit was at or below 20 {reacted - at:.2f} s later")

    cpu_bound()

    clock = FakeClock()
    fleet = [AdaptiveLimit(1, 45, clock=clock) for _ in range(3)]
    run = simulate(fleet, clock, duration=duration, base=base, lease=45,
                   capacity=lambda t: 40.0 if t < at else 20.0)
    print(f"\n== cluster: 3 workers, lease of 45 places, capacity 40 -> 20 at t = {at:g} s")
    for label, start, end in (("before", 10.0, at), ("after", at + 10.0, duration)):
        held = [p.held_total for p in run.trace if start <= p.t < end]
        shares = ", ".join(f"{mean_limit(run, start, end, w):.1f}" for w in range(3))
        held.sort()
        print(f"{label}: held across the fleet: median {held[len(held) // 2]}, min {held[0]},"
              f" max {held[-1]}; limits per worker {shares}")
    print(f"most held at once: {run.max_held_total} (lease 45)")


if __name__ == "__main__":
    main()
