"""The autoscaling gauges' text and the cache that keeps /metrics cheap for
the broker (greenq/metrics.py QueueSignals, render_queue_signals)."""
from __future__ import annotations

import time

from greenq.brokers.base import QueueStats
from greenq.metrics import QUEUE_SIGNALS, QueueSignals, render_queue_signals


class CountingBroker:
    def __init__(self, rows):
        self.rows, self.calls = rows, []

    def queue_stats(self, queues=None):
        self.calls.append(queues)
        if isinstance(self.rows, Exception):
            raise self.rows
        return self.rows


def test_the_gauges_one_sample_per_queue_and_no_age_where_unknown():
    text = render_queue_signals([QueueStats("a", ready=3, delayed=1, held=2, oldest_ready_age=12.3456),
                                 QueueStats('b"\\\n', ready=1, oldest_ready_age=None)])
    lines = text.splitlines()
    for metric, _, _ in QUEUE_SIGNALS:
        assert f"# TYPE {metric} gauge" in lines
    assert 'greenq_queue_ready{queue="a"} 3' in lines
    assert 'greenq_queue_held{queue="a"} 2' in lines
    assert 'greenq_queue_delayed{queue="a"} 1' in lines
    assert 'greenq_queue_oldest_ready_age_seconds{queue="a"} 12.346' in lines
    assert 'greenq_queue_ready{queue="b\\"\\\\\\n"} 1' in lines          # escaped as the text format says
    assert not [line for line in lines if line.startswith('greenq_queue_oldest_ready_age_seconds{queue="b')]
    assert render_queue_signals([]) == "" and render_queue_signals(None) == ""


def test_the_broker_is_asked_once_per_cache_period():
    broker = CountingBroker([QueueStats("a", ready=1, oldest_ready_age=0.5)])
    signals = QueueSignals(cache=60)
    first = signals.read(lambda: broker.queue_stats(["a"]))
    assert signals.read(lambda: broker.queue_stats(["a"])) is first and broker.calls == [["a"]]
    fresh = QueueSignals(cache=0)
    fresh.read(lambda: broker.queue_stats(["a"]))
    fresh.read(lambda: broker.queue_stats(["a"]))
    assert len(broker.calls) == 3


def test_a_broker_away_gives_no_figures_and_is_asked_again_later():
    broker = CountingBroker(ConnectionError("down"))
    signals = QueueSignals(cache=0)
    assert signals.read(broker.queue_stats) is None
    broker.rows = [QueueStats("a")]
    assert [q.name for q in signals.read(broker.queue_stats)] == ["a"]


def test_read_within_never_waits_past_its_budget_for_a_slow_broker():
    """A worker's /metrics answers within its budget while the broker is slow:
    the first read gives nothing, later reads the last answer, and one refresh
    runs at a time."""
    import threading
    release, calls = threading.Event(), []

    def figures():
        calls.append(1)
        release.wait(10)
        return [QueueStats("a", ready=len(calls))]

    def spawn(fn, *args):
        threading.Thread(target=fn, args=args, daemon=True).start()

    signals = QueueSignals(cache=0.0)
    start = time.monotonic()
    assert signals.read_within(figures, spawn, wait=0.1) is None       # nothing yet, and no long wait
    assert signals.read_within(figures, spawn, wait=0.1) is None
    assert time.monotonic() - start < 5
    assert len(calls) == 1                                             # one refresh under way, not two
    release.set()
    deadline = time.monotonic() + 5
    while signals._refresh is not None and time.monotonic() < deadline:
        time.sleep(0.01)
    got = signals.read_within(figures, spawn, wait=5)                  # stale (cache 0): a new refresh, answered
    assert got is not None and got[0].ready == 2, got
