"""The worker holds at most ``prefetch`` messages and at most ``prefetch_bytes``
of their bodies (issue 17, item 14)."""
from __future__ import annotations

import time

from greenq import GreenQ
from greenq.config import load
from greenq.drivers import get_driver
import pytest

from greenq.config import MAX_PREFETCH_BYTES
from greenq.exceptions import ConfigError
from greenq.worker.consumer import Worker, effective_prefetch_bytes


def test_prefetch_bytes_default_setting_and_ceiling():
    assert effective_prefetch_bytes(load(search=False, env={})) == 8 * (1048576 + 65536)
    small = load(search=False, env={"GREENQ_MAX_MESSAGE_SIZE": "1000"})
    assert effective_prefetch_bytes(small) == 8 * (1000 + 65536)
    set_ = load(search=False, env={"GREENQ_WORKER_PREFETCH_BYTES": "123456"})
    assert effective_prefetch_bytes(set_) == 123456
    assert effective_prefetch_bytes(load(search=False, env={
        "GREENQ_WORKER_PREFETCH_BYTES": str(MAX_PREFETCH_BYTES)})) == MAX_PREFETCH_BYTES
    with pytest.raises(ConfigError, match="prefetch_bytes.*above the ceiling"):
        load(search=False, env={"GREENQ_WORKER_PREFETCH_BYTES": str(MAX_PREFETCH_BYTES + 1)})


def test_the_worker_holds_no_more_bytes_than_its_budget(tmp_path):
    """20 tasks of 40 KB, prefetch 10, a budget of 200,000 bytes: the worker
    never holds more than that (ten messages, 400 KB, without the budget)."""
    app = GreenQ("t", broker=f"sqlite:///{tmp_path}/broker.sqlite3", max_message_size=50_000)

    @app.task
    def slow(pad):
        time.sleep(0.01)
        return len(pad)
    results = [slow.delay("p" * 40_000) for _ in range(20)]
    worker = Worker(app, get_driver("threads"), queues=["default"], concurrency=2, prefetch=10,
                    burst=True, fetch_timeout=0.1)
    worker.prefetch_bytes = 200_000
    seen = []
    accept = worker._accept

    def counting(deliveries):
        accept(deliveries)
        seen.append((len(worker.held), worker.held_bytes))
    worker._accept = counting
    assert worker.run() == 0
    assert [r.get(timeout=5) for r in results] == [40_000] * 20
    assert 2 <= max(held for held, _ in seen) < 10, seen
    assert max(size for _, size in seen) <= 200_000, seen
    assert worker.held_bytes == 0


def test_the_amqp_reader_keeps_only_a_preview_of_a_body_over_its_limit():
    """The content header says how long the body is: of one over the limit
    only the first ``preview`` bytes are kept, whatever the frames; the
    deliveries around it are read whole."""
    from greenq.transports.amqp.wire import DeliveryReader, FrameParser
    from tests.unit.transport_amqp.test_amqp_wire import deliver, raw
    big = bytes(i % 251 for i in range(100_000))
    frames = (deliver(1, "greenq-1", 1, b"small") + deliver(1, "greenq-1", 2, big)
              + deliver(1, "greenq-1", 3, b"x" * 1000))
    reader = DeliveryReader(1, {"greenq-1": "q1"}, limit=1000, preview=300)
    parser = FrameParser(raw(frames))
    got = []
    for frame in iter(parser.next_frame, None):
        result = reader.frame(frame)
        if result is not None:
            assert sum(map(len, result.chunks)) == result.keep     # nothing past the preview kept
            got.append(result)
    assert [(c.delivery_tag, c.truncated, c.size, c.body) for c in got] == [
        (1, False, 5, b"small"), (2, True, 100_000, big[:300]), (3, False, 1000, b"x" * 1000)]
