"""Concurrent publishers with confirms share confirm waits (``SharedPublisher``,
group commit) and each still returns only once its own message is confirmed:
every message arrives once, a nack or a return is its caller's alone, and a
connection cut while many wait is retried (or raised) for every one of them as
for a publisher of their own.

Runs in the run's vhost (the ``amqp_url`` fixture) under the run's key_prefix;
the nack test sets a policy on its own queue with ``rabbitmqctl`` (skipped
when it does not answer); the cut goes through ``tests/chaos/fault_proxy.py``.
"""
from __future__ import annotations

import threading
import uuid
from urllib.parse import urlsplit, urlunsplit

import pytest

from greenq.brokers import Outgoing, make_broker
from greenq.exceptions import BrokerError
from greenq.transports.amqp.publish import ACKED, NACKED, SharedPublisher, encode_outgoing
from tests.chaos.fault_proxy import FaultProxy
from tests.conftest import AMQP_PREFIX, ctl_or_skip, delete_queues, make_config, rabbitmqctl, until, vhost_of

pytestmark = pytest.mark.amqp


@pytest.fixture
def env(amqp_url):
    made, queues = [], []

    class Env:
        url = amqp_url

        @staticmethod
        def queue(name: str = "c") -> str:
            queues.append(f"gqc-{uuid.uuid4().hex[:8]}-{name}")
            return queues[-1]

        @staticmethod
        def broker(url=None, **settings):
            url = url or amqp_url
            b = make_broker(url, make_config(broker_url=url, **settings))
            made.append(b)
            return b

    yield Env
    for b in made:
        b.close()
    delete_queues(amqp_url, queues)


def out(queue, message_id):
    return Outgoing(queue, b"x", message_id, 0, None)


def drain(broker, queues, expected, timeout=20.0):
    import time
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < expected and time.monotonic() < deadline:
        batch = broker.fetch(queues, 200, 0.2)
        if batch:
            broker.ack(batch)
        got.extend(batch)
    got.extend(broker.fetch(queues, 200, 0.3))   # nothing more comes
    return got


def in_threads(count, fn):
    """Run ``fn(i)`` in ``count`` threads started at once; return {i: exception}."""
    go, errors = threading.Event(), {}

    def run(i):
        go.wait()
        try:
            fn(i)
        except BaseException as exc:   # asserted by the caller
            errors[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    go.set()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    return errors


class Spy:
    """Counts the confirm frames a shared publisher reads and the most callers it had at once."""

    def __init__(self, monkeypatch):
        self.frames = self.most_users = self.batches = self.most_in_batch = 0
        settle, send = SharedPublisher._settle_many, SharedPublisher.send
        spy = self

        def counting_settle(pub, settles):
            spy.frames += len(settles)
            spy.batches += 1
            spy.most_in_batch = max(spy.most_in_batch, len(settles))
            settle(pub, settles)

        def counting_send(pub, *args):
            confirm = send(pub, *args)
            spy.most_users = max(spy.most_users, pub.users)
            return confirm

        monkeypatch.setattr(SharedPublisher, "_settle_many", counting_settle)
        monkeypatch.setattr(SharedPublisher, "send", counting_send)


def test_fifty_threads_share_confirms_and_each_message_arrives_once(env, monkeypatch):
    q = env.queue()
    client = env.broker()
    client.publish(out(q, "first"))     # declares the queue (the pool's own publisher)
    spy = Spy(monkeypatch)
    errors = in_threads(50, lambda i: [client.publish(out(q, f"{i}-{n}")) for n in range(20)])
    assert errors == {}
    # many callers waited on one connection, and one confirm frame settled several of them
    assert spy.most_users > 1
    assert 0 < spy.frames < 1000, spy.frames
    got = drain(env.broker(), [q], 1001)
    assert sorted(d.message_id for d in got) == sorted(["first"] + [f"{i}-{n}" for i in range(50) for n in range(20)])
    assert client.pool._shared is not None and client.pool._count == 1


def test_an_unroutable_publish_is_returned_to_its_caller_only(env):
    q = env.queue()
    client = env.broker()
    client.publish(out(q, "first"))
    pool, settings = client.pool, client.settings
    confirms = {}

    def publish(i):
        m = out(q if i != 17 else env.queue("nowhere"), f"m{i}")   # no queue takes m17
        confirms[i] = pool.publish_confirmed(encode_outgoing(m, 0.0, settings), m.message_id)

    assert in_threads(50, publish) == {}
    assert confirms[17].returned and "NO_ROUTE" in confirms[17].returned
    assert all(c.returned is None and c.state == ACKED for i, c in confirms.items() if i != 17)
    got = drain(env.broker(), [q], 50)
    assert sorted(d.message_id for d in got) == sorted(["first"] + [f"m{i}" for i in range(50) if i != 17])


def test_returns_of_one_message_id_in_flight_many_times_go_to_their_callers(env):
    q, nowhere = env.queue(), env.queue("nowhere")
    client = env.broker()
    client.publish(out(q, "first"))
    pool, settings = client.pool, client.settings
    confirms = {}

    def publish(i):
        m = out(q if i % 2 else nowhere, "dup")    # one task id, half of them unroutable
        confirms[i] = pool.publish_confirmed(encode_outgoing(m, 0.0, settings), m.message_id)

    assert in_threads(40, publish) == {}
    assert all((c.returned is None) == bool(i % 2) and c.state == ACKED for i, c in confirms.items())
    assert [d.message_id for d in drain(env.broker(), [q], 21)].count("dup") == 20
    assert client.pool._shared.by_id == {}


def test_a_queue_deleted_while_many_publish_is_declared_again_for_each(env):
    q = env.queue()
    client = env.broker()
    client.publish(out(q, "first"))
    with client.pool.publisher() as pub:
        pub.channel.queue_delete(f"{AMQP_PREFIX}.{q}")
    # every caller's message comes back, is declared again and published once more
    assert in_threads(30, lambda i: client.publish(out(q, f"m{i}"))) == {}
    got = drain(env.broker(), [q], 30)
    assert sorted(d.message_id for d in got) == sorted(f"m{i}" for i in range(30))


def test_a_nack_raises_for_its_caller_only(env):
    ctl_or_skip("set a queue policy")
    q = env.queue()
    name = f"{AMQP_PREFIX}.{q}"
    vhost, policy = vhost_of(env.url), f"gqc-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("set_policy", "-p", vhost, "--apply-to", "queues", policy, f"^{name}$",
                '{"max-length": 5, "overflow": "reject-publish"}')
    try:
        client = env.broker()
        client.publish(out(q, "first"))   # declares the queue: one of its five places
        errors = in_threads(30, lambda i: client.publish(out(q, f"m{i}")))
        assert len(errors) == 26 and all(isinstance(e, BrokerError) and "nack" in str(e) for e in errors.values())
        got = drain(env.broker(), [q], 5)
        assert sorted(d.message_id for d in got) == sorted(["first"] + [f"m{i}" for i in range(30)
                                                                        if i not in errors])
    finally:
        rabbitmqctl("clear_policy", "-p", vhost, policy)


def test_one_nack_among_the_acks_of_one_read_fails_only_its_caller(env, monkeypatch):
    """The confirms one ``recv`` brings are settled together: a nack among
    them fails its caller and nobody else."""
    ctl_or_skip("set a queue policy")
    q = env.queue()
    name = f"{AMQP_PREFIX}.{q}"
    vhost, policy = vhost_of(env.url), f"gqc-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("set_policy", "-p", vhost, "--apply-to", "queues", policy, f"^{name}$",
                '{"max-length": 40, "overflow": "reject-publish"}')
    try:
        client = env.broker()
        pool, settings = client.pool, client.settings
        with pool.publisher() as pub:
            pool.ensure_queues(pub, (q,))
        spy = Spy(monkeypatch)
        confirms = {}

        def publish(i):
            m = out(q, f"m{i}")
            confirms[i] = pool.publish_confirmed(encode_outgoing(m, 0.0, settings), m.message_id)

        assert in_threads(41, publish) == {}      # one place too few: exactly one is refused
        nacked = [i for i, c in confirms.items() if c.state == NACKED]
        assert len(nacked) == 1 and sum(c.state == ACKED for c in confirms.values()) == 40
        assert spy.frames < 41 or spy.most_in_batch > 1   # settled in batches (or acks covering many)
        got = {d.message_id for d in drain(env.broker(), [q], 40)}
        assert got == {f"m{i}" for i in range(41) if i not in nacked}
    finally:
        rabbitmqctl("clear_policy", "-p", vhost, policy)


def test_a_server_close_among_the_confirms_fails_every_waiter_and_they_retry(env):
    """A Connection.Close read among the confirms goes to py-amqp, which
    raises: every caller still waiting retries on a fresh connection."""
    ctl_or_skip("close a connection")
    q = env.queue()
    client = env.broker()
    client.publish(out(q, "first"))
    client.publish(out(q, "warm"))
    shared = client.pool._shared
    port = str(shared.raw.sock.getsockname()[1])
    pids = [line.split()[0] for line in rabbitmqctl("list_connections", "--no-table-headers", "pid",
                                                    "peer_port").splitlines()
            if line.split()[1:] == [port]]
    assert len(pids) == 1
    closed = threading.Event()
    sent = {}

    def publish(i):
        n = 0
        while not closed.is_set() or n < 20:    # publishing before, during and after the close
            client.publish(out(q, f"m{i}-{n}"))
            n += 1
        sent[i] = n

    runner = threading.Thread(target=lambda: sent.update(errors=in_threads(20, publish)))
    runner.start()
    try:
        assert until(lambda: shared.users >= 10, timeout=10)
        rabbitmqctl("close_connection", pids[0], "greenq test: closed among the confirms")
    finally:
        closed.set()
        runner.join(60)
    assert sent.pop("errors") == {}
    assert shared.broken and shared.users == 0 and client.pool._shared is not shared
    ids = [d.message_id for d in drain(env.broker(), [q], 2 + sum(sent.values()), timeout=60)]
    # at least once: a confirm lost with the connection sends that one again
    assert set(ids) == {"first", "warm"} | {f"m{i}-{n}" for i, count in sent.items() for n in range(count)}


def test_nacks_and_acks_settle_the_right_callers_on_the_pool(env):
    ctl_or_skip("set a queue policy")
    q = env.queue()
    name = f"{AMQP_PREFIX}.{q}"
    vhost, policy = vhost_of(env.url), f"gqc-{uuid.uuid4().hex[:8]}"
    rabbitmqctl("set_policy", "-p", vhost, "--apply-to", "queues", policy, f"^{name}$",
                '{"max-length": 10, "overflow": "reject-publish"}')
    try:
        client = env.broker()
        pool, settings = client.pool, client.settings
        with pool.publisher() as pub:
            pool.ensure_queues(pub, (q,))
        confirms = {}

        def publish(i):
            m = out(q, f"m{i}")
            confirms[i] = pool.publish_confirmed(encode_outgoing(m, 0.0, settings), m.message_id)

        assert in_threads(40, publish) == {}
        acked = {f"m{i}" for i, c in confirms.items() if c.state == ACKED}
        assert len(acked) == 10 and sum(c.state == NACKED for c in confirms.values()) == 30
        assert {d.message_id for d in drain(env.broker(), [q], 10)} == acked
    finally:
        rabbitmqctl("clear_policy", "-p", vhost, policy)


def proxied(url, proxy):
    parts = urlsplit(url)
    netloc = f"{parts.username}:{parts.password}@127.0.0.1:{proxy.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def test_a_connection_cut_while_many_wait_is_retried_for_every_waiter(env):
    q = env.queue()
    host = urlsplit(env.url)
    proxy = FaultProxy(host.hostname or "127.0.0.1", host.port or 5672)
    try:
        client = env.broker(url=proxied(env.url, proxy))
        client.publish(out(q, "first"))
        shared_before = None

        def publish(i):
            client.publish(out(q, f"m{i}"))

        client.publish(out(q, "warm"))             # makes the shared publisher
        shared_before = client.pool._shared
        assert shared_before is not None
        proxy.blackhole(1.0)                       # confirms held back: every caller waits...
        result = {}
        runner = threading.Thread(target=lambda: result.update(errors=in_threads(20, publish)))
        runner.start()
        assert until(lambda: shared_before.users == 20, timeout=10)
        assert proxy.reset_all() >= 1              # ...when the connection is cut
        runner.join(60)
        assert result["errors"] == {}              # every caller retried on a fresh connection
        assert client.pool._shared is not shared_before and shared_before.users == 0
        got = drain(env.broker(), [q], 22)
        ids = [d.message_id for d in got]        # at least once: a lost confirm may send one again
        assert set(ids) == {"first", "warm"} | {f"m{i}" for i in range(20)}
    finally:
        proxy.close()


def test_a_connection_lost_for_good_while_many_wait_raises_for_every_waiter(env):
    q = env.queue()
    host = urlsplit(env.url)
    proxy = FaultProxy(host.hostname or "127.0.0.1", host.port or 5672)
    try:
        client = env.broker(url=proxied(env.url, proxy))
        client.publish(out(q, "first"))
        client.publish(out(q, "warm"))
        shared = client.pool._shared
        proxy.blackhole(5.0)
        result = {}
        runner = threading.Thread(
            target=lambda: result.update(errors=in_threads(20, lambda i: client.publish(out(q, f"m{i}")))))
        runner.start()
        assert until(lambda: shared.users == 20, timeout=10)
        proxy.close()                              # gone: the retries find nobody listening
        runner.join(60)
        errors = result["errors"]
        assert len(errors) == 20 and all(isinstance(e, BrokerError) and "RabbitMQ at" in str(e)
                                         for e in errors.values())
        assert not client.healthy
    finally:
        proxy.close()


def test_callers_not_confirmed_in_time_raise_each_and_later_ones_get_a_fresh_connection(env):
    q = env.queue()
    host = urlsplit(env.url)
    proxy = FaultProxy(host.hostname or "127.0.0.1", host.port or 5672)
    try:
        client = env.broker(url=proxied(env.url, proxy))
        client.publish(out(q, "first"))
        client.publish(out(q, "warm"))
        pool, settings, stuck = client.pool, client.settings, client.pool._shared

        def publish(i):
            m = out(q, f"m{i}")
            pool.publish_confirmed(encode_outgoing(m, 0.0, settings), m.message_id, timeout=1.0)

        proxy.blackhole(2.5)                       # no confirm comes back in time
        errors = in_threads(10, publish)
        assert len(errors) == 10 and all(isinstance(e, BrokerError) and "not confirmed" in str(e)
                                         for e in errors.values())
        assert stuck.broken and stuck.users == 0 and not stuck.reading
        assert until(lambda: not proxy.holding(), timeout=5)
        client.publish(out(q, "after"))            # a fresh shared connection
        assert client.pool._shared is not stuck
        ids = {d.message_id for d in drain(env.broker(), [q], 13)}
        assert {"first", "warm", "after"} <= ids   # the timed-out ones may or may not have arrived
    finally:
        proxy.close()
