"""The autoscaling gauges' text and the cache that keeps /metrics cheap for
the broker (greenq/metrics.py QueueSignals, render_queue_signals)."""
from __future__ import annotations

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
