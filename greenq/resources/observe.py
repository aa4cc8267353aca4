"""Seeing the resources: what ``inspect stats``, ``/metrics``, the heartbeat
and the dashboard show per resource (docs/resources.md, "Seeing it").

Per resource, for one worker process: the limit in force (an adaptive limit
moves it), the configured limit, the scope, whether it is adaptive, the
permits this process holds, the tasks parked waiting for it here, and how
long the tasks that got their permits had waited (count, sum, max and a
histogram, since the worker started).

The wait is timed by the admission chain (greenq/worker/admission.py): from
the moment a task is parked at the permits step to the moment it got every
permit it names.  A task that got its permits at once never parked and is not
counted (its wait is 0; ``greenq_task_queue_wait_seconds`` has the time from
sent to start).  Tasks without resources never reach the permits step, so
they pay nothing.  ``with app.resource(...)`` blocks are not timed here: they
wait holding their runner slot, inside the task's run time.

Everything is read when asked (a scrape, a stats command, a heartbeat), never
on a task's path; the wait figures are updated once per parked task.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Dict, Hashable, List, Mapping, Optional, Tuple

if TYPE_CHECKING:  # pragma: no cover
    from .registry import Resources

#: seconds; a permit's wait, from a released permit away to a saturated downstream
WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0)
#: resources a heartbeat carries at most (the first by name): the heartbeat stays small
HEARTBEAT_RESOURCES = 32
#: the figures of a resource in a heartbeat (each a whole number), beside ``scope``
HEARTBEAT_FIELDS = ("limit", "configured_limit", "in_use", "waiting")


class WaitTimes:
    """How long the tasks that got permits of one resource had waited: count,
    sum, max and histogram counts (per ``WAIT_BUCKETS`` bound, not cumulative)."""

    __slots__ = ("count", "sum", "max", "buckets")

    def __init__(self) -> None:
        self.count = 0
        self.sum = 0.0
        self.max = 0.0
        self.buckets = [0] * (len(WAIT_BUCKETS) + 1)     # the last: above every bound

    def observe(self, seconds: float) -> None:
        if not seconds >= 0.0 or math.isinf(seconds):    # NaN, negative (a clock step): not a wait
            seconds = 0.0
        self.count += 1
        self.sum += seconds
        self.max = max(self.max, seconds)
        for index, bound in enumerate(WAIT_BUCKETS):
            if seconds <= bound:
                self.buckets[index] += 1
                return
        self.buckets[-1] += 1

    def cumulative(self) -> List[Tuple[str, int]]:
        """Prometheus's buckets: (``le``, the count at or below it), ``+Inf`` last."""
        out, total = [], 0
        for bound, n in zip(WAIT_BUCKETS, self.buckets):
            total += n
            out.append((repr(float(bound)), total))
        out.append(("+Inf", self.count))
        return out


def resource_stats(resources: Optional["Resources"], waiting: Mapping[Hashable, int],
                   waits: Mapping[str, WaitTimes]) -> Dict[str, Dict[str, Any]]:
    """The ``resources`` section of ``inspect stats``: one entry per
    configured resource, by name.  ``waiting``: the jobs parked per wait key
    (a sorted tuple of resource names: a job waiting for two resources counts
    for both); ``waits``: the wait figures per resource.  A resource no task
    used yet has no pool: its limit in force is the configured one, and no
    pool is made (or server reached) to ask."""
    if resources is None:
        return {}
    per_name: Dict[str, int] = {}
    for key, n in waiting.items():
        for name in key if isinstance(key, tuple) else (key,):
            per_name[name] = per_name.get(name, 0) + n
    out: Dict[str, Dict[str, Any]] = {}
    for name in sorted(resources.settings):
        settings = resources.settings[name]
        pool = resources.pools.get(name)
        times = waits.get(name) or WaitTimes()
        out[name] = {
            "limit": pool.limit if pool is not None else settings.limit,
            "configured_limit": settings.limit,
            "scope": settings.scope,
            "adaptive": settings.adaptive,
            "in_use": pool.in_use() if pool is not None else 0,
            "waiting": per_name.get(name, 0),
            "wait_count": times.count,
            "wait_seconds_sum": round(times.sum, 6),
            "wait_seconds_max": round(times.max, 6),
        }
    return out


def heartbeat_summary(stats: Mapping[str, Mapping[str, Any]]) -> Dict[str, Dict[str, Any]]:
    """The small part of ``stats`` a heartbeat carries: at most
    ``HEARTBEAT_RESOURCES`` resources, each its scope and ``HEARTBEAT_FIELDS``."""
    return {name: {"scope": entry["scope"], **{k: entry[k] for k in HEARTBEAT_FIELDS}}
            for name, entry in list(stats.items())[:HEARTBEAT_RESOURCES]}


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render_metrics(stats: Mapping[str, Mapping[str, Any]], waits: Mapping[str, WaitTimes]) -> str:
    """The resource metrics in Prometheus's text format (no prometheus_client
    needed): the three gauges and the wait histogram, labelled ``resource``."""
    if not stats:
        return ""
    lines: List[str] = []
    for metric, field, help_text in (
            ("greenq_resource_limit", "limit", "Permits of the resource that may be held at once (the limit in force)"),
            ("greenq_resource_in_use", "in_use", "Permits of the resource this worker holds"),
            ("greenq_resource_waiting", "waiting", "Tasks of this worker parked waiting for a permit")):
        lines += [f"# HELP {metric} {help_text}", f"# TYPE {metric} gauge"]
        lines += [f'{metric}{{resource="{_label(name)}"}} {entry[field]}' for name, entry in stats.items()]
    metric = "greenq_resource_wait_seconds"
    lines += [f"# HELP {metric} Seconds a task waited parked for its permits",
              f"# TYPE {metric} histogram"]
    for name in stats:
        times = waits.get(name) or WaitTimes()
        label = _label(name)
        lines += [f'{metric}_bucket{{resource="{label}",le="{le}"}} {n}' for le, n in times.cumulative()]
        lines += [f'{metric}_sum{{resource="{label}"}} {times.sum}',
                  f'{metric}_count{{resource="{label}"}} {times.count}']
    return "\n".join(lines) + "\n"
