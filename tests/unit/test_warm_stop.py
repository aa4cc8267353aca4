"""Stop signals counted once (greenq/worker/signals.py; issue 18, item 1)."""
from __future__ import annotations

import os
import signal

from greenq.drivers import get_driver
from greenq.worker.signals import COLD, WARM, StopSignals, ask_path, read_notice


def _signals(tmp_path, window=60.0):
    calls = []
    heartbeat = str(tmp_path / "child-0")
    return StopSignals(calls.append, heartbeat=heartbeat, window=window), calls, heartbeat


def test_copies_within_the_window_are_one_warm_stop(tmp_path):
    stops, calls, heartbeat = _signals(tmp_path)
    assert read_notice(heartbeat) == 0
    for _ in range(3):                   # the group's SIGTERM, the supervisor's, a Ctrl-C's SIGINT
        stops.received()
    assert calls == [False]
    assert read_notice(heartbeat) == WARM


def test_a_signal_after_the_window_is_cold(tmp_path):
    stops, calls, heartbeat = _signals(tmp_path, window=0.0)
    stops.received()
    stops.received()
    stops.received()                     # nothing after cold
    assert calls == [False, True]
    assert read_notice(heartbeat) == COLD


def test_sigquit_is_cold_at_once_even_within_the_window(tmp_path):
    stops, calls, heartbeat = _signals(tmp_path)
    stops.received()
    stops.received(cold=True)
    assert calls == [False, True]
    assert read_notice(heartbeat) == COLD


def test_the_supervisors_own_request_is_not_the_operators_first_signal(tmp_path):
    """A child asked to stop for its memory, then reached by a deploy's
    SIGTERM long after: still warm; only a signal after that one is cold."""
    stops, calls, heartbeat = _signals(tmp_path, window=0.0)
    open(ask_path(heartbeat), "w").close()      # what ask_to_stop writes before its SIGTERM
    stops.received()
    assert calls == [False] and read_notice(heartbeat) == 0
    stops.received()                            # the deploy's stop: its first signal
    assert calls == [False, False] and read_notice(heartbeat) == WARM
    stops.received()
    assert calls == [False, False, True]


def test_real_signals_reach_the_handler(tmp_path):
    """Installed through a driver, SIGTERM and SIGINT sent to this process
    twice make one warm stop."""
    stops, calls, _ = _signals(tmp_path)
    old = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)}
    try:
        stops.install(get_driver("threads"))
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        assert calls == [False]
    finally:
        for signum, handler in old.items():
            signal.signal(signum, handler)
