"""Every name greenq uses on a shared server derives from ``key_prefix``
(docs/operations.md, "Apps apart"): RabbitMQ task queues and their delay
cascades, SQLite tables, memory:// stores.  Two apps with the same queue
name on one vhost, one SQLite file or one memory:// URL never see each
other's messages; the default prefix keeps today's names."""
from __future__ import annotations

import sqlite3
import time
import uuid

import pytest

from greenq.backends import make_backend
from greenq.brokers import make_broker
from greenq.brokers.base import Outgoing
from greenq.config import load
from greenq.exceptions import BrokerError, ConfigError
from greenq import transports
from tests.conftest import make_config, own_prefix


def _out(queue: str, body: bytes = b"x", eta: float = None) -> Outgoing:
    return Outgoing(queue, body, uuid.uuid4().hex, 0, eta)


def _drain(broker, queue: str, want: int, seconds: float = 10.0) -> list:
    got, deadline = [], time.monotonic() + seconds
    while len(got) < want and time.monotonic() < deadline:
        got += broker.fetch([queue], want - len(got), 0.2)
    broker.ack(got)
    return got


# -- config ---------------------------------------------------------------------------

@pytest.mark.parametrize("prefix", ["", "a b", 'x"y', "x;y", "é", "p" * 65, "a/b", "a\nb"])
def test_a_key_prefix_that_cannot_be_a_name_part_is_refused(prefix):
    with pytest.raises(ConfigError, match="key_prefix"):
        load(search=False, env={"GREENQ_KEY_PREFIX": prefix})


@pytest.mark.parametrize("prefix", ["greenq", "gqtest-1a2b3c4d-abcdef-a", "own", "s1", "My_App.v2:eu", "p" * 64])
def test_key_prefixes_of_letters_digits_and_separators_are_accepted(prefix):
    assert load(search=False, env={"GREENQ_KEY_PREFIX": prefix}).key_prefix == prefix


# -- RabbitMQ -------------------------------------------------------------------------

def test_amqp_names_map_both_ways():
    from greenq.transports.amqp.common import Settings
    plain, own = Settings(), Settings(prefix="shop")
    assert plain.queue_name("default") == "default" and plain.delay_name("default", 3) == "greenq.delay.default.3"
    assert own.queue_name("default") == "shop.default" and own.delay_name("default", 3) == "shop.delay.default.3"
    assert own.logical("shop.default") == "default" and own.logical("default") is None
    assert own.logical("other.default") is None
    for plumbing in ("shop.dlq", "shop.dlx", "shop.revoked", "shop.delay.default.0", "shop.control",
                     "shop.control.w1", "shop.control-reply.ab", "shop.events", "shop.beat.lock"):
        assert own.logical(plumbing) is None, plumbing
    assert own.logical("shop.controller") == "controller"
    assert plain.logical("greenq.dlq") is None and plain.logical("shop.default") == "shop.default"
    assert plain.max_queue_name_bytes == 239 and own.max_queue_name_bytes == 239 + len("greenq") - len("shop")
    assert not own.usable("dlq") and not own.usable("delay.x.1") and own.usable("default")


@pytest.mark.amqp
def test_two_prefixes_on_one_vhost_have_their_own_queue_of_the_same_name(amqp_url):
    import amqp
    base = own_prefix()
    a = make_broker(amqp_url, make_config(key_prefix=f"{base}-a"))
    b = make_broker(amqp_url, make_config(key_prefix=f"{base}-b"))
    try:
        a.publish_many([_out("default", b"for-a"), _out("default", b"later-a", eta=time.time() + 0.3)])
        b.publish_many([_out("default", b"for-b")])
        assert sorted(d.body for d in _drain(a, "default", 2)) == [b"for-a", b"later-a"]
        assert [d.body for d in _drain(b, "default", 1)] == [b"for-b"]
        assert b.fetch(["default"], 5, 0.3) == []
        stats = {s.name: s for s in a.queue_stats(["default"])}
        assert stats["default"].ready == 0 and stats["default"].delayed == 0
        # RabbitMQ holds P.default and P.delay.default.*, never the bare name
        conn = amqp.Connection(**a.params)
        conn.connect()
        try:
            ch = conn.channel()
            ch.queue_declare(f"{base}-a.default", passive=True)
            ch.queue_declare(f"{base}-a.delay.default.0", passive=True)
            with pytest.raises(amqp.exceptions.NotFound):
                ch.queue_declare("default", passive=True)
        finally:
            conn.close()
    finally:
        a.close()
        b.close()


@pytest.mark.amqp
def test_a_dead_letter_goes_back_to_its_own_apps_queue(amqp_url):
    base = own_prefix()
    a = make_broker(amqp_url, make_config(key_prefix=f"{base}-a"))
    b = make_broker(amqp_url, make_config(key_prefix=f"{base}-b"))
    try:
        a.publish_many([_out("jobs", b"dead")])
        [d] = _drain_held(a, "jobs")
        a.dead_letter(d, "boom")
        [dead] = a.dlq_list()
        assert dead.queue == "jobs" and b.dlq_list() == []
        assert a.dlq_requeue() == 1
        assert b.fetch(["jobs"], 5, 0.3) == []
        assert [x.body for x in _drain(a, "jobs", 1)] == [b"dead"]
    finally:
        a.close()
        b.close()


def _drain_held(broker, queue: str) -> list:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        got = broker.fetch([queue], 1, 0.2)
        if got:
            return got
    raise AssertionError("nothing arrived")


@pytest.mark.amqp
def test_a_queue_name_landing_on_greenqs_own_queues_is_refused(amqp_url):
    broker = make_broker(amqp_url, make_config(key_prefix=own_prefix()))
    try:
        with pytest.raises(BrokerError, match="reserved"):
            broker.publish_many([_out("dlq")])
    finally:
        broker.close()


@pytest.mark.amqp
def test_queue_listing_shows_only_this_apps_queues_by_logical_name(amqp_url, tmp_path, management_api):
    from greenq import GreenQ
    from greenq.cli.listing import queue_stats
    api, rows, _ = management_api
    p = own_prefix()
    rows += [{"name": f"{p}-a.default", "messages_ready": 4, "messages_unacknowledged": 1},
             {"name": f"{p}-b.default", "messages_ready": 7}, {"name": "default", "messages_ready": 9},
             {"name": f"{p}-a.dlq", "messages_ready": 2}, {"name": f"{p}-a.delay.default.3", "messages_ready": 1},
             {"name": f"{p}-a.control.w1"}, {"name": "amq.gen-x"}]
    app = GreenQ("t", config=make_config(broker_url=amqp_url, key_prefix=f"{p}-a",
                                         amqp__management_url=api))
    try:
        listed, note = queue_stats(app)
        assert note is None
        assert [(s.name, s.ready, s.held) for s in listed] == [("default", 4, 1)]
    finally:
        app.close()


# -- SQLite ---------------------------------------------------------------------------

def test_two_prefixes_in_one_sqlite_file_have_their_own_tables(tmp_path):
    url = f"sqlite:///{tmp_path}/shared.sqlite3"
    ca, cb = make_config(broker_url=url, key_prefix="app-a"), make_config(broker_url=url, key_prefix="app.b")
    a, b = make_broker(url, ca), make_broker(url, cb)
    ra, rb = make_backend(url, ca), make_backend(url, cb)
    la, lb = transports.load(url, "leadership", "lease")(url, ca, 5.0), transports.load(url, "leadership", "lease")(url, cb, 5.0)
    try:
        a.publish_many([_out("default", b"for-a")])
        assert b.fetch(["default"], 5, 0) == []
        assert [q.name for q in b.queue_stats()] == []
        [d] = a.fetch(["default"], 5, 0)
        a.dead_letter(d, "boom")
        assert b.dlq_list() == [] and len(a.dlq_list()) == 1
        ra.revoke("t1", terminate=False)
        assert rb.revoked(["t1"]) == {} and ra.revoked(["t1"]) == {"t1": False}
        ra.save_group("g1", b"members")
        assert rb.load_group("g1") is None and ra.load_group("g1") == b"members"
        assert la.acquire("beat-a") and lb.acquire("beat-b")      # a lease each
        assert la.record("beat-a", "tick", 1000.0)
        assert lb.last_runs() == {}
    finally:
        for thing in (a, b, ra, rb, la, lb):
            thing.close()
    conn = sqlite3.connect(f"{tmp_path}/shared.sqlite3")
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    conn.close()
    assert {"app-a_messages", "app.b_messages", "app-a_revocations", "app-a_group_records",
            "app-a_leases", "app.b_leases", "app-a_records"} <= tables
    assert "messages" not in tables


def test_the_default_prefix_keeps_the_plain_sqlite_table_names(tmp_path):
    url = f"sqlite:///{tmp_path}/plain.sqlite3"
    broker = make_broker(url, make_config(broker_url=url))
    broker.publish_many([_out("default")])
    broker.close()
    conn = sqlite3.connect(f"{tmp_path}/plain.sqlite3")
    assert conn.execute("SELECT queue FROM messages").fetchall() == [("default",)]
    conn.close()


def test_sqlite_control_of_two_prefixes_never_crosses(tmp_path):
    from greenq.transports.sqlite.control import SQLiteTransport
    url = f"sqlite:///{tmp_path}/control.sqlite3"
    a = SQLiteTransport(url, make_config(broker_url=url, key_prefix="ca"))
    b = SQLiteTransport(url, make_config(broker_url=url, key_prefix="cb"))
    try:
        b.listen("w-b")
        a.broadcast('{"cmd": "ping"}')
        assert b.receive(0.2) == []
    finally:
        a.reset()
        b.reset()


# -- memory:// ------------------------------------------------------------------------

def test_two_prefixes_on_one_memory_url_never_share(tmp_path):
    url = f"memory://{uuid.uuid4().hex[:8]}"
    ca, cb = make_config(broker_url=url, key_prefix="ma"), make_config(broker_url=url, key_prefix="mb")
    a, b = make_broker(url, ca), make_broker(url, cb)
    ra, rb = make_backend(url, ca), make_backend(url, cb)
    la, lb = transports.load(url, "leadership", "lease")(url, ca, 5.0), transports.load(url, "leadership", "lease")(url, cb, 5.0)
    try:
        a.publish_many([_out("default")])
        assert b.fetch(["default"], 5, 0) == [] and len(a.fetch(["default"], 5, 0)) == 1
        ra.revoke("t1", terminate=False)
        assert rb.revoked(["t1"]) == {}
        assert la.acquire("x") and lb.acquire("y")
    finally:
        for thing in (a, b, ra, rb, la, lb):
            thing.close()
