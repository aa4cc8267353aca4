"""``task-sent`` events of a process that sends tasks, with ``[greenq]
task_send_sent_event = true`` (Celery's ``task_send_sent_event``): a web app,
a script, a scheduler.  A worker with ``-E`` does not need it: its own task
events carry what it sends (greenq/control/agent.py).

A send only appends the event's row to a bounded buffer; a daemon thread
(a greenlet once the process is monkey-patched) publishes what waits, half a
second after the first row, in one broker call per batch, on a control-plane
connection of its own.  The events of a process that exits are flushed at
exit.  A failed publish is logged (once a minute) and its rows are kept for
the next attempt, up to ``ROWS_MAX``; a send never fails or waits because of
its event.
"""
from __future__ import annotations

import atexit
import logging
import os
import socket
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Deque, List, Optional

from ..events import ROWS_MAX, sent_row
from ..exceptions import ConfigError
from .base import Transport, make_transport

if TYPE_CHECKING:  # pragma: no cover
    from ..app import GreenQ

log = logging.getLogger("greenq.control")

PERIOD = 0.5            # seconds from the first waiting row to its batch's publish
WARN_EVERY = 60.0       # seconds between two warnings of failed publishes


class SentPublisher:
    """``Codec.sent_sink`` of a client: buffers ``task-sent`` rows, publishes them in batches."""

    def __init__(self, app: "GreenQ") -> None:
        self.app = app
        self.rows: Deque[List[Any]] = deque(maxlen=ROWS_MAX)
        self._lock = threading.Lock()          # one flush at a time (the thread, or exit)
        self._wake = threading.Event()
        self._pid: Optional[int] = None        # the process the thread runs in (a fork needs its own)
        self._transport: Optional[Transport] = None
        self._warned = 0.0
        self._off = False                      # a broker without a control plane: said once, then quiet
        self.name = ""

    def __call__(self, msg: Any) -> None:
        if self._off:
            return
        self.rows.append(sent_row(msg))
        if self._pid != os.getpid():
            self._start()
        self._wake.set()

    def _start(self) -> None:
        with self._lock:
            if self._pid == os.getpid():
                return
            first = self._pid is None
            self._pid = os.getpid()
            self.name = f"{socket.gethostname()}.{self._pid}"
            self._transport = None             # a forked child must not share its parent's socket
            self._wake = threading.Event()
            threading.Thread(target=self._loop, name="greenq-sent-events", daemon=True).start()
        if first:
            atexit.register(self.flush)

    def _loop(self) -> None:
        wake = self._wake
        while True:
            wake.wait()
            time.sleep(PERIOD)                 # gather what the next half second sends
            wake.clear()
            self.flush()

    def flush(self) -> None:
        """Publish every waiting row now (also at exit)."""
        with self._lock:
            rows: List[Any] = []
            while True:                        # one row at a time: senders append meanwhile
                try:
                    rows.append(self.rows.popleft())
                except IndexError:
                    break
            if not rows:
                return
            try:
                if self._transport is None:
                    self._transport = make_transport(self.app.config.broker_url, self.app.config, None)
            except ConfigError as exc:
                self._off = True
                log.warning("task-sent events off: %s", exc)
                return
            except Exception as exc:
                self.rows.extendleft(reversed(rows))
                self._failed(exc)
                return
            try:
                self._transport.publish_rows(self.name, rows, self.rows)
            except Exception as exc:           # the rows not sent are back in self.rows
                self._transport.reset()
                self._failed(exc)

    def _failed(self, exc: Exception) -> None:
        now = time.monotonic()
        if now - self._warned >= WARN_EVERY:
            self._warned = now
            log.warning("task-sent events: could not publish %d (%s); kept for the next try",
                        len(self.rows), exc)
