"""The broker contract (greenq/brokers/base.py), run against every broker.

Each test gets fresh instances sharing one namespace of its own from the
``broker_env`` fixture (see conftest.py) and uses queue names from
``env.queue()``.  Tests that involve leases use ``lease_seconds=1``.
"""
from __future__ import annotations

import threading
import time
import uuid
from typing import List, Sequence

from greenq.brokers import Delivery, Outgoing
from tests.conftest import until

BODY = bytes(range(256)) * 8 + "é ✓ \x00 end".encode()


def out(queue: str, body: bytes = b"x", priority: int = 0, eta=None, message_id=None) -> Outgoing:
    return Outgoing(queue, body, message_id or uuid.uuid4().hex, priority, eta)


def drain(broker, queues: Sequence[str], expected: int, count: int = 100, timeout: float = 5.0,
          ack: bool = True) -> List[Delivery]:
    """Fetch until ``expected`` messages arrived or ``timeout`` passed."""
    got: List[Delivery] = []
    deadline = time.monotonic() + timeout
    while len(got) < expected and time.monotonic() < deadline:
        batch = broker.fetch(queues, count, 0.2)
        assert len(batch) <= count
        if ack and batch:
            broker.ack(batch)
        got.extend(batch)
    return got


def ids(deliveries: Sequence[Delivery]) -> List[str]:
    return [d.message_id for d in deliveries]


def stats_of(broker, queue: str):
    [stats] = broker.queue_stats([queue])
    assert stats.name == queue
    return stats


# -- publish and fetch --------------------------------------------------------

def test_roundtrip_keeps_body_and_fields(broker_env):
    q = broker_env.queue()
    consumer = broker_env.consumer([q])
    broker_env.broker().publish(out(q, BODY, priority=3, message_id="m-1"))
    [d] = drain(consumer, [q], 1, ack=False)
    assert (d.queue, d.body, d.message_id, d.deliveries, d.priority) == (q, BODY, "m-1", 1, 3)
    assert isinstance(d.body, bytes)
    consumer.ack([d])


def test_publish_before_any_consumer_is_kept(broker_env):
    q = broker_env.queue()
    broker_env.broker().publish_many([out(q, b"early-1"), out(q, b"early-2")])
    consumer = broker_env.consumer([q])
    assert sorted(d.body for d in drain(consumer, [q], 2)) == [b"early-1", b"early-2"]


def test_publish_many_and_fetch_in_batches(broker_env):
    q = broker_env.queue()
    consumer = broker_env.consumer([q])
    sent = [out(q, str(i).encode()) for i in range(25)]
    broker_env.broker().publish_many(sent)
    batches = []
    deadline = time.monotonic() + 5
    while sum(map(len, batches)) < 25 and time.monotonic() < deadline:
        batch = consumer.fetch([q], 10, 0.5)
        assert len(batch) <= 10
        if batch:
            consumer.ack(batch)
            batches.append(batch)
    got = [d for batch in batches for d in batch]
    assert sorted(ids(got)) == sorted(m.message_id for m in sent)
    assert max(map(len, batches)) > 1, "fetch never returned more than one message at once"
    assert consumer.fetch([q], 10, 0.1) == []


def test_fetch_with_nothing_ready_waits_for_timeout(broker_env):
    q = broker_env.queue()
    consumer = broker_env.consumer([q])
    start = time.monotonic()
    assert consumer.fetch([q], 10, 0.5) == []
    assert 0.45 <= time.monotonic() - start < 5.0   # its timeout is the floor; the ceiling only catches a hang


def test_fetch_returns_promptly_when_published_from_another_thread(broker_env):
    q = broker_env.queue()
    consumer = broker_env.consumer([q])
    client = broker_env.broker()
    published = []

    def publish_later():
        time.sleep(0.3)
        client.publish(out(q, b"late"))
        published.append(time.monotonic())

    thread = threading.Thread(target=publish_later)
    thread.start()
    got = consumer.fetch([q], 10, 10.0)
    returned = time.monotonic()
    thread.join()
    assert [d.body for d in got] == [b"late"]
    assert returned - published[0] < 5.0   # woke on the publish, not at its 10 s timeout
    consumer.ack(got)


# -- acknowledgement, requeue, leases -------------------------------------------

def test_ack_removes_for_good(broker_env):
    q = broker_env.queue()
    consumer = broker_env.consumer([q], lease_seconds=1)
    broker_env.broker().publish(out(q))
    [d] = drain(consumer, [q], 1, ack=False)
    consumer.ack([d])
    assert (stats_of(consumer, q).ready, stats_of(consumer, q).held) == (0, 0)
    time.sleep(1.2)  # past the lease: an acked message must not come back
    other = broker_env.consumer([q], lease_seconds=1)
    assert other.fetch([q], 10, 0.2) == []


def test_ack_twice_is_harmless(broker_env):
    q = broker_env.queue()
    consumer = broker_env.consumer([q])
    broker_env.broker().publish_many([out(q, b"1"), out(q, b"2")])
    got = drain(consumer, [q], 2, ack=False)
    consumer.ack(got)
    consumer.ack(got)
    consumer.ack([])
    assert consumer.fetch([q], 10, 0.1) == []


def test_requeue_returns_message_at_once(broker_env):
    q = broker_env.queue()
    consumer = broker_env.consumer([q], lease_seconds=30)
    broker_env.broker().publish(out(q, b"again", message_id="m-r"))
    [d] = drain(consumer, [q], 1, ack=False)
    consumer.requeue([d])
    start = time.monotonic()
    [again] = drain(consumer, [q], 1, ack=False, timeout=10)
    assert time.monotonic() - start < 10   # back at once, not when the 30 s lease ends
    assert (again.message_id, again.body, again.deliveries) == ("m-r", b"again", 2)
    consumer.ack([again])


def test_requeue_unstarted_keeps_the_delivery_count(broker_env):
    """A warm shutdown returns what it held but never began: that hand-out
    does not count toward max_deliveries (issue 7, deliverable 4)."""
    q = broker_env.queue()
    consumer = broker_env.consumer([q], lease_seconds=30)
    broker_env.broker().publish(out(q, b"unstarted", message_id="m-u"))
    [d] = drain(consumer, [q], 1, ack=False)
    assert d.deliveries == 1
    consumer.requeue([d], started=False)
    start = time.monotonic()
    [again] = drain(consumer, [q], 1, ack=False, timeout=10)
    assert time.monotonic() - start < 10   # back at once, not when the 30 s lease ends
    assert (again.message_id, again.body, again.deliveries) == ("m-u", b"unstarted", 1)
    consumer.ack([again])


def test_stop_consuming_leaves_held_messages_settleable(broker_env):
    """After stop_consuming (warm shutdown), nothing more is handed out to
    this consumer, and what it holds can still be acknowledged and requeued."""
    q = broker_env.queue()
    consumer = broker_env.consumer([q], lease_seconds=30)
    producer = broker_env.broker()
    producer.publish_many([out(q, f"m{i}".encode(), message_id=f"s-{i}") for i in range(4)])
    held = drain(consumer, [q], 2, count=2, ack=False)
    assert len(held) == 2
    consumer.stop_consuming()
    consumer.ack(held[:1])
    consumer.requeue(held[1:], started=False)
    other = broker_env.consumer([q], lease_seconds=30)
    rest = drain(other, [q], 3, ack=True)
    assert sorted(ids(rest)) == sorted({"s-0", "s-1", "s-2", "s-3"} - {held[0].message_id})


def test_expired_lease_goes_to_another_consumer(broker_env):
    q = broker_env.queue()
    first = broker_env.consumer([q], lease_seconds=1)
    second = broker_env.consumer([q], lease_seconds=1)
    broker_env.broker().publish(out(q, b"lost", message_id="m-l"))
    [d] = drain(first, [q], 1, ack=False)
    fetched = time.monotonic()
    assert second.fetch([q], 10, 0.2) == []  # hidden while leased
    if not broker_env.leases:
        broker_env.close(first)  # no leases: the holder's connection dying is what returns it
    [again] = drain(second, [q], 1, ack=False, timeout=3)
    if broker_env.leases:
        assert time.monotonic() - fetched >= 0.7
    assert (again.message_id, again.body, again.deliveries) == ("m-l", b"lost", 2)
    second.ack([again])


def test_renew_keeps_message_hidden_past_first_lease(broker_env):
    q = broker_env.queue()
    holder = broker_env.consumer([q], lease_seconds=1)
    other = broker_env.consumer([q], lease_seconds=1)
    broker_env.broker().publish(out(q))
    [d] = drain(holder, [q], 1, ack=False)
    time.sleep(0.6)
    holder.renew([d])
    time.sleep(0.6)  # 1.2 s after the fetch: the first lease is over, the renewed one is not
    assert other.fetch([q], 10, 0.2) == []
    assert stats_of(holder, q).held == 1
    holder.ack([d])


# -- ordering ------------------------------------------------------------------

def test_higher_priority_first_then_fifo(broker_env):
    q = broker_env.queue()
    client = broker_env.broker()
    sent = [("a", 0), ("b", 9), ("c", 5), ("d", 0), ("e", 9), ("f", 5), ("g", 0)]
    for name, priority in sent:
        client.publish(out(q, name.encode(), priority=priority, message_id=name))
    consumer = broker_env.consumer([q])
    got = drain(consumer, [q], len(sent), count=1)
    assert ids(got) == ["b", "e", "c", "f", "a", "d", "g"]
    assert [d.priority for d in got] == [9, 9, 5, 5, 0, 0, 0]


def test_equal_priority_is_fifo(broker_env):
    q = broker_env.queue()
    consumer = broker_env.consumer([q])
    client = broker_env.broker()
    names = [f"m{i:02}" for i in range(20)]
    for name in names[:10]:
        client.publish(out(q, message_id=name))
    client.publish_many([out(q, message_id=name) for name in names[10:]])
    assert ids(drain(consumer, [q], 20, count=7)) == names


def test_queues_are_fetched_in_the_order_given(broker_env):
    first, second = broker_env.queue("first"), broker_env.queue("second")
    consumer = broker_env.consumer([first, second])
    client = broker_env.broker()
    client.publish_many([out(second, message_id="s1"), out(second, message_id="s2")])
    client.publish_many([out(first, message_id="f1"), out(first, message_id="f2")])
    got = drain(consumer, [first, second], 4, count=3)
    if getattr(broker_env, "queue_order_kept", True):
        assert ids(got) == ["f1", "f2", "s1", "s2"]
        assert [d.queue for d in got] == [first, first, second, second]
    else:       # Redis Cluster: each queue in its order, the queues in any (a lane per queue)
        assert [d.message_id for d in got if d.queue == first] == ["f1", "f2"]
        assert [d.message_id for d in got if d.queue == second] == ["s1", "s2"]


# -- delayed messages --------------------------------------------------------------

def test_delayed_message_waits_for_its_eta(broker_env):
    q = broker_env.queue()
    consumer = broker_env.consumer([q])
    eta = time.time() + 0.8
    client = broker_env.broker()
    client.publish(out(q, b"later", eta=eta, message_id="later"))
    client.publish(out(q, b"now", eta=time.time() - 5, message_id="now"))  # past eta: ready now
    assert ids(drain(consumer, [q], 1)) == ["now"]
    assert consumer.fetch([q], 10, 0.1) == []
    stats = stats_of(consumer, q)
    assert (stats.ready, stats.delayed) == (0, 1)
    due = consumer.next_due([q])
    assert due is not None and abs(due - eta) < 0.5
    [d] = drain(consumer, [q], 1, timeout=3)
    assert time.time() >= eta - 0.05
    assert (d.message_id, d.body, d.deliveries) == ("later", b"later", 1)
    assert until(lambda: consumer.next_due([q]) is None), "a delivered message still counts as due"


def test_next_due_is_the_earliest_eta(broker_env):
    a, b = broker_env.queue("a"), broker_env.queue("b")
    consumer = broker_env.consumer([a, b])
    assert consumer.next_due([a, b]) is None
    now = time.time()
    client = broker_env.broker()
    client.publish(out(a, eta=now + 60))
    client.publish(out(b, eta=now + 30))
    client.publish(out(a))  # ready messages are not "due"
    assert abs(consumer.next_due([a, b]) - (now + 30)) < 0.5
    assert abs(consumer.next_due([a]) - (now + 60)) < 0.5


# -- administration -------------------------------------------------------------------

def test_queue_stats_counts_ready_delayed_held_dead(broker_env):
    q = broker_env.queue()
    consumer = broker_env.consumer([q])
    client = broker_env.broker()
    client.publish_many([out(q, b"1"), out(q, b"2"), out(q, b"3")])
    client.publish(out(q, b"delayed", eta=time.time() + 60))
    held = drain(consumer, [q], 2, count=2, ack=False)
    consumer.dead_letter(held[1], "test: poison")
    stats = stats_of(consumer, q)
    assert (stats.ready, stats.delayed, stats.held, stats.dead) == (1, 1, 1, 1)
    assert q in [s.name for s in consumer.queue_stats()]
    empty = broker_env.queue("empty")
    assert [(s.name, s.ready, s.delayed, s.held, s.dead) for s in consumer.queue_stats([empty])] == \
        [(empty, 0, 0, 0, 0)]
    consumer.ack(held[:1])


def test_queue_stats_autoscaling_signals(broker_env):
    """The four figures an autoscaler reads (docs/autoscaling.md): ready,
    held, delayed, and the oldest ready message's age, which grows while it
    waits, counts a due delayed message from its eta, and is 0.0 when none
    is ready; RabbitMQ cannot tell the age (None), nor may a transport from
    outside greenq (the toy), but then never."""
    q = broker_env.queue()
    consumer = broker_env.consumer([q])
    client = broker_env.broker()
    first = stats_of(consumer, q).oldest_ready_age
    aged = broker_env.kind in ("memory", "sqlite", "redis") or (broker_env.kind != "amqp" and first is not None)
    assert first == (0.0 if aged else None)
    start = time.time()
    client.publish_many([out(q, b"1", message_id="1"), out(q, b"2", message_id="2")])
    client.publish(out(q, b"later", eta=time.time() + 60))
    time.sleep(0.6)                     # (the age must grow; nothing to wait for)
    stats = stats_of(consumer, q)
    assert (stats.ready, stats.held, stats.delayed) == (2, 0, 1)
    if aged:
        assert 0.5 <= stats.oldest_ready_age <= time.time() - start + 0.1, stats
    else:
        assert stats.oldest_ready_age is None
    held = drain(consumer, [q], 2, count=2, ack=False)
    stats = stats_of(consumer, q)
    assert (stats.ready, stats.held, stats.delayed) == (0, 2, 1)
    assert stats.oldest_ready_age == (0.0 if aged else None)   # held is not waiting
    consumer.ack(held)
    if aged:   # a due delayed message is ready, waiting since its eta, before any fetch moves it
        client.publish(out(q, b"due", eta=time.time() + 0.3, message_id="due"))
        time.sleep(0.8)
        stats = stats_of(consumer, q)
        assert (stats.ready, stats.held, stats.delayed) == (1, 0, 1)
        assert 0.3 <= stats.oldest_ready_age <= 0.8, stats
        assert ids(drain(consumer, [q], 1)) == ["due"]
        assert stats_of(consumer, q).oldest_ready_age == 0.0


def test_purge_removes_ready_and_delayed_only(broker_env):
    q, other = broker_env.queue(), broker_env.queue("other")
    consumer = broker_env.consumer([q, other])
    client = broker_env.broker()
    client.publish_many([out(q, b"held"), out(q, b"1"), out(q, b"2"), out(other, b"keep")])
    client.publish(out(q, b"delayed", eta=time.time() + 60))
    [held] = drain(consumer, [q], 1, count=1, ack=False)
    assert consumer.purge(q) == 3
    stats = stats_of(consumer, q)
    assert (stats.ready, stats.delayed, stats.held) == (0, 0, 1)
    assert stats_of(consumer, other).ready == 1
    assert consumer.fetch([q], 10, 0.1) == []
    consumer.ack([held])


def _dead_letters(broker, queue: str):
    return [d for d in broker.dlq_list(1000) if d.queue == queue]


def test_dead_letter_store_lists_and_shows(broker_env):
    q = broker_env.queue()
    consumer = broker_env.consumer([q])
    broker_env.broker().publish_many([out(q, BODY, message_id="d1"), out(q, b"two", message_id="d2")])
    first, second = drain(consumer, [q], 2, count=1, ack=False)
    before = time.time()
    consumer.dead_letter(first, "undecodable")
    consumer.dead_letter(second, "max deliveries")
    dead = _dead_letters(consumer, q)
    assert [(d.message_id, d.reason) for d in dead] == [("d1", "undecodable"), ("d2", "max deliveries")]
    assert dead[0].body == BODY and dead[0].queue == q
    assert before - 5 <= dead[0].failed_at <= time.time() + 5
    shown = consumer.dlq_get(dead[1].id)
    assert (shown.id, shown.message_id, shown.body, shown.reason) == (dead[1].id, "d2", b"two", "max deliveries")
    assert consumer.dlq_get("no-such-id") is None
    assert consumer.fetch([q], 10, 0.1) == []  # no longer in the queue
    if broker_env.isolated:
        assert stats_of(consumer, q).dead == 2 and len(consumer.dlq_list(1)) == 1


def test_dlq_requeue_one_with_fresh_delivery_count(broker_env):
    q = broker_env.queue()
    consumer = broker_env.consumer([q])
    broker_env.broker().publish_many([out(q, b"a", priority=4, message_id="a"), out(q, b"b", message_id="b")])
    got = drain(consumer, [q], 2, ack=False)
    consumer.requeue(got)
    got = drain(consumer, [q], 2, ack=False)  # second delivery
    assert {d.deliveries for d in got} == {2}
    for d in got:
        consumer.dead_letter(d, "failed")
    dead_a = next(d for d in _dead_letters(consumer, q) if d.message_id == "a")
    assert consumer.dlq_requeue([dead_a.id]) == 1
    [again] = drain(consumer, [q], 1, ack=False)
    assert (again.message_id, again.body, again.deliveries, again.priority) == ("a", b"a", 1, 4)
    assert [d.message_id for d in _dead_letters(consumer, q)] == ["b"]
    assert consumer.dlq_get(dead_a.id) is None
    consumer.ack([again])


def test_dlq_requeue_all_and_purge(broker_env):
    q = broker_env.queue()
    consumer = broker_env.consumer([q])
    broker_env.broker().publish_many([out(q, message_id=f"x{i}") for i in range(3)])
    for d in drain(consumer, [q], 3, ack=False):
        consumer.dead_letter(d, "failed")
    moved = consumer.dlq_requeue()
    assert moved == 3 if broker_env.isolated else moved >= 3
    assert _dead_letters(consumer, q) == []
    got = drain(consumer, [q], 3, ack=False)
    assert sorted(ids(got)) == ["x0", "x1", "x2"] and {d.deliveries for d in got} == {1}
    for d in got:
        consumer.dead_letter(d, "failed again")
    purged = consumer.dlq_purge()
    assert purged == 3 if broker_env.isolated else purged >= 3
    assert _dead_letters(consumer, q) == []
    assert stats_of(consumer, q).dead == 0


# -- concurrency and lifecycle -------------------------------------------------------------

def test_two_consumers_never_get_the_same_message(broker_env):
    q = broker_env.queue()
    total = 600
    consumers = [broker_env.consumer([q]) for _ in range(2)]
    sent = [out(q, str(i).encode(), message_id=f"c{i}") for i in range(total)]
    broker_env.broker().publish_many(sent)
    received: List[List[str]] = [[], []]
    deadline = time.monotonic() + 15

    def consume(index: int) -> None:
        broker = consumers[index]
        while sum(map(len, received)) < total and time.monotonic() < deadline:
            batch = broker.fetch([q], 20, 0.1)
            if batch:
                broker.ack(batch)
                received[index].extend(ids(batch))

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    union = received[0] + received[1]
    assert len(union) == len(set(union)), "a message was handed to two consumers"
    assert sorted(union) == sorted(m.message_id for m in sent)


def test_messages_survive_close_of_the_publisher(broker_env):
    q = broker_env.queue()
    consumer = broker_env.consumer([q])
    client = broker_env.broker()
    client.publish(out(q, b"durable", message_id="m-c"))
    broker_env.close(client)
    assert ids(drain(consumer, [q], 1)) == ["m-c"]
