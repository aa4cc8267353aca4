"""RabbitMQ specifics beyond the shared suite: topology, the delay cascade,
confirms, the channel pool, heartbeats, recovery after the broker drops every
connection, rpc:// results and revocations, and green drivers.

Runs in the run's vhost (the ``amqp_url`` fixture, which may be shared) under
the run's key_prefix (``AMQP_PREFIX``); ``rabbitmqctl`` is used only with
``-p <that vhost>``, to list queues or close this process's own connections,
and a test that needs it skips when it does not answer.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid

import pytest

from greenq.backends import backend_url_for, make_backend
from greenq.backends.base import Record
from greenq.brokers import Outgoing, make_broker
from greenq.exceptions import BrokerError, ConfigError
from tests.conftest import AMQP_PREFIX, CHILD_PREFIX, close_connections, ctl_or_skip, delete_queues, make_config, \
    rabbitmqctl, until, vhost_of

pytestmark = pytest.mark.amqp
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def queues_of(url: str) -> dict:
    ctl_or_skip("list the vhost's queues")
    rows = json.loads(rabbitmqctl("list_queues", "--formatter", "json", "-p", vhost_of(url),
                                  "name", "durable", "arguments", "type"))
    return {r["name"]: dict(r, arguments={k: v for k, _, v in r["arguments"]}) for r in rows}


@pytest.fixture
def env(amqp_url):
    made, queues = [], []

    class Env:
        url = amqp_url

        @staticmethod
        def queue(name: str = "q") -> str:
            queues.append(f"gqa-{uuid.uuid4().hex[:8]}-{name}")
            return queues[-1]

        @staticmethod
        def broker(**settings):
            b = make_broker(amqp_url, make_config(broker_url=amqp_url, **settings))
            made.append(b)
            return b

        @staticmethod
        def backend(**settings):
            b = make_backend("rpc://", make_config(broker_url=amqp_url, **settings))
            made.append(b)
            return b

    yield Env
    for b in made:
        b.close()
    delete_queues(amqp_url, queues)


def out(queue, body=b"x", priority=0, eta=None, message_id=None):
    return Outgoing(queue, body, message_id or uuid.uuid4().hex, priority, eta)


def drain(broker, queues, expected, timeout=10.0, ack=True):
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < expected and time.monotonic() < deadline:
        batch = broker.fetch(queues, 100, 0.2)
        if ack and batch:
            broker.ack(batch)
        got.extend(batch)
    return got


# -- topology ---------------------------------------------------------------------

def test_topology_durable_queues_priorities_dead_letters_and_delay_cascade(env):
    q = env.queue()
    client = env.broker()
    client.publish(out(q))
    client.publish(out(q, eta=time.time() + 30))
    queues, p = queues_of(env.url), AMQP_PREFIX
    assert queues[f"{p}.{q}"]["durable"] and queues[f"{p}.{q}"]["type"] == "classic"
    assert queues[f"{p}.{q}"]["arguments"] == {"x-max-priority": 9, "x-dead-letter-exchange": f"{p}.dlx"}
    assert queues[f"{p}.dlq"]["durable"]
    for level in (0, 1, 14, 31):
        cascade = queues[f"{p}.delay.{q}.{level}"]
        assert cascade["durable"]
        assert cascade["arguments"]["x-message-ttl"] == 2 ** level
    assert queues[f"{p}.delay.{q}.0"]["arguments"]["x-dead-letter-routing-key"] == f"{p}.{q}"
    assert queues[f"{p}.delay.{q}.5"]["arguments"]["x-dead-letter-exchange"] == f"{p}.delay.{q}.4"


def test_quorum_queues_count_deliveries_themselves(env):
    q = env.queue()
    broker = env.broker(amqp__queue_type="quorum")
    broker.publish(out(q, b"qq", priority=5, message_id="qq"))
    [d] = drain(broker, [q], 1, ack=False)
    assert (d.body, d.deliveries) == (b"qq", 1)
    broker.requeue([d])
    [again] = drain(broker, [q], 1, ack=False)
    assert (again.message_id, again.deliveries) == ("qq", 2)
    broker.ack([again])
    info = queues_of(env.url)[f"{AMQP_PREFIX}.{q}"]
    assert info["type"] == "quorum" and "x-max-priority" not in info["arguments"]


def test_mismatched_queue_arguments_are_explained(env):
    q = env.queue()
    env.broker().publish(out(q))
    other = env.broker(amqp__max_priority=3)
    with pytest.raises(BrokerError, match="other arguments"):
        other.publish(out(q))


# -- delayed delivery -------------------------------------------------------------

def test_delays_through_ttl_queues_without_head_of_line_blocking(env):
    q = env.queue()
    client, consumer = env.broker(), env.broker()
    now = time.time()
    # the long delay first: per-message TTL on one queue would hold the short ones up behind it
    client.publish_many([out(q, message_id="long", eta=now + 30),
                         out(q, message_id="1.2s", eta=now + 1.2),
                         out(q, message_id="0.3s", eta=now + 0.3)])
    arrived = []
    deadline = time.monotonic() + 5
    while len(arrived) < 2 and time.monotonic() < deadline:
        for d in consumer.fetch([q], 10, 0.1):
            arrived.append((d.message_id, time.time() - now))
            consumer.ack([d])
    # in eta order, never early, and within the loop's 5 s: not held up behind the 30 s one
    assert [name for name, _ in arrived] == ["0.3s", "1.2s"]
    assert 0.3 <= arrived[0][1] and 1.2 <= arrived[1][1]
    [stats] = consumer.queue_stats([q])
    assert stats.delayed == 1
    assert abs(consumer.next_due([q]) - (now + 30)) < 0.01
    assert consumer.purge(q) == 1
    assert until(lambda: consumer.next_due([q]) is None), "a purged message still counts as due"


def test_delay_beyond_the_cascade_goes_round_again(env, monkeypatch):
    from greenq.transports.amqp import common as amqp_common
    monkeypatch.setattr(amqp_common, "MAX_DELAY_MS", 200)   # pretend 0.2 s is ~49 days
    monkeypatch.setattr("greenq.transports.amqp.consumer.EARLY", 0.01)
    q = env.queue()
    client, consumer = env.broker(), env.broker()
    start = time.time()
    client.publish(out(q, message_id="far", eta=start + 1.5))
    [d] = drain(consumer, [q], 1, timeout=5)
    assert d.message_id == "far" and time.time() - start >= 1.45 and d.deliveries == 1


# -- publishing ---------------------------------------------------------------------

@pytest.mark.parametrize("confirm", [True, False])
def test_publish_with_and_without_confirms(env, confirm):
    q = env.queue()
    client = env.broker(amqp__confirm_publish=confirm)
    client.publish_many([out(q, str(i).encode()) for i in range(500)])
    client.publish(out(q, b"last"))
    with client.pool.publisher() as pub:
        assert pub.confirm is confirm
    assert len(drain(env.broker(), [q], 501)) == 501


def test_a_queue_deleted_behind_our_back_is_declared_again(env):
    q = env.queue()
    client = env.broker()
    client.publish(out(q, message_id="before"))
    with client.pool.publisher() as pub:
        pub.channel.queue_delete(f"{AMQP_PREFIX}.{q}")
    client.publish(out(q, message_id="after"))   # returned as unroutable, declared, sent again
    assert [d.message_id for d in drain(env.broker(), [q], 1)] == ["after"]


def test_channel_pool_is_thread_safe_and_bounded(env):
    q = env.queue()
    client = env.broker()
    sent = []

    def publish(n):
        for i in range(100):
            m = out(q, message_id=f"{n}-{i}")
            client.publish(m)
            sent.append(m.message_id)

    threads = [threading.Thread(target=publish, args=(n,)) for n in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert client.pool._count <= client.pool.size == 10
    got = drain(env.broker(), [q], 3000, timeout=20)
    assert sorted(d.message_id for d in got) == sorted(sent)


def test_channel_pool_lends_one_publisher_at_a_time_without_a_lock(env):
    client = env.broker()
    client.publish(out(env.queue()))
    pool = client.pool
    with pool.publisher() as first:
        with pool.publisher() as second:   # the idle one is taken: another is made
            assert second is not first
    with pool.publisher() as again:        # a single caller gets the same one back
        assert again in (first, second)
    assert pool._waiters == 0 and pool._count == 2


def test_forked_child_publishes_on_its_own_connections(env):
    q = env.queue()
    client = env.broker()
    client.publish(out(q, message_id="parent-1"))
    with client.pool.publisher() as pub:
        parent_conn = pub.conn
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            client.publish(out(q, message_id="child"))
            with client.pool.publisher() as pub:
                code = 0 if pub.conn is not parent_conn else 2
        finally:
            os._exit(code)
    assert os.waitpid(pid, 0)[1] == 0
    client.publish(out(q, message_id="parent-2"))   # the parent's connection is untouched
    with client.pool.publisher() as pub:
        assert pub.conn is parent_conn
    got = drain(env.broker(), [q], 3)
    assert sorted(d.message_id for d in got) == ["child", "parent-1", "parent-2"]


def test_consumer_reads_bodies_of_every_size(env):
    q = env.queue()
    client = env.broker()
    bodies = [b"", b"x", b"y" * 131064, b"z" * 131065, bytes(range(256)) * 2000]
    client.publish_many([out(q, body, priority=i % 3, message_id=f"b{i}") for i, body in enumerate(bodies)])
    consumer = env.broker()
    got = {d.message_id: d for d in drain(consumer, [q], len(bodies))}
    assert {m: got[m].body for m in got} == {f"b{i}": body for i, body in enumerate(bodies)}
    assert all(got[f"b{i}"].priority == i % 3 for i in range(len(bodies)))
    assert consumer._consumer.partial is None


def test_connections_are_not_aborted_after_a_second_of_flow_control(env):
    """py-amqp's default TCP_USER_TIMEOUT (1 s) aborted a publisher that
    RabbitMQ's flow control kept waiting, losing what it had written."""
    import socket as socket_module
    option = getattr(socket_module, "TCP_USER_TIMEOUT", None)
    if option is None:
        pytest.skip("no TCP_USER_TIMEOUT on this platform")
    client = env.broker()
    client.publish(out(env.queue()))
    with client.pool.publisher() as pub:
        sock = pub.conn.transport.sock
        assert sock.getsockopt(socket_module.IPPROTO_TCP, option) == 60000
        assert sock.getsockopt(socket_module.SOL_SOCKET, socket_module.SO_KEEPALIVE) == 1


def test_publish_frames_and_properties_are_py_amqps():
    import amqp
    from amqp import spec
    from amqp.method_framing import frame_writer
    from amqp.serialization import dumps
    from greenq.transports.amqp.publish import publish_frames
    from greenq.transports.amqp.wire import encode_properties, task_properties

    cases = [{"message_id": "abc", "delivery_mode": 2},
             {"message_id": "abc\u00e9", "delivery_mode": 2, "priority": 9,
              "application_headers": {"greenq-eta": 1.5, "greenq-deliveries": 3, "x": "y"}},
             {"correlation_id": "t1", "delivery_mode": 1, "type": "final"}, {},
             {"content_type": "application/json", "content_encoding": "utf-8", "reply_to": "r",
              "expiration": "100", "timestamp": 12345, "user_id": "guest", "app_id": "a",
              "cluster_id": "c", "message_id": "m"}]
    for props in cases:
        assert encode_properties(props) == amqp.Message(b"", **props)._serialize_properties()
    for priority in (0, 1, 9):
        props = {"message_id": "m-1", "delivery_mode": 2, **({"priority": priority} if priority else {})}
        assert task_properties("m-1", priority) == amqp.Message(b"", **props)._serialize_properties()
    written = []

    class Conn:
        frame_max = 131072
        bytes_sent = 0

        class transport:
            write = written.append
    write = frame_writer(Conn, Conn.transport)
    for body in (b"", b"x", b"y" * 131064, b"z" * 300000):
        msg = amqp.Message(body, message_id="m", delivery_mode=2)
        written.clear()
        write(1, 3, spec.Basic.Publish, dumps("Bssbb", (0, "", "q", True, False)), msg)
        assert b"".join(map(bytes, written)) == b"".join(publish_frames(3, 131072, msg, "", "q", True))


def test_password_never_in_errors(env, caplog):
    url = "amqp://guest:s3cret-pw@127.0.0.1:1/nowhere?connect_timeout=0.5"
    broker = make_broker(url, make_config(broker_url=url))
    with pytest.raises(BrokerError) as info:
        broker.publish(out("q"))
    assert "s3cret" not in str(info.value) and "***" in str(info.value)
    assert broker.fetch(["q"], 10, 0.5) == []   # reconnecting: fetch waits, never raises
    assert not broker.healthy
    broker.close()
    assert "s3cret" not in caplog.text


def test_amqps_url_options():
    from greenq.transports.amqp.common import connection_params
    params = connection_params("amqps://u:p%40ss@rabbit.example:5999/v%2Fh?cafile=/ca.pem&verify=true")
    assert (params["host"], params["userid"], params["password"], params["virtual_host"]) == \
        ("rabbit.example:5999", "u", "p@ss", "v/h")
    assert params["ssl"]["ca_certs"] == "/ca.pem" and params["ssl"]["server_hostname"] == "rabbit.example"
    assert connection_params("amqp://h//")["virtual_host"] == "/"
    assert connection_params("pyamqp://h")["host"] == "h:5672"
    assert connection_params("amqps://h")["host"] == "h:5671"
    with pytest.raises(ConfigError, match="unknown option"):
        connection_params("amqp://h/?hearbeat=5")


# -- consuming: heartbeats, delivery counts, recovery --------------------------------------

def test_heartbeats_flow_while_fetch_is_not_called(env, amqp_url):
    import amqp
    q = env.queue()
    consumer = env.broker(amqp__heartbeat=1)
    consumer.publish(out(q))
    drain(consumer, [q], 1)
    loop = consumer._consumer
    gen = loop.gen
    params = dict(consumer.params, heartbeat=1)
    silent = amqp.Connection(**params)   # the control: a connection nobody ticks
    silent.connect()
    time.sleep(3.5)   # more than 2 heartbeat intervals without a fetch (a full pool)
    with pytest.raises(Exception):
        silent.drain_events(timeout=1)   # RabbitMQ closed the silent one
    assert (loop.gen, loop.conn_state.failures, consumer.healthy) == (gen, 0, True)
    assert time.monotonic() - consumer.last_ok < 3.0   # a frame within RabbitMQ's 2-interval limit
    consumer.publish(out(q, message_id="after"))
    assert [d.message_id for d in drain(consumer, [q], 1)] == ["after"]


def test_classic_delivery_count_survives_consumer_crashes(env):
    q = env.queue()
    env.broker().publish(out(q, message_id="poison"))
    counts = []
    for _ in range(3):
        crashing = env.broker()
        [d] = drain(crashing, [q], 1, ack=False)
        counts.append(d.deliveries)
        crashing.close()   # dies holding it
    assert counts == [1, 2, 3]


def test_closed_connections_reconnect_and_lose_nothing(env):
    q = env.queue()
    client, consumer = env.broker(), env.broker()
    sent = [f"m{i}" for i in range(50)]
    client.publish_many([out(q, message_id=m) for m in sent])
    held = drain(consumer, [q], 5, ack=False)
    gen = consumer._consumer.gen
    ctl_or_skip("close this process's connections")
    assert close_connections(env.url, [os.getpid()], "greenq test: recovery") >= 2
    consumer.ack(held)   # from the dead connection: dropped, never raised
    client.publish(out(q, message_id="after"))   # the pool reconnects by itself
    got = drain(consumer, [q], 51, timeout=15)
    assert sorted(d.message_id for d in got) == sorted(sent + ["after"])
    assert {d.deliveries for d in got if d.message_id in {h.message_id for h in held}} == {2}
    assert consumer._consumer.gen > gen and consumer.healthy
    assert consumer.fetch([q], 10, 0.3) == []


class Outage:
    """A TCP forwarder to RabbitMQ that can go away (every connection dropped,
    new ones refused) and come back on the same port: a broker restart as the
    clients see it."""

    def __init__(self, target=("127.0.0.1", 5672)):
        import socket
        self.target = target
        probe = socket.socket()
        probe.bind(("127.0.0.1", 0))
        self.port = probe.getsockname()[1]
        probe.close()
        self.socks = []
        self.up()

    def up(self):
        import socket
        self.server = socket.socket()
        self.server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.server.bind(("127.0.0.1", self.port))
        self.server.listen(50)
        threading.Thread(target=self._accept, args=(self.server,), daemon=True).start()

    def _accept(self, server):
        import socket
        while True:
            try:
                client, _ = server.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(a, b):
        try:
            while True:
                data = a.recv(65536)
                if not data:
                    break
                b.sendall(data)
        except OSError:
            pass
        for s in (a, b):
            try:
                s.close()
            except OSError:
                pass

    def down(self):
        import socket
        self.server.shutdown(socket.SHUT_RDWR)   # wakes the blocked accept (close alone does not)
        self.server.close()
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self.socks = []


def test_broker_unreachable_for_a_while_then_back(env):
    q = env.queue()
    outage = Outage()
    via = env.url.replace("127.0.0.1:5672", f"127.0.0.1:{outage.port}")
    consumer = make_broker(via, make_config(broker_url=via))
    try:
        env.broker().publish_many([out(q, message_id=f"r{i}") for i in range(20)])
        held = drain(consumer, [q], 3, ack=False)
        outage.down()
        time.sleep(0.5)
        assert consumer.fetch([q], 10, 1.0) == [] and not consumer.healthy   # never raises
        with pytest.raises(BrokerError):
            consumer.publish(out(q))
        consumer.ack(held)
        outage.up()
        got = drain(consumer, [q], 20, timeout=15)
        assert sorted(d.message_id for d in got) == sorted(f"r{i}" for i in range(20))
        assert consumer.healthy
    finally:
        consumer.close()
        outage.down()


@pytest.fixture
def tls_port(tmp_path):
    """A TLS front for RabbitMQ (a self-signed certificate for ``localhost``):
    amqps:// as far as the client can tell."""
    import shutil
    import socket
    import ssl
    if not shutil.which("openssl"):
        pytest.skip("openssl is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True, timeout=60)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(str(cert), str(key))
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(20)

    def accept():
        while True:
            try:
                raw, _ = server.accept()
            except OSError:
                return
            try:
                client = context.wrap_socket(raw, server_side=True)
            except (OSError, ssl.SSLError):
                raw.close()
                continue
            upstream = socket.create_connection(("127.0.0.1", 5672))
            threading.Thread(target=bridge, args=(client, upstream), daemon=True).start()

    def bridge(tls, plain):
        """Both directions in one thread: an SSL socket is not used by two threads at once."""
        import select
        try:
            while True:
                ready = [tls] if tls.pending() else select.select([tls, plain], [], [], 1.0)[0]
                for sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        raise OSError("closed")
                    (plain if sock is tls else tls).sendall(data)
        except OSError:
            tls.close()
            plain.close()

    threading.Thread(target=accept, daemon=True).start()
    yield server.getsockname()[1], str(cert)
    server.close()


def test_amqps(env, tls_port):
    port, cafile = tls_port
    q = env.queue()
    url = f"amqps://guest:guest@localhost:{port}/{vhost_of(env.url)}?cafile={cafile}"
    # 3,000 messages acked from other threads while the loop reads: an SSL socket
    # used by two threads at once breaks within a few thousand
    broker = make_broker(url, make_config(broker_url=url))
    try:
        broker.publish_many([out(q, message_id=f"s{i}") for i in range(3000)])
        got = []
        deadline = time.monotonic() + 10
        while len(got) < 3000 and time.monotonic() < deadline:
            batch = broker.fetch([q], 7, 0.2)
            threading.Thread(target=broker.ack, args=(batch,)).start()   # acks from other threads
            got += batch
        assert sorted(d.message_id for d in got) == sorted(f"s{i}" for i in range(3000))
        assert broker.healthy and broker._consumer.conn_state.failures == 0
    finally:
        broker.close()
    fresh = make_broker(url, make_config(broker_url=url))
    assert fresh.fetch([q], 10, 0.5) == []   # every ack arrived
    fresh.close()
    untrusted = url.replace(f"?cafile={cafile}", "?connect_timeout=2")
    stranger = make_broker(untrusted, make_config(broker_url=untrusted))
    with pytest.raises(BrokerError, match="CERTIFICATE_VERIFY_FAILED") as info:
        stranger.publish(out(q))
    assert "guest:guest" not in str(info.value)
    stranger.close()
    unchecked = url.replace(f"?cafile={cafile}", "?verify=false")
    lax = make_broker(unchecked, make_config(broker_url=unchecked))
    lax.publish(out(q, message_id="lax"))
    assert [d.message_id for d in drain(lax, [q], 1)] == ["lax"]
    lax.close()


def test_natively_dead_lettered_messages_are_listed(env):
    import amqp
    q = env.queue()
    env.broker().publish(out(q, b"rejected", message_id="native"))
    conn = amqp.Connection(**env.broker().params)
    conn.connect()
    ch = conn.channel()
    msg = ch.basic_get(f"{AMQP_PREFIX}.{q}")
    ch.basic_reject(msg.delivery_tag, requeue=False)   # a foreign consumer refuses it
    conn.close()
    broker = env.broker()
    [dead] = [d for d in broker.dlq_list(1000) if d.message_id == "native"]
    assert (dead.queue, dead.body, dead.reason) == (q, b"rejected", "rabbitmq: rejected")
    assert broker.dlq_requeue([dead.id]) == 1
    assert [d.message_id for d in drain(broker, [q], 1)] == ["native"]


# -- rpc:// ---------------------------------------------------------------------------

def test_rpc_is_the_default_backend_with_rabbitmq(amqp_url):
    assert backend_url_for(make_config(broker_url=amqp_url)) == "rpc://"
    with pytest.raises(ConfigError, match="needs a RabbitMQ broker"):
        make_backend("rpc://", make_config(broker_url="redis://localhost/0"))


def test_rpc_reply_queue_per_process(env):
    backend = env.backend()
    name = backend.reply_to()
    assert name.startswith(f"{AMQP_PREFIX}.reply.") and backend.reply_to() == name   # the app's prefix
    info = queues_of(env.url)[name]
    assert not info["durable"] and info["arguments"]["x-expires"] == 86400000
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child gets a queue of its own and never touches the parent's socket
        try:
            os.write(write, backend.reply_to().encode())
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(read, 200).decode()
    assert child.startswith(f"{AMQP_PREFIX}.reply.") and child != name
    worker = env.backend()
    worker.store("t-after-fork", b"still here", reply_to=name)
    assert backend.wait("t-after-fork", 5) == b"still here"


def test_rpc_wait_is_prompt_and_serves_many_outstanding_results(env):
    client, worker = env.backend(), env.backend()
    reply_to = client.reply_to()
    ids = [f"task-{i}" for i in range(20)]
    results = {}

    def wait_for(task_id):
        results[task_id] = (client.wait(task_id, 10), time.monotonic())

    threads = [threading.Thread(target=wait_for, args=(t,)) for t in ids[:10]]
    for t in threads:
        t.start()
    time.sleep(0.3)
    stored = time.monotonic()
    worker.store_many([Record(t, t.encode(), True, reply_to) for t in reversed(ids)])
    for t in threads:
        t.join()
    assert all(results[t][0] == t.encode() for t in ids[:10])
    assert max(at for _, at in results.values()) - stored < 0.1
    # the other ten arrived meanwhile and wait in the cache
    assert [client.get(t) for t in ids[10:]] == [t.encode() for t in ids[10:]]
    assert [client.wait(t, 0) for t in ids[10:]] == [t.encode() for t in ids[10:]]
    worker.store("late", b"update", final=False, reply_to=reply_to)
    worker.store("late", b"final", reply_to=reply_to)
    worker.store("late", b"stale update", final=False, reply_to=reply_to)
    assert client.wait("late", 5) == b"final"
    time.sleep(0.1)
    assert client.get("late") == b"final"
    client.forget("late")
    assert client.get("late") is None


def test_rpc_results_go_out_on_the_consumer_channel_before_the_ack(env, monkeypatch):
    q = env.queue()
    client = env.backend()
    reply_to = client.reply_to()
    worker, results = env.broker(), env.backend()
    results.attach_broker(worker)
    results.store("before", b"no consumer yet", reply_to=reply_to)   # through the pool
    assert client.wait("before", 5) == b"no consumer yet"
    pooled = results.pool._count
    env.broker().publish(out(q, message_id="task-1"))
    [d] = drain(worker, [q], 1, ack=False)
    results.store_many([Record("task-1", b"done", True, reply_to)])
    worker.ack([d])
    assert results.pool._count == pooled   # not through the pool
    assert client.wait("task-1", 5) == b"done"
    worker.close()
    checker = env.broker()
    assert checker.fetch([q], 10, 0.3) == []   # acked
    checker.close()

    def broken(*args):
        raise OSError("socket closed")
    other = env.broker()
    results.attach_broker(other)
    other.publish(out(q, message_id="task-2"))
    [d] = drain(other, [q], 1, ack=False)
    monkeypatch.setattr(other._consumer.conn._transport, "write", broken)
    results.store("task-2", b"via the pool", reply_to=reply_to)   # the write failed: the pool
    assert client.wait("task-2", 5) == b"via the pool"


def test_rpc_replies_are_acknowledged_in_batches(env):
    client, worker = env.backend(), env.backend()
    reply_to = client.reply_to()
    replies = client._replies
    acks = []
    ack = replies.channel.basic_ack
    replies.channel.basic_ack = lambda tag, multiple=False: (acks.append((tag, multiple)), ack(tag, multiple))
    for i in range(50):   # one at a time, as sequential delay().get() calls do
        worker.store(f"r-{i}", b"x", reply_to=reply_to)
        assert client.wait(f"r-{i}", 5) == b"x"
    assert len(acks) <= 2 and all(multiple for _, multiple in acks)
    time.sleep(1.1)   # past ACK_AFTER: the next read acknowledges everything read
    worker.store("one-more", b"y", reply_to=reply_to)
    assert client.wait("one-more", 5) == b"y"
    assert acks[-1] == (51, True) and replies.acked == replies.unacked == 51


def test_rpc_revocations_reach_every_worker(env):
    early_worker = env.backend()
    assert early_worker.revoked(["a"]) == {}
    client = env.backend()
    a, b = str(uuid.uuid4()), str(uuid.uuid4())
    client.revoke(a)
    client.revoke(b, terminate=True)
    late_worker = env.backend()   # started after the revoke: reads the stream from its start
    assert late_worker.revoked([a, b, "other"]) == {a: False, b: True}
    deadline = time.monotonic() + 2
    while early_worker.revoked([a, b]) != {a: False, b: True} and time.monotonic() < deadline:
        time.sleep(0.02)
    assert early_worker.revoked([a, b]) == {a: False, b: True}


# -- green drivers --------------------------------------------------------------------

@pytest.mark.parametrize("driver", ["gevent", "eventlet"])
def test_green_drivers(driver, amqp_url):
    pytest.importorskip(driver)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tests", "integration", "transport_amqp", "green_amqp.py"),
                           driver, amqp_url], cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT, **{CHILD_PREFIX: AMQP_PREFIX}),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-4000:]
