"""Stop signals, for a worker and for the ``--processes`` supervisor.

SIGTERM and SIGINT ask for a warm shutdown, SIGQUIT for a cold one, and a
second SIGTERM/SIGINT for a cold one too (CONTRACT.md section 2).  But one
stop often reaches a supervised child more than once: systemd's default
``KillMode=control-group`` signals every process of the service, a
terminal's Ctrl-C signals the whole foreground process group, and the
supervisor forwards the stop as well.  Taken literally, the second copy
would turn every deploy into a cold shutdown that abandons running tasks.

So a stop is counted once:

* copies of SIGTERM/SIGINT that arrive within ``STOP_SIGNAL_WINDOW`` seconds
  of the first are that same stop (one INFO line says so); one that comes
  later is the operator's second signal: cold shutdown.  SIGQUIT is always
  cold at once.
* a supervised child writes the stop it received (``1`` warm, ``2`` cold)
  to a notice file beside its heartbeat file; the supervisor waits
  ``FORWARD_GRACE`` seconds after its own signal and forwards the stop only
  to the children whose notice does not show it already, so a child in the
  signalled group is not signalled again.
* the supervisor's own request (a child past ``max_memory_per_child``) is a
  SIGTERM announced by an "ask" file beside the heartbeat file: the child
  stops warm and does not count it as an operator's first signal, so a
  deploy's SIGTERM that reaches it later is not taken as a second one.

The handlers only set flags and write one small file (no locks are taken).
"""
from __future__ import annotations

import logging
import os
import signal
import time
from typing import Any, Callable, Optional

log = logging.getLogger("greenq.worker")

#: seconds after a first SIGTERM/SIGINT within which more copies are the same stop
STOP_SIGNAL_WINDOW = 2.0
#: seconds the supervisor waits for its children to show they have the stop before forwarding it
FORWARD_GRACE = 0.3
WARM, COLD = 1, 2


def notice_path(heartbeat: str) -> str:
    """The file where the child whose heartbeat file is ``heartbeat`` writes the stop it received."""
    return heartbeat + ".stop"


def ask_path(heartbeat: str) -> str:
    """The file that marks the next SIGTERM as the supervisor's own request."""
    return heartbeat + ".ask"


def ask_to_stop(proc: Any, heartbeat: str) -> None:
    """The supervisor asks the child ``proc`` to stop warm for its own reasons
    (without the ask file the child takes the SIGTERM as an operator's: still warm)."""
    try:
        with open(ask_path(heartbeat), "w"):
            pass
    except OSError:
        pass
    proc.send_signal(signal.SIGTERM)


def read_notice(heartbeat: str) -> int:
    """The stop a child wrote (0 none, WARM, COLD)."""
    try:
        with open(notice_path(heartbeat)) as fh:
            return int(fh.read().strip() or 0)
    except (OSError, ValueError):
        return 0


class StopSignals:
    """Installs SIGTERM/SIGINT/SIGQUIT and turns what arrives into calls of
    ``stop(cold)``: one warm call for the operator's stop however many copies
    of it arrive (and one for the supervisor's own request), then at most one
    cold call."""

    def __init__(self, stop: Callable[[bool], None], heartbeat: Optional[str] = None,
                 window: float = STOP_SIGNAL_WINDOW) -> None:
        """``heartbeat``: a supervised child's heartbeat file; the notice goes beside it."""
        self.stop = stop
        self.notice = notice_path(heartbeat) if heartbeat else None
        self.ask = ask_path(heartbeat) if heartbeat else None
        self.window = window
        self.level = 0
        self.first_at: Optional[float] = None

    def install(self, driver: Any) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            driver.install_signal(signum, self.received)
        driver.install_signal(signal.SIGQUIT, lambda: self.received(cold=True))

    def received(self, cold: bool = False) -> None:
        """One stop signal arrived (``cold``: SIGQUIT)."""
        now = time.monotonic()
        if self.level >= COLD:
            return
        if not cold and self.level == 0 and self._asked():
            self.stop(False)               # the supervisor's request: not the operator's first signal
            return
        if not cold and self.first_at is not None:
            if now - self.first_at < self.window:
                _log(logging.INFO, "stop signal repeated %.2f s after the first: the same stop (a second "
                     "one later than %.0f s after the first is a cold shutdown)", now - self.first_at, self.window)
                return
            cold = True
        if self.first_at is None:
            self.first_at = now
        self.level = COLD if cold else WARM
        self._write_notice()
        self.stop(cold)

    def _asked(self) -> bool:
        """Whether the supervisor asked for this stop (its ask file, taken once)."""
        if self.ask is None:
            return False
        try:
            os.unlink(self.ask)
            return True
        except OSError:
            return False

    def _write_notice(self) -> None:
        if self.notice is None:
            return
        try:
            tmp = f"{self.notice}.tmp"
            with open(tmp, "w") as fh:
                fh.write(str(self.level))
            os.replace(tmp, self.notice)
        except OSError:                   # the supervisor then forwards the stop; our window takes it
            pass


def _log(level: int, message: str, *args: Any) -> None:
    """Log from a signal handler: a line written while this thread was
    already writing one raises "reentrant call"; losing the line is fine."""
    try:
        log.log(level, message, *args)
    except Exception:  # noqa: S110
        pass
