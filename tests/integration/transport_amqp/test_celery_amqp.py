"""Celery queues on RabbitMQ (greenq/transports/amqp/celery_broker.py):
messages written by a real Celery 5 client into RabbitMQ, consumed by greenq
with every header; Celery's own declarations of the queue (and greenq's
after Celery's) agree, classic and quorum; greenq's messages read by a real
kombu consumer as Celery's; native delayed delivery (Celery 5.5+) honoured;
copies published again keep Celery's properties; malformed raw publishes
dead-lettered with a reason.  Every test uses queues of its own (Celery's
queues keep their plain names), deleted at the end with their exchanges."""
from __future__ import annotations

import json
import time
import uuid

import amqp
import pytest

from greenq.brokers import make_broker
from greenq.celery import protocol
from greenq.message import Codec
from greenq.transports.amqp.celery_broker import DELIVERY_EXCHANGE, CeleryDelivery, level_name
from greenq.transports.amqp.common import connection_params
from tests.conftest import delete_amqp_names, make_config
from tests.fixtures.celery.clients import run_celery

pytestmark = pytest.mark.amqp

SEND = """
import json, sys
from celery import Celery
from kombu import Exchange, Queue
app = Celery("t", broker=sys.argv[1])
conf = json.loads(sys.argv[3])
app.conf.update(conf)
for spec in sys.argv[4:]:
    task, args, options = spec.split("|")
    r = app.send_task(task, args=eval(args), **({"queue": sys.argv[2]} if "task_default_queue" not in conf
                                                else {}), **eval(options))
    print(r.id)
"""

KOMBU_READ = """
import json, sys
from kombu import Connection
with Connection(sys.argv[1]) as conn:
    channel = conn.default_channel
    for _ in range(int(sys.argv[3])):
        m = channel.basic_get(sys.argv[2], no_ack=True)
        m = channel.message_to_python(m)
        print(json.dumps({"headers": m.headers, "payload": m.decode(), "content_type": m.content_type,
                          "properties": {k: v for k, v in m.properties.items() if k != "application_headers"},
                          "exchange": m.delivery_info["exchange"],
                          "routing_key": m.delivery_info["routing_key"]}, default=str))
"""


CELERY_WORKER_DECLARES = """
import sys
from kombu import Connection, Exchange, Queue
try:
    from kombu.transport.native_delayed_delivery import (bind_queue_to_native_delayed_delivery_exchange,
                                                         declare_native_delayed_delivery_exchanges_and_queues)
except ImportError:                  # kombu < 5.5, Celery < 5.5
    print("no native delayed delivery")
    sys.exit(0)
name = sys.argv[2]
with Connection(sys.argv[1]) as conn:
    declare_native_delayed_delivery_exchanges_and_queues(conn, "quorum")
    queue = Queue(name, Exchange(name, type="topic"), routing_key=name, queue_arguments={"x-queue-type": "quorum"})
    queue(conn.default_channel).declare()
    bind_queue_to_native_delayed_delivery_exchange(conn, queue)
print("declared")
"""


@pytest.fixture
def env(amqp_url):
    made, names = [], []

    class Env:
        url = amqp_url

        @staticmethod
        def queue(name="celery"):
            names.append(f"gqc-{uuid.uuid4().hex[:8]}-{name}")
            return names[-1]

        @staticmethod
        def broker(queue, **settings):
            cfg = make_config(broker_url=amqp_url, celery_queues=queue, **settings)
            b = make_broker(amqp_url, cfg)
            made.append(b)
            return b

    yield Env
    for b in made:
        b.close()
    delete_amqp_names(amqp_url, names, names)


def send(env, queue, *specs, conf=None):
    return run_celery(SEND, env.url, queue, json.dumps(conf or {}), *specs).split()


def fetch_all(broker, queue, want, timeout=15.0, also=()):
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        got += broker.fetch([queue, *also], want - len(got), 0.5)
    return got


def raw_channel(url):
    conn = amqp.Connection(**connection_params(url))
    conn.connect()
    return conn, conn.channel()


def test_a_celery_clients_messages_are_consumed_with_every_header(env):
    queue = env.queue()
    broker = env.broker(queue)
    broker.declare([queue])                 # greenq first: Celery's client declares the same after it
    ids = send(env, queue, "interop.add|[2, 3]|{}",
               "interop.add|[1, 1]|{'countdown': 30, 'expires': 600, 'time_limit': 20, 'soft_time_limit': 10}",
               "interop.add|[4, 5]|{'retries': 2, 'ignore_result': True}",
               "interop.add|[6, 7]|{'link': __import__('celery').signature('interop.echo'), "
               "'link_error': __import__('celery').signature('interop.echo')}")
    got = fetch_all(broker, queue, 4)
    assert sorted(d.message_id for d in got) == sorted(ids)
    assert all(isinstance(d, CeleryDelivery) and d.deliveries == 1 and d.error is None for d in got)
    msgs = {m.id: m for m in (d.decode(Codec()) for d in got)}
    plain, timed, retried, linked = (msgs[i] for i in ids)
    assert (plain.task, plain.args, plain.kwargs, plain.queue) == ("interop.add", [2, 3], {}, queue)
    assert plain.root_id == plain.id and plain.parent_id is None and plain.retries == 0
    assert plain.headers["argsrepr"] == "[2, 3]" and plain.headers["origin"] and plain.serializer == "json"
    assert plain.properties["correlation_id"] == plain.id
    assert plain.properties["delivery_info"] == {"exchange": "", "routing_key": queue}
    assert timed.eta == pytest.approx(time.time() + 30, abs=10)       # classic queue: on it at once
    assert timed.expires == pytest.approx(time.time() + 600, abs=10)
    assert (timed.time_limit, timed.soft_time_limit) == (20, 10)
    assert retried.retries == 2 and retried.ignore_result is True
    assert [s["task"] for s in linked.link] == ["interop.echo"]
    assert [s["task"] for s in linked.link_error] == ["interop.echo"]
    broker.ack(got)
    assert [s.ready for s in broker.queue_stats([queue])] == [0]


def test_greenq_sends_protocol_2_a_kombu_consumer_reads_as_celerys(env):
    queue = env.queue("reports")
    broker = env.broker(queue)
    send(env, queue, "interop.add|[0, 0]|{}")     # Celery first: greenq declares the same after it
    codec = Codec(celery_queues=[queue])
    msg = protocol.CeleryMessage("interop.add", [2, 3], {"k": "v"}, id=f"gq-{uuid.uuid4().hex}", queue=queue,
                                 priority=0, eta=time.time() + 30)
    broker.publish_many([codec.outgoing(msg)])
    lines = run_celery(KOMBU_READ, env.url, queue, "2").splitlines()
    first, ours = (json.loads(line) for line in lines)
    assert first["headers"]["task"] == "interop.add" and first["payload"][0] == [0, 0]
    assert ours["headers"]["task"] == "interop.add" and ours["headers"]["id"] == msg.id
    assert ours["payload"] == [[2, 3], {"k": "v"}, {"callbacks": None, "errbacks": None, "chain": None,
                                                   "chord": None}]
    assert ours["headers"]["eta"].startswith(time.strftime("%Y", time.gmtime()))   # on the queue, eta inside
    assert ours["content_type"] == "application/json" and ours["properties"]["correlation_id"] == msg.id
    assert (ours["exchange"], ours["routing_key"]) == ("", queue)     # routed as Celery's client does (direct)
    assert set(ours["headers"]) >= {"lang", "task", "id", "root_id", "parent_id", "group", "retries", "eta",
                                    "expires", "timelimit", "argsrepr", "kwargsrepr", "origin", "ignore_result"}


def test_copies_published_again_keep_celerys_message(env):
    queue = env.queue()
    broker = env.broker(queue)
    [task_id] = send(env, queue, "interop.add|[2, 3]|{}")
    [d] = fetch_all(broker, queue, 1)
    broker.requeue([d], started=False)                  # given back: a copy, the same count
    [d] = fetch_all(broker, queue, 1)
    assert d.deliveries == 1 and d.decode(Codec()).args == [2, 3]
    broker.requeue([d], started=True)                   # rejected: redelivered, republished, counted
    [d] = fetch_all(broker, queue, 1)
    m = d.decode(Codec())
    assert d.deliveries == 2 and (m.id, m.args, m.properties["correlation_id"]) == (task_id, [2, 3], task_id)
    # the worker defers a message before its eta: greenq's delay cascade, Celery's message at the end
    codec = Codec(celery_queues=[queue])
    m.eta = time.time() + 1.5
    broker.publish_many([codec.outgoing(m, sent=False)])
    broker.ack([d])
    [d] = fetch_all(broker, queue, 1)
    again = d.decode(Codec())
    assert time.time() >= m.eta - 0.1 and (again.id, again.args) == (task_id, [2, 3])
    broker.ack([d])
    lines = run_celery(KOMBU_READ, env.url, queue, "0")
    assert lines == ""


def test_a_quorum_queue_declared_as_celery_does_and_native_delayed_delivery(env):
    queue = env.queue("quorum")
    conf = {"task_default_queue": queue, "task_default_queue_type": "quorum",
            "task_default_exchange_type": "topic", "task_default_exchange": queue,
            "task_default_routing_key": queue}
    broker = env.broker(queue, amqp__celery_queue_type="quorum", amqp__celery_exchange_type="topic")
    broker.declare([queue])          # and the native delayed delivery topology, as Celery's worker does
    # what a Celery worker declares at start (its DelayedDelivery bootstep) agrees with greenq's
    declared = run_celery(CELERY_WORKER_DECLARES, env.url, queue).strip()
    if declared == "no native delayed delivery":
        pytest.skip("the Celery under test (GREENQ_TEST_CELERY_PYTHON) is older than 5.5: no native delayed "
                    "delivery, no task_default_queue_type")
    assert declared == "declared"
    native = env.queue("native")     # a greenq queue beside: no global QoS (quorum queues refuse it)
    assert broker.fetch([queue, native], 1, 0.2) == []
    sent = time.time()
    [now_id, later_id] = send(env, queue, "interop.add|[1, 2]|{}", "interop.add|[3, 4]|{'countdown': 2}",
                              conf=conf)
    conn, ch = raw_channel(env.url)
    try:
        first = fetch_all(broker, queue, 1, also=[native])
        assert [d.message_id for d in first] == [now_id]
        # the countdown went through celery_delayed_*: not on the queue before its time
        assert ch.queue_declare(queue, passive=True).message_count == 0
        [late] = fetch_all(broker, queue, 1, also=[native])
        assert late.message_id == later_id and time.time() - sent >= 1.0
        assert late.decode(Codec()).eta == pytest.approx(sent + 2, abs=3)
        broker.ack(first + [late])
        ch.exchange_declare(DELIVERY_EXCHANGE, "topic", durable=True, passive=True)
        ch.queue_declare(level_name(27), passive=True)
        # a greenq client's countdown takes the same road (the eta header read on the way)
        codec = Codec(celery_queues=[queue])
        msg = protocol.CeleryMessage("interop.add", [5, 6], {}, id=f"gq-{uuid.uuid4().hex}", queue=queue,
                                     eta=time.time() + 2)
        broker.publish_many([codec.outgoing(msg)])
        assert ch.queue_declare(queue, passive=True).message_count == 0
        [d] = fetch_all(broker, queue, 1, also=[native])
        assert d.message_id == msg.id and time.time() >= msg.eta - 1.5
        # and so does a message the worker defers (it came before its eta)
        m = d.decode(Codec())
        m.eta = time.time() + 2
        broker.publish_many([codec.outgoing(m, sent=False)])
        broker.ack([d])
        assert ch.queue_declare(queue, passive=True).message_count == 0
        [d] = fetch_all(broker, queue, 1, also=[native])
        assert d.message_id == msg.id and time.time() >= m.eta - 1.5 and d.decode(Codec()).args == [5, 6]
        broker.ack([d])
    finally:
        conn.close()
        levels = [level_name(i) for i in range(28)]        # kombu's shared topology: ours to remove here
        delete_amqp_names(env.url, levels, levels + [DELIVERY_EXCHANGE])


def test_a_queue_celery_declared_otherwise_is_a_clear_error(env):
    queue = env.queue()
    send(env, queue, "interop.add|[1, 1]|{}", conf={"task_queue_max_priority": 5})
    broker = env.broker(queue)
    from greenq.exceptions import BrokerError
    with pytest.raises(BrokerError, match="celery_max_priority"):
        broker.declare([queue])
    broker = env.broker(queue, amqp__celery_max_priority=5)
    broker.declare([queue])
    assert len(fetch_all(broker, queue, 1)) == 1


def test_rpc_replies_in_celerys_form_go_to_the_messages_reply_to(env, amqp_url):
    """Without a consumer channel (not in a worker) they go through the
    publisher pool; the reply queue learns nothing until a ready state."""
    from greenq.backends import make_backend
    from greenq.celery.results import worker_record
    from greenq.transports.amqp import celery_rpc
    reply = env.queue("reply")
    conn, ch = raw_channel(amqp_url)
    try:
        ch.queue_declare(reply, durable=False, auto_delete=False)
        backend = make_backend("rpc://", make_config(broker_url=amqp_url))
        assert isinstance(backend, celery_rpc.CeleryRPCBackend)
        msg = protocol.CeleryMessage("interop.add", [1, 2], {}, id=f"t-{uuid.uuid4().hex}", queue="q")
        celery_rpc.remember(msg.id, reply, "corr-" + msg.id)
        backend.store_celery([worker_record(msg, "retry", None, ValueError("again"), None, None)])
        backend.store_celery([worker_record(msg, "success", 3, None, None, None)])
        backend.store_celery([worker_record(msg, "success", 4, None, None, None)])   # forgotten: goes nowhere
        backend.close()
        got = [ch.basic_get(reply, no_ack=True) for _ in range(3)]
        assert got[2] is None
        states = [json.loads(m.body)["status"] for m in got[:2]]
        assert states == ["RETRY", "SUCCESS"] and json.loads(got[1].body)["result"] == 3
        for m in got[:2]:
            assert m.properties["correlation_id"] == "corr-" + msg.id
            assert (m.properties["content_type"], m.properties["delivery_mode"]) == ("application/json", 1)
    finally:
        ch.queue_delete(reply)
        conn.close()


def _publish(ch, queue, body, headers, **props):
    ch.basic_publish(amqp.Message(body, application_headers=headers, **props), queue, queue)


def test_malformed_messages_are_dead_lettered_with_a_reason(env):
    queue = env.queue("bad")
    broker = env.broker(queue)
    broker.declare([queue])
    conn, ch = raw_channel(env.url)
    stamp = uuid.uuid4().hex[:6]
    js = {"content_type": "application/json", "content_encoding": "utf-8"}
    cases = [
        (b"[[], {}, {}]", {"task": "interop.add", "id": f"a-{stamp}"}, {}, "no content_type"),
        (b"not json", {"task": "interop.add", "id": f"b-{stamp}"}, js, "does not decode"),
        (b"[[], {}]", {"task": "interop.add", "id": f"c-{stamp}"}, js, "[args, kwargs, embed]"),
        (b"\x80\x04K\x01.", {"task": "interop.add", "id": f"d-{stamp}"},
         {"content_type": "application/x-python-serialize", "content_encoding": "binary"}, "pickle"),
        (b"[[], {}, {}]", {"id": f"e-{stamp}"}, js, "protocol 1"),
        (b"[[], {}, {}]", {"task": "interop.add", "id": f"f-{stamp}", "eta": "soon"}, js, "ISO 8601"),
        (b"[[], {}, {}]", {"task": "interop.add", "id": f"g-{stamp}", "timelimit": "x"}, js, "timelimit"),
    ]
    try:
        for body, headers, props, _ in cases:
            _publish(ch, queue, body, headers, **props)
        _publish(ch, queue, b"[[1, 2], {}, {}]", {"task": "interop.add", "id": f"ok-{stamp}"}, **js)
    finally:
        conn.close()
    got = fetch_all(broker, queue, len(cases) + 1)
    runnable = []
    for d in got:
        try:
            runnable.append(d.decode(Codec()))
        except protocol.CeleryMessageError as exc:
            broker.dead_letter(d, f"undecodable: {exc}")
    assert [m.id for m in runnable] == [f"ok-{stamp}"]
    broker.ack([d for d in got if d.message_id == f"ok-{stamp}"])
    dead = [x for x in broker.dlq_list(100) if x.queue == queue]
    assert sorted(x.message_id for x in dead) == sorted(h["id"] for _, h, _, _ in cases)
    for _, headers, _, why in cases:
        [x] = [x for x in dead if x.message_id == headers["id"]]
        assert why in x.reason, (why, x.reason)
    # greenq dlq requeue: back on the Celery queue as Celery's message
    [pickled] = [x for x in dead if "pickle" in x.reason]
    assert broker.dlq_requeue([pickled.id]) == 1
    [d] = fetch_all(broker, queue, 1)
    assert d.message_id == f"d-{stamp}" and isinstance(d, CeleryDelivery)
    with pytest.raises(protocol.CeleryMessageError, match="pickle"):
        d.decode(Codec())
    broker.ack([d])


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_scalars = (st.none() | st.booleans() | st.integers(-2 ** 31, 2 ** 31) | st.text(max_size=12)
            | st.binary(max_size=8))
_tables = st.dictionaries(st.sampled_from(["task", "id", "eta", "expires", "retries", "timelimit", "group",
                                           "ignore_result", "argsrepr", "x-other"]),
                          st.recursive(_scalars, lambda c: st.lists(c, max_size=3)
                                       | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=6),
                          max_size=6)


@pytest.fixture(scope="module")
def live(amqp_url):
    from greenq.brokers import make_broker as make
    name = f"gqc-{uuid.uuid4().hex[:8]}-prop"
    broker = make(amqp_url, make_config(broker_url=amqp_url, celery_queues=name))
    broker.declare([name])
    conn, ch = raw_channel(amqp_url)
    yield name, broker, ch
    conn.close()
    broker.close()
    delete_amqp_names(amqp_url, [name], [name])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(table=_tables, body=st.binary(max_size=40) | st.sampled_from([b"[[1], {}, {}]", b"[[], {}, null]"]),
       content_type=st.none() | st.sampled_from(["application/json", "application/x-msgpack", "text/x"]))
def test_whatever_is_published_to_a_celery_queue_is_run_or_dead_lettered(live, table, body, content_type):
    """Raw publishes of arbitrary headers, bodies and content types: each one
    is handed out (nothing lost, the consumer loop never stops) and either
    decodes or says why, and is settled."""
    name, broker, ch = live
    props = {"content_type": content_type, "content_encoding": "utf-8"} if content_type else {}
    ch.basic_publish(amqp.Message(body, application_headers=table, **props), "", name)
    [d] = fetch_all(broker, name, 1, timeout=10)
    assert isinstance(d, CeleryDelivery) and d.message_id
    try:
        msg = d.decode(Codec())
    except protocol.CeleryMessageError as exc:
        broker.dead_letter(d, f"undecodable: {exc}")
    else:
        assert msg.task == table["task"] and msg.queue == name
        broker.ack([d])
    assert broker.fetch([name], 1, 0.05) == []
