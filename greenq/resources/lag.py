"""How late the worker's event loop runs what is ready: the *loop lag*, an
adaptive limit's measure of the worker's own delays (greenq/resources/adaptive.py).

A CPU-bound green worker (hundreds of greenlets on one core shared with the
downstream and other work) resumes a task whose query has answered only once
every greenlet ready before it has run: every sample's latency then holds
that wait, and it grows with the tasks in flight, as a queue in the
downstream would.  Read as the downstream's queue it lowered the limit (the
PostgreSQL benchmark: 76 % of a fixed limit's throughput in one run, with
windows of 7 to 14 ms against a no-load latency of 5.5 ms).  So a green
thread of the worker sleeps ``TICK`` seconds again and again and keeps a
moving average of how much later than asked it woke up: a timer's green
thread waits for the ready ones like a task's does.  ``Resources.sample``
hands it to the adaptive limit with each sample, which takes it off the
latency.  The cost: one wake-up every ``TICK`` seconds, only in a worker
with an adaptive resource.
"""
from __future__ import annotations

import logging
import time
from typing import Any

log = logging.getLogger("greenq.resources")

#: seconds between two measures
TICK = 0.005
#: weight of the newest measure in the moving average (about the last 1 / SMOOTH measures: 50 ms)
SMOOTH = 0.1


class LoopLag:
    """The moving average of the loop's lag, measured by a green thread of ``driver``."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self.value = 0.0
        self._closed = False
        self.handle = driver.spawn(self._run)

    def _run(self) -> None:
        sleep, clock = self.driver.sleep, time.monotonic
        while not self._closed:
            began = clock()
            try:
                sleep(TICK)
            except Exception as exc:        # never let the measure take the worker down
                log.debug("loop lag: %s: %s", type(exc).__name__, exc)
                return
            late = clock() - began - TICK
            self.value += SMOOTH * (max(0.0, late) - self.value)

    def close(self) -> None:
        self._closed = True


__all__ = ["LoopLag", "SMOOTH", "TICK"]
