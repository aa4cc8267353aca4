"""1,000 malformed messages written straight into Redis beside 1,000 good
tasks, then one real ``greenq-worker --burst`` (issue 7, deliverable 1).

The bad ones go through the raw write path, in the broker's key layout: stream
entries with bad fields (a message id that is not UTF-8, a missing, repeated
or unknown field) around a body that would run, entries whose body is one of
tests/malformed.py's (not JSON, not UTF-8, JSON that is not an object,
envelope fields of the wrong type, huge numbers, deep nesting, an unknown
task, ...), and delayed members that do not parse or carry such a body.  Every good task must complete, every bad message must be
dead-lettered, nothing may be left ready or held, and the worker exits 0.

The generator is seeded (SEED, or GREENQ_TEST_SEED to try others); the seed
and the counts per kind are printed.
"""
from __future__ import annotations

import collections
import json
import os
import random
import sys
import uuid
from typing import Callable, Dict, List, Tuple

import pytest

from tests.e2e.conftest import HERE, Env
from tests.malformed import TASK, bad_bodies, good_envelope

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

GOOD = BAD = 1000
SEED = 20261128                   # GREENQ_TEST_SEED overrides it
Q = "default"
#: kinds the broker must report as bad transport metadata (Delivery.error)
FIELD_KINDS = ("m not UTF-8", "no m field", "no b field", "unknown field", "repeated field",
               "malformed delayed member")


def good_body(rng: random.Random) -> bytes:
    """A valid envelope of e2e.add: it would run and succeed, so an entry
    carrying it is dead-lettered only if its fields are caught."""
    env = good_envelope(TASK, rng)
    env["id"] = f"bad-{env['id']}"
    return json.dumps(env).encode()


def bad_entries(rng: random.Random, seed: int, prefix: str) -> List[Tuple[str, list]]:
    """(kind, redis command) of each bad message, in a random order: about
    half carry a body from tests/malformed.py, the rest have bad fields or
    are delayed members that do not parse."""
    bodies = iter(bad_bodies(BAD, seed))

    def stream() -> str:
        return f"{prefix}:q:{Q}:{rng.randint(0, 9)}"

    def mid() -> bytes:
        return f"bad-{uuid.UUID(int=rng.getrandbits(128))}".encode()

    def delayed(member: bytes) -> list:
        return ["ZADD", f"{prefix}:delayed:{Q}", rng.randint(0, 1000), member]

    def body_entry() -> Tuple[str, list]:
        kind, body = next(bodies)
        return f"body: {kind}", ["XADD", stream(), "*", "b", body, "m", mid()]

    def delayed_body() -> Tuple[str, list]:
        kind, body = next(bodies)
        ident = mid()
        member = b"%08d%d%d:%s%s" % (rng.randint(0, 10**8 - 1), rng.randint(0, 9), len(ident), ident, body)
        return f"delayed, body: {kind}", delayed(member)

    fields: Dict[str, Callable[[], list]] = {
        "m not UTF-8": lambda: ["XADD", stream(), "*", "b", good_body(rng), "m", b"\xff" + mid()],
        "no m field": lambda: ["XADD", stream(), "*", "b", good_body(rng)],
        "no b field": lambda: ["XADD", stream(), "*", "m", mid()],
        "unknown field": lambda: ["XADD", stream(), "*", "b", good_body(rng), "m", mid(),
                                  rng.choice(["x", "B", "\u00e9", b"\xfe"]), b"1"],
        "repeated field": lambda: ["XADD", stream(), "*", "b", good_body(rng), "m", mid(), "m", mid()],
        # unique (a sorted set would fold equal members into one message)
        "malformed delayed member": lambda: delayed(
            rng.choice([b"", b"short", b"abcdefgh", b"abcdefghX3:abc"]) + b"%032x" % rng.getrandbits(128)),
    }
    assert set(fields) == set(FIELD_KINDS)
    out = []
    for _ in range(BAD):
        roll = rng.random()
        if roll < 0.45:
            out.append(body_entry())
        elif roll < 0.55:
            out.append(delayed_body())
        else:
            kind = rng.choice(FIELD_KINDS)
            out.append((kind, fields[kind]()))
    return out


@pytest.fixture
def redis_env(tmp_path, redis_url, redis_prefix):
    sys.path.insert(0, str(HERE))
    env = Env(tmp_path, redis_url, {"GREENQ_KEY_PREFIX": redis_prefix})
    yield env
    env.cleanup()


def test_1000_malformed_beside_1000_good(pool, redis_env, redis_url):
    import redis
    import e2e_tasks
    seed = int(os.environ.get("GREENQ_TEST_SEED") or SEED)
    rng = random.Random(seed)
    app = redis_env.app()
    broker = app.broker
    broker.declare([Q])
    raw = redis.Redis.from_url(redis_url)
    bad = bad_entries(rng, seed, broker.prefix)
    good_args = list(range(GOOD))
    results = []
    slots = ["good"] * GOOD + ["bad"] * BAD
    rng.shuffle(slots)
    pending_good: List[int] = []

    def flush_good() -> None:
        if pending_good:
            results.extend(app.enqueue_many([e2e_tasks.add.s(i, 1) for i in pending_good]))
            pending_good.clear()
    bad_iter = iter(bad)
    for slot in slots:                  # interleaved, in write order, on the same streams
        if slot == "good":
            pending_good.append(good_args.pop(0))
            continue
        flush_good()
        raw.execute_command(*next(bad_iter)[1])
    flush_good()
    raw.close()
    counts = collections.Counter(kind for kind, _ in bad)
    print(f"\nseed={seed} good={len(results)} bad={len(bad)} by kind: {dict(sorted(counts.items()))}")
    assert len(results) == GOOD

    code, out = redis_env.run_worker(pool, "-c", "50", timeout=180)
    assert code == 0, out[-5000:]
    assert [r.get(timeout=10) for r in results] == [i + 1 for i in range(GOOD)]
    [stats] = broker.queue_stats([Q])
    assert (stats.ready, stats.delayed, stats.held) == (0, 0, 0), (stats, out[-3000:])
    dead = broker.dlq_list(limit=2 * BAD)
    reasons = collections.Counter(d.reason.split(":")[0].split(" '")[0] for d in dead)
    print(f"dead-lettered={len(dead)} reasons: {dict(reasons.most_common(12))}")
    assert stats.dead == len(dead) == BAD, (seed, out[-3000:])
    field_level = sum(counts[k] for k in FIELD_KINDS)
    assert reasons["bad transport metadata"] == field_level, (seed, reasons)
    assert set(reasons) <= {"bad transport metadata", "undecodable", "unknown task"}, reasons
    assert "Traceback" not in out, out[-3000:]
