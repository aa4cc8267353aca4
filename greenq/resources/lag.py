"""How late the worker's event loop resumes a green thread whose socket has
become readable: the *loop lag*, an adaptive limit's measure of the worker's
own delays (greenq/resources/adaptive.py).

A CPU-bound green worker (hundreds of greenlets on one core shared with the
downstream and other work) resumes a task whose query has answered only once
every greenlet ready before it has run: every sample's latency then holds
that wait, and it grows with the tasks in flight, as a queue in the
downstream would.  Read as the downstream's queue it lowered the limit (the
PostgreSQL benchmark: 76 % of a fixed limit's throughput in one run, with
windows of 7 to 14 ms against a no-load latency of 5.5 ms).  So the worker
measures that wait the way a query meets it: every ``TICK`` seconds one
green thread writes a byte into a socket pair and another, blocked reading
the other end, notes how long after the write it was resumed; the moving
average of those waits is the lag.  It is not exactly the wait a task
meets (in the PostgreSQL benchmark it read 4 ms and more during probes
whose queries took 5.6 ms in all; a timer's overshoot read as much), so
the adaptive limit uses only how much it grew.  ``Resources.sample`` hands the lag to the
adaptive limit with each sample, which takes what it grew since the
last probe off the latency.  The cost:
one byte through a socket pair every ``TICK`` seconds, only in a worker with
an adaptive resource.
"""
from __future__ import annotations

import logging
import socket
import time
from typing import Any

log = logging.getLogger("greenq.resources")

#: seconds between two measures
TICK = 0.005
#: weight of the newest measure in the moving average (about the last 1 / SMOOTH measures: 50 ms)
SMOOTH = 0.1


class LoopLag:
    """The moving average of the loop's lag, measured by two green threads of ``driver``."""

    def __init__(self, driver: Any) -> None:
        self.driver = driver
        self.value = 0.0
        #: measures taken
        self.count = 0
        self._closed = False
        self._sent = 0.0
        # looked up now, not at import: the driver has patched the socket module by then
        self._reader, self._writer = socket.socketpair()
        self.handle = driver.spawn(self._read)
        self._writing = driver.spawn(self._write)

    def _write(self) -> None:
        sleep = self.driver.sleep
        while not self._closed:
            try:
                sleep(TICK)
                self._sent = time.monotonic()
                self._writer.send(b"x")
            except Exception as exc:        # never let the measure take the worker down
                log.debug("loop lag: %s: %s", type(exc).__name__, exc)
                return

    def _read(self) -> None:
        while not self._closed:
            try:
                if not self._reader.recv(64):
                    return
            except Exception as exc:
                log.debug("loop lag: %s: %s", type(exc).__name__, exc)
                return
            late = time.monotonic() - self._sent
            self.value += SMOOTH * (max(0.0, late) - self.value)
            self.count += 1

    def close(self) -> None:
        self._closed = True
        for sock in (self._writer, self._reader):
            try:
                sock.close()
            except OSError:
                pass


__all__ = ["LoopLag", "SMOOTH", "TICK"]
