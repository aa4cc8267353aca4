"""Each transport's ``publish_calls``: the writes that publish a batch of
messages, made with no server (no I/O), checked call by call.  The brokers'
``publish_many`` send exactly these; tests/integration/test_broker_suite.py
checks what they do on a real server."""
from __future__ import annotations

import itertools
from typing import Callable, List

from greenq.brokers.base import Outgoing
from greenq.transports.amqp.common import H_ETA, Settings
from greenq.transports.amqp.publish import publish_calls as amqp_calls
from greenq.transports.amqp.wire import encode_properties, task_properties
from greenq.transports.memory.broker import publish_calls as memory_calls
from greenq.transports.redis.broker import PUBLISH_CHUNK, delayed_member, xadd_command
from greenq.transports.redis.broker import publish_calls as redis_calls
from greenq.transports.redis.broker_cluster import publish_calls as cluster_calls
from greenq.transports.sqlite.broker import publish_calls as sqlite_calls
from greenq.transports.sqlite.client import Tables

NOW = 1_000_000.0
READY = Outgoing("default", b"body-1", "id-1")
URGENT = Outgoing("mail", b"body-2", "id-2", priority=7)
LATER = Outgoing("default", b"body-3", "id-3", priority=2, eta=NOW + 1.5)
PAST = Outgoing("mail", b"body-4", "id-4", priority=12, eta=NOW - 5)   # due: ready now; priority clamped to 9
BATCH = [READY, URGENT, LATER, PAST]


# -- redis ---------------------------------------------------------------------

def streams(queue: str) -> List[str]:
    return [f"P:q:{queue}:{p}" for p in range(9, -1, -1)]


def delayed(queue: str) -> str:
    return f"P:delayed:{queue}"


def nonces() -> Callable[[], bytes]:
    counter = itertools.count()
    return lambda: b"nonce%03d" % next(counter)


def test_redis_one_script_call_registers_new_queues_and_indexes_keys() -> None:
    calls = redis_calls(BATCH, streams, delayed, "P:queues", ["default", "mail"], NOW, nonces())
    assert calls == [(
        ["P:queues", "P:q:default:0", "P:q:mail:7", "P:delayed:default", "P:q:mail:9"],
        [2, "default", "mail",
         2, b"", "id-1", b"body-1",
         3, b"", "id-2", b"body-2",
         4, repr(NOW + 1.5), b"nonce000" + b"2" + b"4:id-3" + b"body-3", b"",
         5, b"", "id-4", b"body-4"],
    )]


def test_redis_known_queues_and_keys_used_twice() -> None:
    calls = redis_calls([READY, READY], streams, delayed, "P:queues", [], NOW, nonces())
    assert calls == [(["P:queues", "P:q:default:0"],
                      [0, 2, b"", "id-1", b"body-1", 2, b"", "id-1", b"body-1"])]


def test_redis_batches_are_cut_into_chunks_and_only_the_first_registers() -> None:
    messages = [Outgoing("default", b"x", f"id-{i}") for i in range(PUBLISH_CHUNK + 1)]
    calls = redis_calls(messages, streams, delayed, "P:queues", ["default"], NOW, nonces())
    assert [len(args) for _, args in calls] == [2 + 4 * PUBLISH_CHUNK, 1 + 4]
    assert calls[0][1][:2] == [1, "default"] and calls[1][1][0] == 0
    assert calls[1] == (["P:queues", "P:q:default:0"], [0, 2, b"", f"id-{PUBLISH_CHUNK}", b"x"])


def test_redis_delayed_member_layout() -> None:
    assert delayed_member(Outgoing("q", b"\x00body", "abc"), 5, b"12345678") == b"1234567853:abc\x00body"
    assert delayed_member(Outgoing("q", b"", "\u00e9"), 0, b"abcdefgh") == b"abcdefgh02:\xc3\xa9"


def test_redis_xadd_of_one_ready_message() -> None:
    assert xadd_command(URGENT, streams) == ("XADD", "P:q:mail:7", "*", "b", b"body-2", "m", "id-2")
    assert xadd_command(PAST, streams) == ("XADD", "P:q:mail:9", "*", "b", b"body-4", "m", "id-4")


def test_redis_cluster_one_call_per_queue_keys_in_its_slot() -> None:
    def tagged(queue: str) -> List[str]:
        return [f"{{P:{queue}}}:q:{p}" for p in range(9, -1, -1)]

    calls = cluster_calls(BATCH, tagged, lambda q: f"{{P:{q}}}:delayed", NOW, nonces())
    assert calls == [
        (["{P:default}:q:9", "{P:default}:q:0", "{P:default}:delayed"],
         [0, 2, b"", "id-1", b"body-1", 3, repr(NOW + 1.5), b"nonce000" + b"2" + b"4:id-3" + b"body-3", b""]),
        (["{P:mail}:q:9", "{P:mail}:q:7", "{P:mail}:q:9"],
         [0, 2, b"", "id-2", b"body-2", 3, b"", "id-4", b"body-4"]),
    ]


# -- sqlite --------------------------------------------------------------------

def test_sqlite_statements_and_rows() -> None:
    calls = sqlite_calls(BATCH, Tables("app"), NOW)
    assert calls == [
        ('INSERT OR IGNORE INTO "app_queues" (name) VALUES (?)', {("default",), ("mail",)}),
        ('INSERT INTO "app_messages" (queue, priority, visible_at, message_id, body) VALUES (?, ?, ?, ?, ?)',
         [("default", 0, NOW, "id-1", b"body-1"),
          ("mail", 7, NOW, "id-2", b"body-2"),
          ("default", 2, NOW + 1.5, "id-3", b"body-3"),
          ("mail", 9, NOW, "id-4", b"body-4")]),
    ]


def test_sqlite_default_prefix_keeps_plain_table_names() -> None:
    (register, _), (insert, _) = sqlite_calls([READY], Tables(), NOW)
    assert register.startswith('INSERT OR IGNORE INTO "queues" ')
    assert insert.startswith('INSERT INTO "messages" ')


# -- memory --------------------------------------------------------------------

def test_memory_writes() -> None:
    body = bytearray(b"mutable")
    writes = memory_calls([*BATCH, Outgoing("q", body, "id-5", priority=-3)])   # type: ignore[arg-type]
    body[:] = b"changed"
    assert writes == [
        ("default", b"body-1", "id-1", 0, 0.0),
        ("mail", b"body-2", "id-2", 7, 0.0),
        ("default", b"body-3", "id-3", 2, NOW + 1.5),
        ("mail", b"body-4", "id-4", 9, NOW - 5),
        ("q", b"mutable", "id-5", 0, 0.0),         # its own copy of the body
    ]


# -- amqp ------------------------------------------------------------------------

def test_amqp_basic_publishes() -> None:
    calls = amqp_calls(BATCH, NOW, Settings(prefix="app"))
    delay_key = "0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.1.0.1.1.1.0.1.1.1.0.0"     # 1500 ms in 32 bits
    assert calls == [
        (b"body-1", task_properties("id-1"), "", "app.default"),
        (b"body-2", task_properties("id-2", 7), "", "app.mail"),
        (b"body-3", encode_properties({"message_id": "id-3", "delivery_mode": 2, "priority": 2,
                                       "application_headers": {H_ETA: NOW + 1.5}}),
         "app.delay.default.10", delay_key),
        (b"body-4", encode_properties({"message_id": "id-4", "delivery_mode": 2, "priority": 12}),
         "", "app.mail"),
    ]
    assert task_properties("id-2", 7) == encode_properties({"message_id": "id-2", "delivery_mode": 2,
                                                            "priority": 7})


def test_amqp_default_prefix_publishes_to_plain_queue_names() -> None:
    assert amqp_calls([READY], NOW, Settings()) == [(b"body-1", task_properties("id-1"), "", "default")]
