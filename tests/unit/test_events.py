"""Task events on the wire (greenq/events.py): every event type survives
encode and decode with its documented fields, an older worker's body is still
read, and whatever else lands on the events stream is skipped, never fatal to
a reader (written straight into a real Redis stream:
tests/integration/transport_redis/test_redis_events_malformed.py)."""
from __future__ import annotations

import json
import math
import time
import uuid
from collections import deque
from types import SimpleNamespace as NS

import pytest

from greenq import GreenQ
from greenq.control.client import Control
from greenq.events import (MICROSECOND_FIELDS, ROW_FIELDS, TASK_EVENTS, TaskEvents, decode_batch,
                           encode_batch)

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


def _job(task_id: str, **msg):
    fields = dict(id=task_id, task="shop.add", args=(), kwargs={}, created=None, eta=None, retries=0)
    fields.update(msg)
    m = NS(**fields)
    return NS(msg=m, id=task_id, delivery=NS(queue="q1"), reason="revoked")


def _emit_all(ev: TaskEvents, task, sent: float, take_between: bool):
    """Every kind of event; ``take_between``: the batch is taken after each
    step, so no task's events share a row."""
    batches = []

    def step(fn, *args):
        fn(*args)
        if take_between:
            batches.append(list(ev.take()))

    plain, busy = _job("t1", created=sent), _job("t2", created=sent, args=(1, "x" * 500), kwargs={"k": 1},
                                                  retries=2, eta=sent + 1.0)
    step(ev._received, plain)
    step(ev._received, busy)
    step(ev._prerun, task, NS(id="t1"))
    step(ev._success, task, NS(id="t1"), 3)
    step(ev._prerun, task, NS(id="t2"))
    step(ev._failure, task, NS(id="t2"), KeyError("k"), "Traceback (most recent call last): ...")
    step(ev._retry, task, NS(id="t3"), "later")
    step(ev._revoked, _job("t4"))
    step(ev._dead, NS(id="t5", msg=None), "not JSON")
    batches.append(list(ev.take()))
    return batches


@pytest.mark.parametrize("take_between", [False, True], ids=["one-batch", "a-batch-each"])
def test_every_task_event_round_trips_with_its_fields(take_between):
    ev = TaskEvents()
    task, sent = NS(name="shop.add"), time.time() - 2.0
    batches = _emit_all(ev, task, sent, take_between)
    events = [e for rows in batches for e in decode_batch(encode_batch("w1", rows))]
    by_task = {}
    for e in events:
        by_task.setdefault(e["uuid"], []).append(e["type"])
    assert by_task == {"t1": ["task-received", "task-started", "task-succeeded"],
                       "t2": ["task-received", "task-started", "task-failed"],
                       "t3": ["task-retried"], "t4": ["task-revoked"], "t5": ["task-dead-lettered"]}
    if not take_between:      # one row per task: its id and name written once
        assert [row[0] for row in batches[0]] == ["t1", "t2", "t3", "t4", "t5"]
    assert all(e["worker"] == "w1" and abs(e["timestamp"] - time.time()) < 60 for e in events)
    get = {(e["uuid"], e["type"]): e for e in events}.__getitem__
    received = get(("t1", "task-received"))
    assert set(received) == {"type", "uuid", "name", "worker", "timestamp", "queue", "sent"}  # defaults left out
    assert received["queue"] == "q1" and received["sent"] == pytest.approx(sent, abs=1e-5)
    full = get(("t2", "task-received"))
    assert full["args"].startswith("(1, 'xxx") and full["args"].endswith("...") and len(full["args"]) == 200
    assert full["kwargs"] == "{'k': 1}" and full["retries"] == 2
    assert full["eta"] == pytest.approx(sent + 1.0, abs=1e-5)
    waited = get(("t1", "task-started"))["queue_wait"]
    assert 1.5 < waited < 60                                          # from sent, seconds again
    assert 0.5 < get(("t2", "task-started"))["queue_wait"] < waited   # from the eta, a second later
    assert 0 <= get(("t1", "task-succeeded"))["runtime"] < 1
    failed = get(("t2", "task-failed"))
    assert failed["exception"] == "KeyError: \"'k'\"" and failed["traceback"].startswith("Traceback")
    assert 0 <= failed["runtime"] < 1
    retried = get(("t3", "task-retried"))
    assert retried["reason"] == "'later'" and "runtime" not in retried    # never started here
    assert get(("t4", "task-revoked"))["reason"] == "revoked" and get(("t4", "task-revoked"))["name"] == "shop.add"
    dead = get(("t5", "task-dead-lettered"))
    assert dead["reason"] == "not JSON" and dead["name"] is None
    assert ev._live == {}                                            # nothing left behind per task


def test_threads_driver_subscribers_hold_the_lock():
    """Under the threads driver a subscriber and ``take`` never interleave:
    with the lock held elsewhere, a subscriber waits."""
    import threading
    from greenq.hooks import INTERNAL_HOOKS, PUBLIC_HOOKS, Hooks
    lock = threading.Lock()
    ev, hooks = TaskEvents(lock), Hooks(PUBLIC_HOOKS + INTERNAL_HOOKS)
    ev.subscribe(hooks)
    with lock:
        t = threading.Thread(target=hooks.emit, args=("task_received", _job("t1", created=time.time())))
        t.start()
        t.join(0.2)
        assert t.is_alive() and len(ev.rows) == 0
    t.join(5)
    assert [row[:3] for row in ev.take()] == [["t1", "shop.add", 0]]


def test_worker_events_and_an_older_workers_body():
    beat = {"type": "worker-heartbeat", "worker": "w1", "timestamp": 1_700_000_000_250_000, "rss": 10}
    assert decode_batch(encode_batch("w1", [beat])) == [dict(beat, timestamp=1_700_000_000.25)]
    v1 = json.dumps([{"type": "task-succeeded", "uuid": "a", "worker": "old", "timestamp": 1_000_000,
                      "runtime": 1500}, "junk", 7])
    assert decode_batch(v1) == [{"type": "task-succeeded", "uuid": "a", "worker": "old", "timestamp": 1.0,
                                 "runtime": 0.0015}]


def test_the_row_layout_names_every_type():
    assert len(ROW_FIELDS) == len(TASK_EVENTS)
    assert set(MICROSECOND_FIELDS) >= {"timestamp", "sent", "eta", "runtime", "queue_wait"}


json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(10 ** 30), max_value=10 ** 30)
                | st.floats() | st.text(max_size=12))
json_values = st.recursive(json_scalars, lambda children: st.lists(children, max_size=6)
                           | st.dictionaries(st.sampled_from(["type", "uuid", "timestamp", "runtime", "x"]) | st.text(max_size=6), children, max_size=4), max_leaves=30)
rows = st.tuples(st.text(max_size=4) | json_scalars, json_scalars,
                 st.lists(st.integers(min_value=-2, max_value=9) | json_values, max_size=14)).map(
    lambda t: [t[0], t[1], *t[2]])


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, st.lists(rows | json_values, max_size=8).map(lambda e: {"v": 2, "w": "w", "e": e}),
                 st.binary(max_size=40)))
def test_any_body_decodes_to_events_or_nothing(body):
    """A garbled batch (wrong types, short rows, unknown codes, bytes that are
    not JSON) gives only well-formed event dicts, never an exception."""
    text = body if isinstance(body, bytes) else json.dumps(body)
    for event in decode_batch(text):
        assert isinstance(event, dict) and isinstance(event["type"], str)
        assert isinstance(event.get("uuid", ""), str)
        for key in MICROSECOND_FIELDS:
            assert event.get(key) is None or (type(event[key]) is float and math.isfinite(event[key]))


def test_a_reader_subscribed_first_gets_events_from_a_live_worker_id():
    """The memory transport (in-process) carries the same bodies."""
    url = f"memory://events-{uuid.uuid4().hex[:6]}"
    app = GreenQ("evmem", broker=url)
    sender, reader = Control(app), Control(app)
    try:
        stream = reader.events(poll=0.1)
        assert next(stream) == []
        sender.transport.send_events(encode_batch("w2", [["t9", None, 5, 2_000_000, "expired"]]))
        assert next(stream) == [{"type": "task-revoked", "uuid": "t9", "name": None, "worker": "w2",
                                 "timestamp": 2.0, "reason": "expired"}]
    finally:
        sender.close()
        reader.close()


def test_task_sent_row_and_the_client_publisher():
    """A client with ``task_send_sent_event`` publishes one task-sent event per
    task it sends, in batches, on the control plane (memory:// here); a
    worker-only send (a message moved to wait for its eta) publishes none."""
    from greenq.message import TaskMessage
    url = f"memory://sent-{uuid.uuid4().hex[:6]}"
    app = GreenQ("sent", broker=url)
    app.config.task_send_sent_event = True
    reader = Control(app)
    try:
        stream = reader.events(poll=0.1)
        assert next(stream) == []

        @app.task(name="sent.add")
        def add(x, y):
            return x + y

        first = add.apply_async((1, 2), countdown=30, expires=600)
        second = add.delay(3, 4)
        app.codec.outgoing(TaskMessage(task="sent.add", id="moved"), sent=False)
        app.codec.sent_sink.flush()
        got = []
        deadline = time.monotonic() + 5
        while len(got) < 2 and time.monotonic() < deadline:
            got.extend(next(stream))
        assert [e["uuid"] for e in got] == [first.id, second.id]
        one = got[0]
        assert one["type"] == "task-sent" and one["name"] == "sent.add" and one["args"] == "[1, 2]"
        assert one["queue"] == "default" and "kwargs" not in one and "parent_id" not in one
        assert 25 < one["eta"] - one["timestamp"] < 35 and 590 < one["expires"] - one["timestamp"] < 610
        assert one["worker"] == app.codec.sent_sink.name
    finally:
        reader.close()


def test_the_client_publisher_keeps_rows_while_the_broker_is_away(caplog):
    from greenq.control.sent import SentPublisher
    from greenq.message import TaskMessage
    app = GreenQ("sentaway", broker="redis://127.0.0.1:1/0")       # nothing listens there
    pub = SentPublisher(app)
    pub.rows.append(["t1", "x", 7, 1, "q", None, None, None, None, None, None, None])
    pub.flush()
    assert [row[0] for row in pub.rows] == ["t1"]                   # kept for the next try
    assert "could not publish 1" in caplog.text
    cluster = GreenQ("sentcluster", broker="redis+cluster://127.0.0.1:1")
    off = SentPublisher(cluster)
    off.rows.append(["t2", "x", 7, 1, "q", None, None, None, None, None, None, None])
    off.flush()
    off(TaskMessage(task="x", id="t3"))
    assert off._off and "task-sent events off" in caplog.text and not off.rows
