"""Malformed entries written straight into a real Redis events stream beside a
worker's batch: the reader skips them, never fatal (moved from
tests/unit/test_events.py, which needs no server; the reader's property tests
stay there)."""
from __future__ import annotations

import time

import pytest

from greenq import GreenQ
from greenq.control.client import Control
from greenq.events import TASK_EVENTS, encode_batch


@pytest.mark.redis
def test_malformed_entries_in_the_redis_event_stream_are_skipped(redis_url, redis_prefix):
    """Bodies written straight into the real stream beside a worker's batch:
    the reader yields the batch's events and skips the rest."""
    import redis
    app = GreenQ("evgarbage", broker=redis_url, key_prefix=redis_prefix)
    control = Control(app)
    client = redis.Redis.from_url(redis_url)
    try:
        control.transport.subscribe(0)
        stream = f"{redis_prefix}:events"
        good = encode_batch("w9", [["t-ok", "shop.add", 2, 1_700_000_000_000_000, 42]])
        for body in (b"\xff\xfe not json", b'{"v": 2, "e": "nope"}', b"[1, 2, [3]]", b"[" * 100000,
                     b'{"v": 2, "w": "w9", "e": ' + b"[" * 100000 + b"]" * 100000 + b"}",
                     b'{"v": 2, "w": "w9", "e": [["x", "y", 99, 1], [2], null, ["t-short", "n", 2, "late"], [7, "n", 2, 1]]}',
                     good.encode()):
            client.xadd(stream, {"e": body})
        client.xadd(stream, {"other": b"no e field"})
        found = []
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not any(e.get("uuid") == "t-ok" for e in found):
            found.extend(control.transport.events(0.5))
        ok = [e for e in found if e.get("uuid") == "t-ok"]
        assert ok == [{"type": "task-succeeded", "uuid": "t-ok", "name": "shop.add", "worker": "w9",
                       "timestamp": 1_700_000_000.0, "runtime": 4.2e-05}]
        assert all(isinstance(e, dict) and e.get("type") in TASK_EVENTS for e in found)
    finally:
        control.close()
        client.close()
