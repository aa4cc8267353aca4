"""Every reader of heartbeats and task events is total (issue 17, items 8, 9,
16, 17, 19): whatever JSON lands on the events stream, greenq.events.decode_batch,
the dashboard's FleetState and the lines ``greenq events`` prints never raise;
a bad event is skipped and a bad field dropped, both counted; the worker list
is bounded and forgets silent workers; terminal output has no control
characters; a failure event's traceback is trimmed."""
from __future__ import annotations

import json
import math
import time
from types import SimpleNamespace as NS

import pytest

from greenq.cli.inspect import event_lines, printable
from greenq.dashboard.state import FORGET_AFTER, WORKERS_KEPT, EventReader, FleetState
from greenq.events import (FIELD_CHECKS, NAME_MAX, TASK_EVENTS, TRACEBACK_MAX, WORKER_EVENTS, Tally, TaskEvents,
                           clean, decode_batch, encode_batch, trim_traceback)

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

ODD_NUMBERS = [10 ** 400, -(10 ** 400), 2 ** 64, -1, 1e308, -0.0, float("nan"), float("inf"), float("-inf")]
scalars = (st.none() | st.booleans() | st.integers() | st.sampled_from(ODD_NUMBERS)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20)
           | st.text(alphabet="\x1b[]0123456789;m\r\n\x00\u202e\ud800a", max_size=12))
json_values = st.recursive(scalars, lambda children: st.lists(children, max_size=5)
                           | st.dictionaries(st.sampled_from(sorted(FIELD_CHECKS)) | st.text(max_size=5),
                                             children, max_size=5), max_leaves=25)
#: an event of a known type whose every documented field may hold anything
known_events = st.builds(lambda kind, fields: dict(fields, type=kind),
                         st.sampled_from(TASK_EVENTS + WORKER_EVENTS + ("worker-", "task-x")),
                         st.dictionaries(st.sampled_from(sorted(FIELD_CHECKS)), json_values, max_size=8))
events = known_events | json_values
DEEP = [[[[[]]]]]
for _ in range(5000):
    DEEP = [DEEP]


def _body(value) -> str:
    return json.dumps(value, allow_nan=True).replace("1e+400", "1e400")


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.lists(events, max_size=6),
                 st.lists(events | st.lists(json_values, max_size=12), max_size=6).map(
                     lambda e: {"v": 2, "w": "w", "e": e}),
                 json_values))
def test_decode_batch_never_raises(value):
    for event in decode_batch(_body(value)):
        assert isinstance(event, dict) and isinstance(event["type"], str)


def test_decode_batch_a_time_too_large_for_a_float_is_left_out():
    body = '{"v": 2, "w": "w", "e": [["t1", "n", 2, %d, 5], ["t2", "n", 2, 1000000, 1]]}' % (10 ** 400)
    assert decode_batch(body) == [{"type": "task-succeeded", "uuid": "t1", "name": "n", "worker": "w",
                                   "runtime": 5e-06},
                                  {"type": "task-succeeded", "uuid": "t2", "name": "n", "worker": "w",
                                   "timestamp": 1.0, "runtime": 1e-06}]


def _check_clean(event) -> None:
    """What clean keeps has the documented types only."""
    for key, value in event.items():
        if key == "type":
            assert value in TASK_EVENTS + WORKER_EVENTS
        elif key in ("worker", "uuid", "name", "queue", "hostname", "pool", "version", "boot"):
            assert isinstance(value, str) and value.isprintable() and 0 < len(value) <= NAME_MAX
        elif key == "queues":
            assert isinstance(value, list) and all(isinstance(q, str) and q.isprintable() for q in value)
        elif key in ("stopping", "events"):
            assert type(value) is bool
        elif key in ("args", "kwargs", "exception", "reason", "traceback"):
            assert isinstance(value, str)
        else:
            assert type(value) in (int, float) and math.isfinite(value) and value >= 0, (key, value)


@settings(max_examples=200, deadline=None)
@given(st.lists(events, max_size=8))
def test_fleet_state_takes_any_events(batch):
    state = FleetState(clock=lambda: 1000.0)
    tally = Tally()
    for event in batch:
        kept = clean(event, tally)
        if kept is not None:
            _check_clean(kept)
    state.apply(batch)
    state.apply(batch)                                    # the same worker twice: counters subtracted
    state.apply("not a list")
    views = [state.worker_list(), state.task_list(), state.failure_list(), state.throughput(), state.stats()]
    json.dumps(views, allow_nan=False)                    # what the page gets is valid JSON
    assert state.stats()["events_read"] == 2 * len(batch)
    for w in views[0]:
        assert w["queues"] is None or all(isinstance(q, str) for q in w["queues"])


@settings(max_examples=200, deadline=None)
@given(st.lists(events, max_size=8), st.booleans())
def test_greenq_events_lines_are_printable(batch, as_json):
    tally = Tally()
    for line in event_lines(batch, tally, as_json=as_json):
        assert line.isprintable() and "\x1b" not in line
    assert tally.read == len(batch)


def test_a_heartbeat_with_fields_of_the_wrong_type_keeps_the_worker():
    """Item 8 and 9: "succeeded": "many", 1e400, a list, "queues": "default"
    used to raise out of apply (the reader then re-read the batch for ever)."""
    now = [1000.0]
    state = FleetState(clock=lambda: now[0])
    good = {"type": "worker-heartbeat", "worker": "w1", "boot": "b", "timestamp": 1000.0, "succeeded": 5,
            "failed": 0, "queues": ["default"], "pool": "gevent"}
    forged = json.loads('{"type": "worker-heartbeat", "worker": "w2", "boot": "b", "timestamp": 1000.0, '
                        '"succeeded": "many", "failed": 1e400, "running": [1], "queues": "default", '
                        '"rss": -5, "pid": true}')
    state.apply([good, forged, {"type": "worker-heartbeat", "worker": ["w3"]}, 7])
    state.apply([dict(good, timestamp=1002.0, succeeded=9), dict(forged, timestamp=1002.0)])
    workers = {w["name"]: w for w in state.worker_list()}
    assert workers["w1"]["online"] and workers["w1"]["queues"] == ["default"]
    assert workers["w2"]["online"] and workers["w2"]["queues"] is None and workers["w2"]["succeeded"] is None
    assert sum(p["succeeded"] for p in state.throughput()) == 4
    stats = state.stats()
    assert stats["events_skipped"] == 2 and stats["fields_dropped"] == 12 and stats["events_read"] == 6


def test_the_worker_list_is_bounded_and_forgets_silent_workers():
    """Item 16: 100,000 forged names are held as at most WORKERS_KEPT, the
    oldest heard dropped first, in bounded time; a live worker comes back on
    its next heartbeat; a worker silent for FORGET_AFTER is forgotten."""
    now = [1000.0]
    state = FleetState(clock=lambda: now[0])
    state.apply([{"type": "worker-heartbeat", "worker": "real", "timestamp": 1000.0}])
    started = time.monotonic()
    for i in range(100):
        state.apply([{"type": "worker-heartbeat", "worker": f"forged-{i}-{j}", "timestamp": 1000.0,
                      "queues": ["q" * NAME_MAX] * 64} for j in range(1000)])
    assert time.monotonic() - started < 20
    assert len(state.worker_list()) == WORKERS_KEPT
    assert len(json.dumps(state.worker_list())) < 20 * 1024 * 1024
    assert "real" not in {w["name"] for w in state.worker_list()}
    state.apply([{"type": "worker-heartbeat", "worker": "real", "timestamp": 1001.0}])
    assert "real" in {w["name"] for w in state.worker_list()}
    assert state.stats()["workers_forgotten"] == 100000 + 1 - WORKERS_KEPT + 1     # (real, twice)
    now[0] += FORGET_AFTER + 1
    assert state.worker_list() == [] and state.stats()["workers"] == 0


def test_a_batch_that_fails_to_apply_is_passed_over():
    """The reader applies each batch once: a batch that raises is counted
    and logged, and the next batch is read (no reconnection, no re-read)."""
    class Exploding(FleetState):
        def apply(self, events):
            if events == ["boom"]:
                raise RuntimeError("a bug")
            super().apply(events)
    state = Exploding()
    reader = EventReader(NS(), state)
    reader._apply(["boom"])
    reader._apply([{"type": "worker-online", "worker": "w1", "timestamp": time.time()}])
    assert state.batches_failed == 1 and [w["name"] for w in state.worker_list()] == ["w1"]


def test_greenq_events_escapes_control_characters():
    """Item 19: a worker named with ANSI escapes, an exception with \\r."""
    tally = Tally()
    lines = event_lines([{"type": "task-failed", "uuid": "t1", "worker": "w1", "name": "n", "timestamp": 1.0,
                          "exception": "E: \x1b[2J\rgone\n\u202e"},
                         {"type": "worker-heartbeat", "worker": "evil\x1b[31m", "timestamp": 1.0},
                         {"type": "worker-heartbeat", "worker": "w1", "rss": "lots", "timestamp": 1.0}], tally)
    assert len(lines) == 2 and "E: \\x1b[2J\\rgone\\n\\u202e" in lines[0]
    assert all(line.isprintable() for line in lines)
    assert (tally.skipped, tally.dropped) == (1, 1)
    assert printable("a\x9bb\x07") == "a\\x9bb\\x07"


def test_failure_events_carry_a_trimmed_traceback():
    """Item 17: the traceback (which repeats the message) is cut to its last
    TRACEBACK_MAX characters, after a line that says so."""
    ev = TaskEvents()
    huge = "Traceback (most recent call last):\n" + "  frame\n" * 100000 + "ValueError: " + "x" * 5000
    ev._failure(NS(name="t.fail"), NS(id="t1"), ValueError("x" * 5000), huge)
    [event] = decode_batch(encode_batch("w1", list(ev.take())))
    tb = event["traceback"]
    assert tb.startswith(f"... ({len(huge) - TRACEBACK_MAX} characters cut)\n") and tb.endswith("x" * 100)
    assert len(tb) < TRACEBACK_MAX + 100 and len(event["exception"]) <= 220
    assert trim_traceback("short") == "short" and trim_traceback(None) is None


def test_a_deep_value_is_dropped_not_recursed():
    state = FleetState(clock=lambda: 1.0)
    state.apply([{"type": "worker-heartbeat", "worker": "w1", "queues": DEEP, "running": DEEP}])
    assert state.worker_list()[0]["queues"] is None and state.stats()["fields_dropped"] == 2
