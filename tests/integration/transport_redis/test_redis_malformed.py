"""Redis broker against bad input and stale holders (issue 7).

Bad entries are written with a raw redis client in the broker's key layout
(``P:q:<queue>:<priority>`` streams, the ``P:delayed:<queue>`` sorted set),
beside good ones: each bad entry must come out of ``fetch`` as a Delivery with
``error`` set and a working token, on every read path (the fetch script, the
reclaim of a dead worker's entries, the blocking read), while its neighbours
are delivered as usual.  A worker whose lease ran out must not be able to
ack, dead-letter or requeue the message another worker now holds.
"""
from __future__ import annotations

import os
import threading
import time

import pytest

from greenq.transports.redis.broker import GROUP
from tests.integration.transport_redis.test_redis import admin, make, opened, out  # noqa: F401 (fixtures)

pytestmark = pytest.mark.redis

Q = "default"

#: (fields written with XADD, a piece of the error the broker must report)
BAD_ENTRIES = [
    ({"b": b'{"not": "checked here"}', "m": b"\xff\xfe-not-utf8"}, "not UTF-8"),
    ({"b": b"body"}, "no message id field 'm'"),
    ({"m": b"id-only"}, "no body field 'b'"),
    ({"b": b"body", "m": b"id", "x": b"1"}, "unknown stream entry field 'x'"),
    ({b"\xff": b"v", "b": b"body", "m": b"id"}, "unknown stream entry field"),
    ({"b": b"", "e": b"planted reason"}, "broker: planted reason"),
]


def stream(broker, priority: int = 0) -> str:
    return broker.streams(Q)[9 - priority]


def write_batch(broker, admin, bad_fields) -> None:
    """good-1, the bad entry, good-2, in that order, on the priority-0 stream."""
    broker.declare([Q])
    broker.publish(out(Q, b"good-1", message_id="good-1"))
    admin.xadd(stream(broker), bad_fields)
    broker.publish(out(Q, b"good-2", message_id="good-2"))


def check_batch(broker, got, reason: str) -> None:
    """The bad entry is reported, the good ones delivered, and the bad one
    dead-letters through its token."""
    assert [d.error is None for d in got] == [True, False, True], [d.error for d in got]
    assert [d.message_id for d in (got[0], got[2])] == ["good-1", "good-2"]
    assert [d.body for d in (got[0], got[2])] == [b"good-1", b"good-2"]
    bad = got[1]
    assert reason in bad.error
    broker.ack([got[0], got[2]])
    broker.dead_letter(bad, bad.error)
    [dead] = broker.dlq_list()
    assert dead.reason == bad.error and dead.queue == Q
    stats = broker.queue_stats([Q])[0]
    assert (stats.ready, stats.held, stats.dead) == (0, 0, 1)


@pytest.mark.parametrize("fields,reason", BAD_ENTRIES, ids=[r for _, r in BAD_ENTRIES])
def test_malformed_entry_in_the_fetch_script(make, admin, fields, reason):
    broker = make()
    write_batch(broker, admin, fields)
    got = broker.fetch([Q], 10, 1.0)
    check_batch(broker, got, reason)


def test_repeated_field_is_reported(make, admin):
    broker = make()
    broker.declare([Q])
    admin.execute_command("XADD", stream(broker), "*", "b", "one", "b", "two", "m", "id")
    [d] = broker.fetch([Q], 10, 1.0)
    assert "'b' appears twice" in d.error


def test_good_fields_in_another_order_are_fine(make, admin):
    broker = make()
    broker.declare([Q])
    admin.xadd(stream(broker), {"m": b"id-first", "b": b"body"})
    [d] = broker.fetch([Q], 10, 1.0)
    assert (d.error, d.message_id, d.body) == (None, "id-first", b"body")
    admin.xadd(stream(broker), {"m": b"again", "b": b"body"})
    [d] = broker._block_read([Q], 10, 0.5)
    assert (d.error, d.message_id) == (None, "again")


@pytest.mark.parametrize("fields,reason", BAD_ENTRIES[:2], ids=[r for _, r in BAD_ENTRIES[:2]])
def test_malformed_entry_in_a_dead_workers_batch_is_reclaimed_once(make, admin, fields, reason):
    """A dead worker leased the batch (the entries are idle past the lease):
    the reclaim hands out all three, the bad one with its error."""
    broker = make(lease_seconds=5)
    write_batch(broker, admin, fields)
    key = stream(broker)
    admin.xreadgroup(GROUP, "dead-worker", {key: ">"}, count=10)
    ids = [p["message_id"] for p in admin.xpending_range(key, GROUP, "-", "+", 10)]
    admin.xclaim(key, GROUP, "dead-worker", 0, ids, idle=60_000, justid=True)
    got = broker.fetch([Q], 10, 1.0)
    assert [d.deliveries for d in got] == [2, 2, 2]
    check_batch(broker, got, reason)


def test_malformed_entry_in_the_blocking_read(make, admin):
    """The blocking XREADGROUP path (nothing was ready when the script ran)."""
    broker = make()
    broker.declare([Q])
    admin.xadd(stream(broker, 3), {"b": b"x", "m": b"\xc3("})
    admin.xadd(stream(broker, 3), {"b": b"fine", "m": b"fine"})
    got = broker._block_read([Q], 10, 0.5)       # the first entry, handed out at once
    got += broker.fetch([Q], 10, 0.5)              # the rest: the next fetch's script
    assert [(d.priority, d.message_id, d.error is None) for d in got] == [
        (3, "\\xc3(", False), (3, "fine", True)]
    assert "not UTF-8" in got[0].error


def test_malformed_delayed_members_are_dead_lettered_not_fatal(make, admin):
    """A delayed member that does not parse must not break the fetch script
    (which would re-move the members before it on every fetch)."""
    broker = make()
    broker.declare([Q])
    delayed = f"{broker.prefix}:delayed:{Q}"
    good = b"abcdefgh" + b"5" + b"6:" + b"good-d" + b"payload"
    bad = [b"short", b"abcdefghX5:abcdef", b"abcdefgh59:ab", b"abcdefgh5x:ab",
           b"abcdefgh5", b"abcdefgh5-1:ab", b"abcdefgh51e9:ab", b"\xff" * 12]
    admin.zadd(delayed, {m: i for i, m in enumerate([bad[0], good, *bad[1:]])})
    got = broker.fetch([Q], 100, 1.0) + broker.fetch([Q], 100, 0.2)
    assert admin.zcard(delayed) == 0
    ok = [d for d in got if d.error is None]
    assert [(d.message_id, d.body, d.priority) for d in ok] == [("good-d", b"payload", 5)]
    errors = [d for d in got if d.error is not None]
    assert sorted(d.body for d in errors) == sorted(bad)
    assert {d.error for d in errors} == {"broker: malformed delayed entry"}
    for d in errors:
        broker.dead_letter(d, d.error)
    broker.ack(ok)
    stats = broker.queue_stats([Q])[0]
    assert (stats.ready, stats.delayed, stats.held, stats.dead) == (0, 0, 0, len(bad))


def steal(admin, delivery, thief: str = "other-worker") -> None:
    """What another worker's reclaim does once our lease ran out."""
    admin.xclaim(delivery.token[0], GROUP, thief, 0, [delivery.token[1]], justid=True)


def owner(admin, delivery) -> str:
    [p] = admin.xpending_range(delivery.token[0], GROUP, delivery.token[1], delivery.token[1], 1)
    return p["consumer"].decode()


def test_stale_holder_cannot_ack_dead_letter_or_requeue(make, admin):
    broker = make()
    broker.declare([Q])
    broker.publish(out(Q, b"x", message_id="m1"))
    [d] = broker.fetch([Q], 1, 1.0)
    steal(admin, d)
    broker.ack([d])
    broker.dead_letter(d, "stale")
    broker.requeue([d])
    broker.requeue([d], started=False)
    broker.renew([d])
    assert owner(admin, d) == "other-worker"
    assert admin.xlen(d.token[0]) == 1 and broker.dlq_list() == []
    stats = broker.queue_stats([Q])[0]
    assert (stats.held, stats.dead) == (1, 0)


def test_holder_acks_only_what_it_still_holds(make, admin):
    """One ack batch with a stolen entry and an owned one: only the owned goes."""
    broker = make()
    broker.declare([Q])
    broker.publish_many([out(Q, b"a", message_id="a"), out(Q, b"b", message_id="b")])
    a, b = broker.fetch([Q], 2, 1.0)
    steal(admin, a)
    broker.ack([a, b])
    assert [e[0] for e in admin.xrange(a.token[0])] == [a.token[1]]
    assert owner(admin, a) == "other-worker"


def test_requeue_unstarted_keeps_the_delivery_count(make):
    broker = make()
    broker.declare([Q])
    broker.publish(out(Q, b"x", message_id="m1"))
    counts = []
    for started in (False, False, True, False):
        [d] = broker.fetch([Q], 1, 1.0)
        counts.append(d.deliveries)
        broker.requeue([d], started=started)
    [d] = broker.fetch([Q], 1, 1.0)
    counts.append(d.deliveries)
    assert counts == [1, 1, 1, 2, 2]


def test_stop_consuming_returns_what_a_blocked_fetch_receives(make, admin):
    """A fetch blocked in XREADGROUP when stop_consuming() is called returns
    [] and the message it received is ready again at once, count unchanged."""
    broker = make()
    client = make()
    broker.declare([Q])
    result = []
    fetcher = threading.Thread(target=lambda: result.append(broker.fetch([Q], 10, 5.0)))
    fetcher.start()
    deadline = time.monotonic() + 5
    while not any(c.get("cmd") == "xreadgroup" and c["name"].startswith("greenq-")
                  and c["name"].endswith(f"-{os.getpid()}")
                  for c in admin.client_list()):
        assert time.monotonic() < deadline, "the fetch never blocked"
        time.sleep(0.01)
    broker.stop_consuming()
    client.publish(out(Q, b"late", message_id="late"))
    fetcher.join(5)
    assert result == [[]]
    assert broker.fetch([Q], 10, 0.1) == []
    [d] = client.fetch([Q], 10, 1.0)
    assert (d.message_id, d.deliveries) == ("late", 1)


def test_close_is_safe_twice_and_unused(make):
    broker = make()
    broker.close()
    broker.close()
    never_used = make()
    never_used.close()


def test_hand_written_dead_letters_are_listed_and_skipped_by_requeue(make, admin):
    broker = make()
    broker.declare([Q])
    broker.publish(out(Q, b"x", message_id="real"))
    [d] = broker.fetch([Q], 1, 1.0)
    broker.dead_letter(d, "for the test")
    dead = f"{broker.prefix}:dead"
    admin.xadd(dead, {"q": Q, "p": "0", "m": b"\xff", "r": b"\xfe", "t": "soon", "b": "x"})
    admin.xadd(dead, {"q": Q, "p": "10", "m": "bad-priority", "b": "x"})
    admin.xadd(dead, {"r": "nothing else"})
    listed = broker.dlq_list()
    assert [(x.message_id, x.failed_at) for x in listed[1:]] == [
        ("\\xff", 0.0), ("bad-priority", 0.0), ("", 0.0)]
    assert broker.dlq_requeue() == 2          # "real" and the hand-written one with good fields
    assert sorted(x.message_id for x in broker.fetch([Q], 10, 1.0)) == ["\\xff", "real"]
    assert [x.message_id for x in broker.dlq_list()] == ["bad-priority", ""]


def test_every_client_path_sends_a_future_eta_to_the_delayed_set(redis_url, redis_prefix, make):
    """The envelope's eta travels as Outgoing.eta on every path of the client
    (apply_async with countdown or eta, send_task, enqueue_many): nothing
    with a future eta is in a stream, so no worker can take it early."""
    from greenq import GreenQ
    app = GreenQ("eta", broker=redis_url, key_prefix=redis_prefix)
    try:
        @app.task(name="eta.t")
        def t(x):
            return x
        soon = time.time() + 60
        sent = [t.apply_async((1,), countdown=60), t.apply_async((2,), eta=soon),
                app.send_task("eta.t", (3,), countdown=60),
                *app.enqueue_many([t.s(4).set(countdown=60), t.s(5).set(eta=soon)])]
        broker = make()
        stats = broker.queue_stats([Q])[0]
        assert (stats.ready, stats.delayed) == (0, len(sent))
        assert broker.fetch([Q], 10, 0.2) == []
        assert soon - 1 <= broker.next_due([Q]) <= soon + 1
    finally:
        app.close()


def test_dlq_requeue_steps_over_a_full_batch_of_unusable_dead_letters(make, admin):
    broker = make()
    broker.declare([Q])
    dead = f"{broker.prefix}:dead"
    pipe = admin.pipeline(transaction=False)
    for i in range(600):
        pipe.xadd(dead, {"r": f"hand-written {i}"})
    pipe.execute()
    broker.publish(out(Q, b"x", message_id="real"))
    [d] = broker.fetch([Q], 1, 1.0)
    broker.dead_letter(d, "for the test")
    assert broker.dlq_requeue() == 1
    assert [x.message_id for x in broker.fetch([Q], 10, 1.0)] == ["real"]
    assert admin.xlen(dead) == 600
