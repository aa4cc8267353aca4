"""1,000 malformed messages written straight into RabbitMQ beside 1,000 good
tasks, then a real ``greenq-worker --burst`` (issue 7, deliverable 1).

The bad ones come through a raw py-amqp channel, as another program would
write them: bodies from ``tests/malformed.py`` (not JSON, not UTF-8, JSON that
is not an object, wrong-typed envelope fields, deep nesting...) and good
envelopes under bad properties or headers (``greenq-eta: "abc"``, a
``message_id`` that is not UTF-8...).  Every good task completes, every bad
message is dead-lettered, the worker exits 0.  ``GREENQ_TEST_SEED`` picks
another reproducible mix (the seed and the counts are printed).
"""
from __future__ import annotations

import json
import os
import random
import sys
import uuid
from collections import Counter

import amqp
import pytest

from greenq.transports.amqp.common import connection_params
from tests.e2e.conftest import HERE, Env
from tests.malformed import TASK, bad_bodies, good_envelope

pytestmark = [pytest.mark.e2e, pytest.mark.amqp]

SEED = int(os.environ.get("GREENQ_TEST_SEED", "7"))
BAD_BODIES = 700
BAD_HEADERS = 300
GOOD = BAD_BODIES + BAD_HEADERS
REASONS = ("bad transport metadata", "undecodable", "unknown task")   # the worker's reason prefixes


@pytest.fixture
def amqp_env(tmp_path, amqp_url):
    sys.path.insert(0, str(HERE))
    queue = f"e2e-bad-{uuid.uuid4().hex[:8]}"
    env = Env(tmp_path, amqp_url, {"GREENQ_DEFAULT_QUEUE": queue, "GREENQ_WORKER_QUEUES": queue})
    env.queue = queue
    yield env
    env.cleanup()


def bad_properties(rng: random.Random) -> "tuple[str, dict]":
    """(kind, properties) that greenq never writes; the body under them is a good envelope."""
    kind = rng.choice(["eta", "deliveries", "message_id", "other_property", "several"])
    odd = [b"\xff\xfe", "", [1], {"a": 1}, True]
    if kind == "eta":
        return kind, {"application_headers": {"greenq-eta": rng.choice(odd + ["abc", "1e9"])}}
    if kind == "deliveries":
        return kind, {"application_headers": {"greenq-deliveries": rng.choice(odd + ["3", -1, 2.5])}}
    if kind == "message_id":
        return kind, {"message_id": bytes(rng.getrandbits(8) for _ in range(8)) + b"\xff"}
    if kind == "other_property":
        name = rng.choice(["content_type", "correlation_id", "reply_to", "type", "app_id"])
        return kind, {name: b"\x80" + bytes(rng.getrandbits(7) for _ in range(5)), "message_id": "bad-prop"}
    return kind, {"message_id": b"\xc3\x28", "application_headers": {
        "greenq-eta": "later", "greenq-deliveries": "many", "user-header": b"\xff"}}


def test_a_thousand_malformed_beside_a_thousand_good(pool, amqp_env):
    import e2e_tasks
    app = amqp_env.app()
    q = amqp_env.queue
    app.broker.declare([q])
    rng = random.Random(SEED)
    bodies = bad_bodies(BAD_BODIES, SEED)
    headers = [bad_properties(rng) for _ in range(BAD_HEADERS)]
    bad = [("body", kind, body, {"message_id": f"bad-{i}"}) for i, (kind, body) in enumerate(bodies)]
    for kind, props in headers:
        env = good_envelope(TASK, rng)
        env["queue"] = q
        bad.append(("header", kind, json.dumps(env).encode(), props))
    rng.shuffle(bad)
    conn = amqp.Connection(**connection_params(amqp_env.broker_url))
    conn.connect()
    channel = conn.channel()
    good = []
    try:
        for i, (_, _, body, props) in enumerate(bad):   # interleaved with the good ones
            channel.basic_publish(amqp.Message(body, **props), "", app.broker.settings.queue_name(q))
            good.append(e2e_tasks.add.delay(i, 1))
        channel.queue_declare(app.broker.settings.queue_name(q), passive=True)   # a round trip: all routed
    finally:
        conn.close()
    code, out = amqp_env.run_worker(pool, "-c", "50", timeout=300)
    assert code == 0, out[-3000:]
    assert [r.get(timeout=30) for r in good] == [i + 1 for i in range(GOOD)]
    dead = [d for d in app.broker.dlq_list(100000) if d.queue == q]
    reasons = Counter(next((p for p in REASONS if d.reason.startswith(p)), d.reason[:40]) for d in dead)
    kinds = Counter(f"{where}:{kind}" for where, kind, _, _ in bad)
    print(f"seed {SEED}: injected {len(bad)} malformed ({dict(sorted(kinds.items()))}) beside {len(good)} good; "
          f"{len(good)} good completed; {len(dead)} dead-lettered ({dict(reasons)})")
    assert len(dead) == len(bad), dict(reasons)
    assert set(reasons) <= set(REASONS), dict(reasons)
    assert sum(d.reason.startswith("bad transport metadata") for d in dead) == BAD_HEADERS, dict(reasons)
    assert app.broker.queue_stats([q])[0].ready == 0
    assert "Traceback" not in out, out[-3000:]
    app.broker.dlq_purge()   # the run's prefix is shared: later tests list P.dlq from its start
