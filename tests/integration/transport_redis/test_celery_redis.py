"""Celery queues on Redis (greenq/transports/redis/celery_broker.py): messages
written by a real Celery client, fetched in kombu's list format, and kombu's
own ack bookkeeping shared both ways: kombu's restore (the code a Celery
worker runs) gives back what a dead greenq worker held, and greenq gives back
what a dead kombu consumer held.  Malformed list elements are dead-lettered
with a reason.  The queues are named after the test's key prefix, so the
prefix cleanup deletes their lists; the ``unacked`` entries each test made
are deleted by it."""
from __future__ import annotations

import base64
import json
import time

import pytest

from greenq.celery import protocol
from greenq.message import Codec
from greenq.transports.redis.celery_broker import (SEP, UNACKED, UNACKED_INDEX, CeleryDelivery,
                                                   CeleryRedisBroker, list_key)
from tests.conftest import make_config, until
from tests.fixtures.celery.clients import run_celery

pytestmark = pytest.mark.redis

SEND = """
import sys
from celery import Celery
app = Celery("t", broker=sys.argv[1])
for spec in sys.argv[3:]:
    task, args, options = spec.split("|")
    r = app.send_task(task, args=eval(args), queue=sys.argv[2], **eval(options))
    print(r.id)
"""

KOMBU_TAKE_AND_DIE = """
import os, sys
from kombu import Connection
with Connection(sys.argv[1]) as conn:
    channel = conn.default_channel
    message = channel.basic_get(sys.argv[2], no_ack=False)   # held in kombu's unacked, not acked
    print(message.delivery_tag, flush=True)
    os._exit(0)                                             # killed: no restore at shutdown
"""

KOMBU_RESTORE = """
import sys
from kombu import Connection
with Connection(sys.argv[1]) as conn:
    conn.default_channel.qos.restore_visible(num=1000)      # what a Celery worker runs periodically
"""


@pytest.fixture
def queue(redis_prefix):
    return f"{redis_prefix}-celery"


@pytest.fixture
def raw(redis_url, queue):
    import redis
    client = redis.Redis.from_url(redis_url)
    tags = []
    yield client, tags
    for tag in tags:
        client.zrem(UNACKED_INDEX, tag)
        client.hdel(UNACKED, tag)
    for key in client.scan_iter(match="_kombu.binding*", count=1000):    # Celery's, outside the prefix
        if key.decode().endswith(queue):
            client.delete(key)
    client.close()


@pytest.fixture
def make(redis_url, redis_prefix, queue):
    made = []

    def build(**overrides):
        overrides.setdefault("lease_seconds", 30)
        cfg = make_config(broker_url=redis_url, key_prefix=redis_prefix, celery_queues=queue, **overrides)
        broker = CeleryRedisBroker(redis_url, cfg)
        made.append(broker)
        return broker
    yield build
    for broker in made:
        broker.close()


def send(redis_url, queue, *specs):
    return run_celery(SEND, redis_url, queue, *specs).split()


def fetch_all(broker, queue, want, timeout=10.0):
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got += broker.fetch([queue], want - len(got), 0.5)
    return got


def test_messages_of_a_celery_client_are_fetched_held_as_kombu_does_and_acked(make, raw, redis_url, queue):
    client, tags = raw
    ids = send(redis_url, queue, "interop.add|[2, 3]|{}", "interop.add|[4, 5]|{'priority': 7}")
    assert client.llen(queue) == 1 and client.llen(queue + SEP + "6") == 1     # kombu's priority step
    broker = make()
    got = fetch_all(broker, queue, 2)
    tags += [d.token[0] for d in got]
    assert sorted(d.message_id for d in got) == sorted(ids)
    assert [d.decode(Codec()).args for d in got] == [[2, 3], [4, 5]]          # step 0 before step 6
    assert all(isinstance(d, CeleryDelivery) and d.deliveries == 1 for d in got)
    for d in got:                       # in kombu's unacked, as kombu writes it, scored to the lease
        payload, exchange, routing_key = json.loads(client.hget(UNACKED, d.token[0]))
        assert (exchange, routing_key) == ("", queue) and payload["headers"]["id"] == d.message_id
        assert client.zscore(UNACKED_INDEX, d.token[0]) == pytest.approx(time.time() + 30 - 3600, abs=5)
    assert [s.held for s in broker.queue_stats([queue])] == [2]
    broker.renew(got)
    broker.ack(got)
    for d in got:
        assert not client.hexists(UNACKED, d.token[0]) and client.zscore(UNACKED_INDEX, d.token[0]) is None
    assert client.llen(queue) == 0 and [s.held for s in broker.queue_stats([queue])] == [0]


def test_kombus_restore_gives_back_what_a_dead_greenq_worker_held(make, raw, redis_url, queue):
    client, tags = raw
    [task_id] = send(redis_url, queue, "interop.add|[1, 1]|{}")
    dead = make(lease_seconds=1)
    [d] = fetch_all(dead, queue, 1)
    tags.append(d.token[0])
    assert client.llen(queue) == 0
    # the worker dies (no renew, no ack); once its lease ran out, a Celery worker's restore puts it back
    assert until(lambda: client.zscore(UNACKED_INDEX, d.token[0]) < time.time() - 3600, 10)
    run_celery(KOMBU_RESTORE, redis_url)
    assert client.llen(queue) == 1 and not client.hexists(UNACKED, d.token[0])
    element = json.loads(client.lindex(queue, 0))
    assert element["headers"]["id"] == task_id and element["headers"]["redelivered"] is True
    dead.ack([d])                       # the dead holder's late ack changes nothing
    assert client.llen(queue) == 1
    again = fetch_all(make(), queue, 1)
    assert [x.message_id for x in again] == [task_id] and again[0].deliveries == 2


def test_greenq_gives_back_what_a_dead_kombu_consumer_held(make, raw, redis_url, queue):
    client, tags = raw
    [task_id] = send(redis_url, queue, "interop.add|[3, 4]|{}")
    [tag] = run_celery(KOMBU_TAKE_AND_DIE, redis_url, queue).split()
    tags.append(tag)
    assert client.llen(queue) == 0 and client.hexists(UNACKED, tag)
    broker = make()
    broker.visibility_timeout = 1.0     # Celery's hour, shortened on both sides for the test
    got = fetch_all(broker, queue, 1, timeout=15)
    assert [d.message_id for d in got] == [task_id] and got[0].decode(Codec()).args == [3, 4]
    broker.ack(got)
    assert not client.hexists(UNACKED, tag)


def test_only_the_holder_settles_a_message(make, raw, redis_url, queue):
    client, tags = raw
    send(redis_url, queue, "interop.add|[5, 5]|{}")
    first, second = make(lease_seconds=1), make(lease_seconds=30)
    first.visibility_timeout = second.visibility_timeout = 3600.0
    [d1] = fetch_all(first, queue, 1)
    tags.append(d1.token[0])
    # due in the index, or already restored: the index is one per database, and
    # any worker with Celery queues on it (another test run's) restores what is due
    assert until(lambda: (client.zscore(UNACKED_INDEX, d1.token[0]) or 0) < time.time() - 3600, 10)
    [d2] = fetch_all(second, queue, 1)                  # restored by greenq, held by the second
    assert d2.message_id == d1.message_id and d2.deliveries == 2
    first.ack([d1])
    first.dead_letter(d1, "stale")
    first.requeue([d1])
    assert client.hexists(UNACKED, d2.token[0]) and client.llen(queue) == 0
    second.ack([d2])
    assert not client.hexists(UNACKED, d2.token[0])


def _element(headers, body, content_type="application/json", tag="t"):
    return json.dumps({"body": base64.b64encode(body).decode(), "content-type": content_type,
                       "content-encoding": "utf-8", "headers": headers,
                       "properties": {"body_encoding": "base64", "delivery_tag": tag,
                                      "delivery_info": {"exchange": "", "routing_key": "x"}}})


def test_malformed_elements_are_dead_lettered_with_a_reason(make, raw, queue, redis_prefix):
    client, tags = raw
    stamp = redis_prefix[-6:]
    good = protocol.encode_redis(protocol.CeleryMessage("interop.add", [1, 2], {}, id="good-" + stamp,
                                                        queue=queue))
    bad_lists = [b"not json at all", b'{"properties": {}}', b"[1, 2, 3]"]
    bad_decoded = [
        (_element({"task": "interop.add", "id": "b1"}, b"[[], {}]", tag="b1-" + stamp), "[args, kwargs, embed]"),
        (_element({"task": "interop.add", "id": "b2"}, b"\x80\x04K\x01.", "application/x-python-serialize",
                  tag="b2-" + stamp), "pickle"),
        (_element({"id": "b3"}, b"[[], {}, {}]", tag="b3-" + stamp), "protocol 1"),
        (_element({"task": "interop.add", "id": "b4", "eta": "soon"}, b"[[], {}, {}]", tag="b4-" + stamp),
         "ISO 8601"),
    ]
    for item in [*bad_lists, *(e for e, _ in bad_decoded), good]:
        client.lpush(queue, item)
    broker = make()
    got = fetch_all(broker, queue, 5)
    tags += [d.token[0] for d in got]
    codec = Codec()
    runnable = []
    for d in got:
        try:
            runnable.append(d.decode(codec))
        except protocol.CeleryMessageError as exc:
            broker.dead_letter(d, f"undecodable: {exc}")
    assert [m.id for m in runnable] == ["good-" + stamp]
    broker.ack([d for d in got if d.message_id == "good-" + stamp])
    dead = [x for x in broker.dlq_list(100) if x.queue == queue]
    reasons = [x.reason for x in dead]
    assert len(dead) == len(bad_lists) + len(bad_decoded), reasons
    assert sum("not a kombu message" in r for r in reasons) == len(bad_lists)
    for _, why in bad_decoded:
        assert any(why in r for r in reasons), (why, reasons)
    assert {x.body for x in dead} >= set(bad_lists)       # the dead letter keeps the element
    assert client.llen(queue) == 0 and not any(client.hexists(UNACKED, t) for t in tags)
    assert [s.dead for s in broker.queue_stats([queue])] == [len(dead)]
    # greenq dlq requeue: back on the Celery queue's list, as they were
    [pickled] = [x for x in dead if "pickle" in x.reason]
    assert broker.dlq_requeue([pickled.id]) == 1 and client.lrange(queue, 0, -1) == [pickled.body]
    assert broker.dlq_requeue() == len(dead) - 1 and client.llen(queue) == len(dead)
    assert [x for x in broker.dlq_list(100) if x.queue == queue] == []


def test_a_sent_eta_goes_on_the_list_at_once_as_celery_sends_it(make, raw, queue):
    client, tags = raw
    broker = make()
    msg = protocol.CeleryMessage("interop.add", [1, 1], {}, id="sent-" + queue, queue=queue, eta=time.time() + 60)
    out = Codec(celery_queues=[queue]).outgoing(msg)
    assert out.eta is None
    broker.publish(out)
    [d] = fetch_all(broker, queue, 1)
    tags.append(d.token[0])
    assert d.decode(Codec()).eta == pytest.approx(msg.eta, abs=1e-3)      # a worker holds it back (defer)
    broker.ack([d])


def test_a_deferred_eta_waits_in_kombus_unacked_until_due(make, raw, queue):
    client, tags = raw
    broker = make()
    codec = Codec(celery_queues=[queue])
    msg = protocol.CeleryMessage("interop.add", [1, 1], {}, id="eta-" + queue, queue=queue, eta=time.time() + 1.5)
    out = codec.outgoing(msg, sent=False)       # what a worker that received it early sends back
    tag = protocol.delivery_tag(out.body)
    tags.append(tag)
    broker.publish(out)
    assert client.llen(queue) == 0 and client.hexists(UNACKED, tag)
    assert client.zscore(UNACKED_INDEX, tag) == pytest.approx(msg.eta - 3600, abs=0.01)
    assert [s.delayed for s in broker.queue_stats([queue])] == [1]
    # kombu's unacked_index is one per database, shared by every queue (and by
    # the other test runs beside this one): next_due is the earliest of all,
    # so no later than this message's due time
    due = broker.next_due([queue])
    assert due is not None and due <= msg.eta + 0.01
    got = fetch_all(broker, queue, 1, timeout=10)
    assert time.time() >= msg.eta - 0.01 and [d.message_id for d in got] == [msg.id]
    back = got[0].decode(Codec())
    assert back.eta == pytest.approx(msg.eta, abs=1e-3) and back.args == [1, 1]
    broker.ack(got)


def test_a_native_queue_beside_a_celery_queue_keeps_greenqs_format(make, raw, queue, redis_prefix):
    client, tags = raw
    broker = make()
    broker.declare([queue, "native"])
    codec = Codec(celery_queues=[queue])
    from greenq.message import TaskMessage
    broker.publish_many([codec.outgoing(TaskMessage("interop.add", [1], {}, queue="native")),
                         codec.outgoing(TaskMessage("interop.add", [2], {}, queue=queue, priority=4))])
    assert client.llen(list_key(queue, 4)) == 1 and list_key(queue, 4) == queue + SEP + "3"
    got = fetch_all(broker, queue, 1) + fetch_all(broker, "native", 1)
    tags += [d.token[0] for d in got if isinstance(d, CeleryDelivery)]
    assert sorted(tuple(d.decode(codec).args) for d in got) == [(1,), (2,)]
    assert [type(d) is CeleryDelivery for d in got] == [True, False]
    broker.ack(got)
    assert [s.ready + s.held for s in broker.queue_stats([queue, "native"])] == [0, 0]


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_scalars = st.none() | st.booleans() | st.integers(-(2 ** 70), 2 ** 70) | st.floats() | st.text(max_size=12)
_json = st.recursive(_scalars, lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3),
                     max_leaves=10)
_headers = st.dictionaries(st.sampled_from(["task", "id", "eta", "expires", "retries", "timelimit", "group",
                                            "ignore_result"]), _json) | st.just({"task": "interop.add", "id": "x"})


@st.composite
def _elements(draw):
    kind = draw(st.sampled_from(["bytes", "json", "envelope", "good"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "json":
        return json.dumps(draw(_json)).encode()
    if kind == "good":
        return protocol.encode_redis(protocol.CeleryMessage("interop.add", draw(st.lists(_scalars.filter(
            lambda v: not isinstance(v, float)), max_size=3)), {}, queue="q"))
    body = draw(st.binary(max_size=60) | _json.map(lambda v: json.dumps(v).encode()))
    return json.dumps({"body": base64.b64encode(body).decode(), "content-type": draw(st.sampled_from(
        ["application/json", "application/x-msgpack", "application/x-python-serialize", "text/x"])),
        "content-encoding": "utf-8", "headers": draw(_headers),
        "properties": {"body_encoding": "base64", "delivery_tag": draw(st.uuids()).hex,
                       "priority": draw(_json)}}).encode()


_COUNTER = iter(range(10 ** 9))


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(st.lists(_elements(), min_size=1, max_size=12))
def test_whatever_is_written_to_a_celery_queue_is_run_or_dead_lettered(make, raw, queue, elements):
    client, tags = raw
    name = f"{queue}-{next(_COUNTER)}"
    broker = make()
    broker.celery_queues = frozenset([name])
    for item in elements:
        client.lpush(name, item)
    got = []
    while True:                         # everything comes out at once, or is dead-lettered by the script
        batch = broker.fetch([name], 100, 0.05)
        if not batch:
            break
        got += batch
    tags += [d.token[0] for d in got]
    runnable, dead = [], 0
    for d in got:
        try:
            runnable.append(d.decode(Codec()))
        except protocol.CeleryMessageError as exc:
            broker.dead_letter(d, f"undecodable: {exc}")
            dead += 1
    broker.ack([d for d in got])
    dlq = [x for x in broker.dlq_list(1000) if x.queue == name]
    by_script = [x for x in dlq if not x.message_id]     # not even a kombu message: moved by the fetch script
    assert len(got) + len(by_script) == len(elements)     # nothing lost
    assert all(r.reason.startswith("not a kombu message") for r in by_script)
    if len({d.token[0] for d in got}) == len(got):        # (a tag written twice is one unacked entry)
        assert len(dlq) - len(by_script) == dead
    assert all(isinstance(m.task, str) and isinstance(m.args, list) for m in runnable)
    assert all(d.reason for d in dlq)
    assert client.llen(name) == 0 and not any(client.hexists(UNACKED, d.token[0]) for d in got)



KOMBU_RESTORE_WITH = """
import sys
from kombu import Connection
with Connection(sys.argv[1], transport_options={"visibility_timeout": float(sys.argv[2])}) as conn:
    conn.default_channel.qos.restore_visible(num=1000)
"""


def test_celery_visibility_timeout_is_the_one_kombu_restores_by(redis_url):
    """``[greenq] celery_visibility_timeout`` set to Celery's (5 s): a Celery
    worker with that timeout leaves what greenq holds alone until greenq's
    lease runs out; a greenq worker left at kombu's default hour has what it
    holds handed out by that Celery worker at once (why both must agree).
    On a private redis-server: kombu's unacked index is one per database, and
    a 5-s restore on the shared one would hand out other tests' messages."""
    import redis

    from tests.clusters.servers import REDIS_SERVER, Servers, free_ports
    from tests.conftest import _missing
    if REDIS_SERVER is None:
        _missing("redis-server (a private one)")
    servers = Servers()
    brokers = []
    try:
        [port] = free_ports(1)
        servers.start(port)
        url, queue = f"redis://127.0.0.1:{port}/0", "vt-celery"
        client = redis.Redis.from_url(url)
        send(url, queue, "interop.add|[6, 6]|{}", "interop.add|[7, 7]|{}")

        def broker(**overrides):
            brokers.append(CeleryRedisBroker(url, make_config(broker_url=url, key_prefix="vt", celery_queues=queue,
                                                              lease_seconds=30, **overrides)))
            return brokers[-1]
        agreeing = broker(celery_visibility_timeout=5)
        assert agreeing.visibility_timeout == 5
        [d] = fetch_all(agreeing, queue, 1)
        assert client.zscore(UNACKED_INDEX, d.token[0]) == pytest.approx(time.time() + 30 - 5, abs=5)
        run_celery(KOMBU_RESTORE_WITH, url, "5")
        assert client.hexists(UNACKED, d.token[0]) and client.llen(queue) == 1     # still greenq's
        default = broker()
        [e] = fetch_all(default, queue, 1)
        assert client.llen(queue) == 0
        run_celery(KOMBU_RESTORE_WITH, url, "5")
        assert not client.hexists(UNACKED, e.token[0]) and client.llen(queue) == 1  # handed out at once
        assert client.hexists(UNACKED, d.token[0])
        client.close()
    finally:
        for b in brokers:
            b.close()
        servers.stop()
