"""Adaptive limits: the number of permits a downstream can take, found from what
the tasks holding them measure (issue 20, item 3).

Pure and self-contained: :class:`AdaptiveLimit` does no I/O and starts no green
thread.  The permit pool calls :meth:`AdaptiveLimit.on_sample` when a holder
ends and applies the returned number with ``PermitPool.set_limit(limit)``.

The estimator is Vegas (TCP Vegas, Brakmo and Peterson 1994; the Vegas limit of
Netflix's concurrency-limits), measured per window of samples:

    capacity = in_flight * rtt_noload / rtt      (what the downstream serves
                                                  without queueing)
    queue    = in_flight - capacity              (what waits inside it)

``rtt_noload`` is the median latency measured at a low concurrency (a *probe*),
``rtt`` and ``in_flight`` the medians of a window.  While ``queue`` is below
``alpha`` and the limit is used, the limit grows by ``alpha``; above ``beta``
it moves halfway to ``capacity + beta``; in between it holds.  So it settles
with ``alpha`` to ``beta`` tasks queued in the downstream: enough to keep it
busy, few enough that their wait stays small.  An exception listed in
``errors`` cuts the limit by ``error_backoff`` at once, once per window, and
keeps it under the level that failed for ``ceiling_hold`` seconds (then it
grows by 1 a window near that level: a ceiling only errors show is touched
about once per hold, not on every climb).

Why Vegas and not Gradient2: Gradient2 compares a fast average of the latency
with a slow average of itself, so under a load that stays too high the slow
average catches up with the fast one, the gradient returns to 1 and the limit
climbs again (Netflix caps the drift with a decay; it does not remove it).
Vegas compares with a latency measured without load, which does not move
under sustained load, and its queue estimate is exact for a downstream that
queues what it cannot serve (latency = base * in_flight / capacity), with the
``in_flight`` the pool already knows.  Its weakness is the no-load latency
going stale (the downstream gets slower for good, and every later sample reads
as queueing): the periodic probe measures it again (as Envoy's adaptive
concurrency filter does), and a sample that started before a change is never
used to judge that change (its start is ``now - latency``).

Invariants: ``min_limit <= limit <= max_limit`` always, and ``on_sample``
never raises (a sample it cannot read is ignored).

Cluster scope: the cluster pool is a counted lease of ``max_limit`` places, so
the permits held across the fleet never exceed ``max_limit`` whatever each
worker's estimator says; each worker's ``AdaptiveLimit`` only bounds how many
of those places that worker tries to hold.  A worker measures the shared
downstream, so its ``capacity`` reads as its proportional share of the
downstream's (see docs/resources.md, "Adaptive limits").
"""
from __future__ import annotations

import builtins
import difflib
import importlib
import math
import statistics
import time
from collections import Counter
from typing import Callable, List, Optional, Sequence, Tuple, Type

from greenq.exceptions import ConfigError

__all__ = ["AdaptiveLimit", "resolve_errors"]

#: the first limit when none is given: a guess that a downstream takes 10 at once
DEFAULT_INITIAL = 10
#: a window whose median latency is below this fraction of rtt_noload starts a probe
#: (10 % below: less is the noise between two medians, not a faster downstream)
FASTER = 0.9
#: such a probe comes at most once per this fraction of probe_interval (10 s of 60 s);
#: a faster window in between becomes the no-load latency itself
FASTER_PROBE_GAP = 1.0 / 6.0
#: a sample loses the worker's own delay (``lag=``, greenq/resources/lag.py), but
#: never more than down to this fraction of its latency (a lag read too high must
#: not make a slow downstream look fast)
LAG_FLOOR = 0.25


class AdaptiveLimit:
    """The limit in force for one resource in one worker.

    ``min_limit``/``max_limit``: the bounds (``min_limit`` and ``limit`` of the
    ``[resource:NAME]`` section).  ``errors``: exception classes that mean
    "overloaded".  ``clock``: seconds, the clock latencies are measured with.
    The other constants are documented with their defaults in
    docs/resources.md, "Adaptive limits".
    """

    def __init__(self, min_limit: int, max_limit: int, *,
                 errors: Tuple[Type[BaseException], ...] = (),
                 clock: Callable[[], float] = time.monotonic,
                 initial_limit: Optional[int] = None,
                 alpha: float = 3.0,
                 beta: float = 6.0,
                 drain: float = 0.5,
                 error_backoff: float = 0.7,
                 utilization: float = 0.9,
                 window_samples: int = 10,
                 probe_interval: float = 60.0,
                 probe_concurrency: int = 3,
                 probe_samples: int = 10,
                 quantile: float = 0.1,
                 ceiling_hold: float = 10.0) -> None:
        if not 1 <= min_limit <= max_limit:
            raise ConfigError(f"adaptive limit: need 1 <= min_limit <= limit, got "
                              f"min_limit = {min_limit}, limit = {max_limit}")
        if not 0.0 < alpha < beta:
            raise ConfigError(f"adaptive limit: need 0 < alpha < beta, got {alpha}, {beta}")
        for name, value in (("drain", drain), ("error_backoff", error_backoff),
                            ("utilization", utilization), ("quantile", quantile)):
            if not 0.0 < value <= 1.0:
                raise ConfigError(f"adaptive limit: {name} must be in (0, 1], got {value}")
        for name, number in (("window_samples", window_samples),
                             ("probe_concurrency", probe_concurrency),
                             ("probe_samples", probe_samples)):
            if number < 1:
                raise ConfigError(f"adaptive limit: {name} must be at least 1, got {number}")
        if not (probe_interval > 0.0 and math.isfinite(probe_interval)):
            raise ConfigError(f"adaptive limit: probe_interval must be > 0, got {probe_interval}")
        if not (ceiling_hold >= 0.0 and math.isfinite(ceiling_hold)):
            raise ConfigError(f"adaptive limit: ceiling_hold must be >= 0, got {ceiling_hold}")
        self.min_limit = min_limit
        self.max_limit = max_limit
        self.errors = tuple(errors)
        self.clock = clock
        self.alpha = alpha
        self.beta = beta
        self.drain = drain
        self.error_backoff = error_backoff
        self.utilization = utilization
        self.window_samples = window_samples
        self.probe_interval = probe_interval
        self.probe_concurrency = probe_concurrency
        self.probe_samples = probe_samples
        self.quantile = quantile
        self.ceiling_hold = ceiling_hold
        #: how many windows ended in each decision (grow, drain, hold, ceiling: held below
        #: the level of the last errors, unused: an
        #: unused limit does not grow, faster: a probe), and errors that cut, probes
        self.decisions: Counter[str] = Counter()
        #: the last window decided: (its latency, its median in_flight, the queue read from them)
        self.last_window: Tuple[float, float, float] = (0.0, 0.0, 0.0)

        start = DEFAULT_INITIAL if initial_limit is None else initial_limit
        #: the estimate, a float so that steps smaller than 1 add up
        self._estimate = self._clamp(float(start))
        #: median latency at low concurrency; None until the first probe ends
        self.rtt_noload: Optional[float] = None
        now = clock()
        # the window: successful samples of tasks that started after _window_start
        # (a task started at the very moment of a change ran beside the old limit)
        self._window_start = now
        self._window: List[Tuple[float, int, int]] = []   # (latency, in_flight, held)
        # once per window: an error cuts only if its task started after the last cut
        self._cut_at = -math.inf
        # the limit at the last cut for errors: held below it until _hold_until,
        # then growth is 1 a window near it (within alpha, either side)
        self._error_ceiling: Optional[float] = None
        self._hold_until = -math.inf
        # a probe begins at once: no latency is trusted before one was measured without load
        self._probe_start: Optional[float] = now
        self._probe: List[float] = []
        #: the worker's own delay in the last sample: the least and the most it can have been (see on_sample)
        self._lag = 0.0
        self._lag_high = 0.0
        self._next_probe = self._probe_due(now)
        self._probe_end = -math.inf     # when the last probe ended

    # -- reading ---------------------------------------------------------------------

    @property
    def limit(self) -> int:
        """The limit in force: the estimate, or the low probe level during a probe."""
        estimate = int(self._estimate)
        if self._probe_start is not None:
            return max(self.min_limit, min(estimate, self.probe_concurrency))
        return estimate

    @property
    def probing(self) -> bool:
        """True while the no-load latency is being measured (the limit is held low)."""
        return self._probe_start is not None

    # -- the one input ---------------------------------------------------------------

    def on_sample(self, latency: float, *, in_flight: int,
                  error: Optional[BaseException] = None, held: Optional[int] = None,
                  lag: float = 0.0, lag_high: Optional[float] = None) -> int:
        """A holder ended: ``latency`` seconds held, ``in_flight`` permits held
        when it started (itself included), ``error`` what it raised.  ``held``:
        the permits held, when they are more than ``in_flight`` (a resource
        pool's samples are connections out; its parked permits and holders
        between two queries use the limit too: the app-limited guard counts
        them).  ``lag``: how long, of ``latency``, the holder was ready to go
        on (its I/O had answered) but waited for the worker's own event loop
        (greenq/resources/lag.py; docs/resources.md, "The worker's own
        delays"), at least; ``lag_high``: at most (default ``lag``).  A
        CPU-bound worker's delay, not the downstream's queue: the probe takes
        the least off its samples (the no-load latency is not read too low),
        a window the most (a queue is read only where the latency proves
        one), down to ``LAG_FLOOR`` of the latency at most; a window's
        sample so corrected is never read below the no-load latency.
        Returns the limit in force afterwards."""
        try:
            lag = float(lag)
            self._lag = lag if lag > 0.0 and math.isfinite(lag) else 0.0
            high = self._lag if lag_high is None else float(lag_high)
            self._lag_high = max(self._lag, high) if math.isfinite(high) else self._lag
            self._sample(float(latency), int(in_flight), error,
                         int(in_flight) if held is None else max(int(held), int(in_flight)))
        except (ArithmeticError, ValueError, TypeError, OverflowError):
            pass        # a sample it cannot read changes nothing; the limit stays valid
        return self.limit

    def _sample(self, latency: float, in_flight: int,
                error: Optional[BaseException], held: int) -> None:
        now = float(self.clock())
        if not (math.isfinite(latency) and math.isfinite(now)) or latency < 0.0:
            return
        started = now - latency
        in_flight = max(1, in_flight)
        if error is not None:
            # once per window, as TCP cuts once per round trip: only a task that
            # started after the last cut, and at least one no-load latency after it
            # (a refused connect fails at once: its start says little)
            if isinstance(error, self.errors) and started > self._cut_at \
                    and now - self._cut_at >= (self.rtt_noload or 0.0):
                # the level that failed (a lower one when it failed again below it, during the hold)
                self._error_ceiling = (self._estimate if self._error_ceiling is None or now >= self._hold_until
                                       else min(self._error_ceiling, self._estimate))
                self._hold_until = now + self.ceiling_hold
                self.decisions["error"] += 1
                self._estimate = self._clamp(self._estimate * self.error_backoff)
                self._cut_at = now
                self._restart_window(now)
            return      # a failure's latency says nothing about the downstream's queue
        lag, lag_high = self._lag, self._lag_high
        if self._probe_start is not None:
            if lag > 0.0:
                latency = max(latency - lag, latency * LAG_FLOOR)
            self._probe_sample(now, started, latency)
            return
        if now >= self._next_probe:
            self._begin_probe(now)
            return
        if started <= self._window_start:
            return      # it started before the last change: it cannot judge that change
        noload = self.rtt_noload
        if lag_high > 0.0 and noload is not None and latency > noload:
            # the worker's own delay, not the downstream's queue: the most it can
            # have been (a queue is read only where the latency proves one).  Never
            # below the no-load latency: the lag may spare the limit a drain, it
            # never makes the downstream look faster (a probe)
            latency = max(latency - lag_high, noload, latency * LAG_FLOOR)
        self._window.append((latency, in_flight, held))
        if len(self._window) >= max(self.window_samples, int(self._estimate) // 2):
            self._decide(now)

    # -- the estimator ---------------------------------------------------------------

    def _decide(self, now: float) -> None:
        rtt = self._low([latency for latency, _, _ in self._window])
        used = max(held for _, _, held in self._window)
        in_flight = statistics.median(n for _, n, _ in self._window)
        noload = self.rtt_noload
        assert noload is not None       # a window opens only once a probe has ended
        if rtt < noload * FASTER:
            # the downstream got faster: measure its no-load latency now (this
            # window includes a queue, so it cannot serve as one), unless a probe
            # ended less than FASTER_PROBE_GAP x probe_interval ago: then take
            # this window's latency as the no-load one until the next probe (an
            # upper bound of it, TCP Vegas's BaseRTT), so that noise faster than
            # the last probe does not drop the limit to the probe's level again
            # and again (seen: 46 probes in 190 s at 5 ms, under a loaded CPU);
            # the probe comes when the gap is over, so a real change is measured
            self.decisions["faster"] += 1
            if now - self._probe_end >= FASTER_PROBE_GAP * self.probe_interval:
                self._begin_probe(now)
                return
            self.rtt_noload = rtt
            self._next_probe = min(self._next_probe,
                                   self._probe_end + FASTER_PROBE_GAP * self.probe_interval)
            self._restart_window(now)
            return
        capacity = in_flight * noload / rtt if rtt > 0.0 else float(in_flight)
        queue = in_flight - capacity
        self.last_window = (rtt, float(in_flight), queue)
        scale = self._log_scale()
        alpha, beta = self.alpha * scale, self.beta * scale
        if queue > beta:
            target = capacity + beta
            self.decisions["drain"] += 1
            if self._estimate > target:
                self._estimate = self._clamp(self._estimate - self.drain * (self._estimate - target))
        elif queue < alpha and used < self.utilization * int(self._estimate):
            self.decisions["unused"] += 1
        elif queue < alpha:
            # healthy and used: grow by alpha, the band's width, so one step never
            # jumps from "too few queued" past "too many".  Near the level at
            # which listed errors came last (a ceiling latency did not show):
            # below it (by 1) for ceiling_hold seconds, then by 1 a window
            # within alpha of it, either side; a full alpha above it without an
            # error, it is forgotten (the ceiling moved up)
            step = alpha
            ceiling = self._error_ceiling
            if ceiling is not None:
                if now < self._hold_until:
                    step = min(step, max(0.0, ceiling - 1.0 - self._estimate))
                elif self._estimate >= ceiling + alpha:
                    self._error_ceiling = None
                elif self._estimate + alpha > ceiling:
                    step = 1.0
            if step > 0.0:
                self.decisions["grow"] += 1
                self._estimate = self._clamp(self._estimate + step)
            else:
                self.decisions["ceiling"] += 1
        else:
            self.decisions["hold"] += 1
        self._restart_window(now)

    def _low(self, latencies: List[float]) -> float:
        """The ``quantile`` of ``latencies`` (nearest rank): a queue in the
        downstream delays every task, so it moves the low latencies as much as
        the median; what delays some tasks only (the worker's own CPU, a green
        thread scheduled late, a slow connect) moves the median, not them."""
        ordered = sorted(latencies)
        rank = max(1, math.ceil(self.quantile * len(ordered)))
        return ordered[min(rank, len(ordered)) - 1]

    def _log_scale(self) -> float:
        """alpha and beta grow with log10(limit) (as in Netflix's Vegas): a larger
        limit tolerates a few more queued, since the noise in its medians is larger."""
        return max(1.0, math.log10(max(self._estimate, 1.0)))

    def _restart_window(self, now: float) -> None:
        self._window_start = now
        self._window = []

    # -- the probe -------------------------------------------------------------------

    def _probe_due(self, now: float) -> float:
        """The next multiple of ``probe_interval`` on the clock: workers whose clocks
        agree (``time.time`` on synchronised hosts) probe at the same moment, so a
        shared downstream really drains."""
        return (math.floor(now / self.probe_interval) + 1.0) * self.probe_interval

    def _begin_probe(self, now: float) -> None:
        # (the error ceiling stays: a probe measures latency, not where errors come;
        # the hold ends on its own, and growth past the ceiling forgets it)
        self._probe_start = now
        self._probe = []
        self._restart_window(now)

    def _probe_sample(self, now: float, started: float, latency: float) -> None:
        assert self._probe_start is not None
        if started <= self._probe_start:
            return      # it ran beside the tasks of the full limit: not a no-load latency
        self._probe.append(latency)
        if len(self._probe) >= self.probe_samples:
            self.rtt_noload = self._low(self._probe)
            self._probe_start = None
            self._probe_end = now
            self._probe = []
            self._next_probe = self._probe_due(now)
            self._restart_window(now)

    def _clamp(self, value: float) -> float:
        if not math.isfinite(value):
            return float(self.min_limit)
        return min(float(self.max_limit), max(float(self.min_limit), value))

    def __repr__(self) -> str:
        return (f"<AdaptiveLimit limit={self.limit} [{self.min_limit}, {self.max_limit}]"
                f" rtt_noload={self.rtt_noload!r}{' probing' if self.probing else ''}>")


def resolve_errors(names: Sequence[str]) -> Tuple[Type[BaseException], ...]:
    """The exception classes named in ``errors``: builtins by name (``TimeoutError``),
    others by dotted path (``psycopg.OperationalError``, imported).  An unknown name
    is a :class:`ConfigError` that names it, with the nearest valid name if any."""
    found: List[Type[BaseException]] = []
    for raw in names:
        name = raw.strip().replace(":", ".")
        if not name:
            continue
        found.append(_resolve_one(name, raw))
    return tuple(found)


def _resolve_one(name: str, raw: str) -> Type[BaseException]:
    if "." not in name:
        builtin = getattr(builtins, name, None)
        if builtin is None:
            raise ConfigError(f"errors: unknown exception {raw!r}{_nearest(name, builtins)}"
                              " (name a builtin, or a class by its dotted path: "
                              "psycopg.OperationalError)")
        return _exception_class(builtin, raw)
    parts = name.split(".")
    # the longest importable prefix is the module; the rest are attributes (a nested class)
    for cut in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:cut])
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        value: object = module
        for attr in parts[cut:]:
            owner = value
            value = getattr(owner, attr, None)
            if value is None:
                raise ConfigError(f"errors: {raw!r}: {module_name!r} has no {attr!r}"
                                  f"{_nearest(attr, owner)}")
        return _exception_class(value, raw)
    raise ConfigError(f"errors: {raw!r}: cannot import module {parts[0]!r}")


def _exception_class(value: object, raw: str) -> Type[BaseException]:
    if isinstance(value, type) and issubclass(value, BaseException):
        return value
    raise ConfigError(f"errors: {raw!r} is not an exception class")


def _nearest(name: str, owner: object) -> str:
    candidates = [attr for attr in dir(owner)
                  if isinstance(getattr(owner, attr, None), type)
                  and issubclass(getattr(owner, attr), BaseException)]
    close = difflib.get_close_matches(name, candidates, n=1)
    return f"; did you mean {close[0]!r}?" if close else ""
