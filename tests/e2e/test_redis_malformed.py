"""1,000 malformed messages written straight into Redis beside 1,000 good
tasks, then one real ``greenq-worker --burst`` (issue 7, deliverable 1).

The bad ones go through the raw write path, in the broker's key layout: stream
entries with bad fields (a message id that is not UTF-8, a missing, repeated
or unknown field), entries whose body is not a greenq envelope (random bytes,
text, JSON that is not an object, envelope fields of the wrong type, deep
nesting, an unknown task), and delayed members that do not parse or carry a
bad body.  Every good task must complete, every bad message must be
dead-lettered, nothing may be left ready or held, and the worker exits 0.

The generator is seeded: GREENQ_TEST_SEED replays a run; the seed and the
counts per kind are printed.
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

pytestmark = [pytest.mark.e2e, pytest.mark.redis]

GOOD = BAD = 1000
Q = "default"
#: kinds the broker must report as bad transport metadata (Delivery.error)
FIELD_KINDS = ("m not UTF-8", "no m field", "no b field", "unknown field", "repeated field",
               "malformed delayed member")


def envelope(rng: random.Random, **fields) -> dict:
    """A valid envelope of e2e.add (it would run and succeed), then ``fields``."""
    env = {"v": 1, "ct": "json", "task": "e2e.add", "id": f"bad-{uuid.UUID(int=rng.getrandbits(128))}",
           "queue": Q, "args": [1, 1], "kwargs": {}}
    env.update(fields)
    return env


def body(env: dict) -> bytes:
    return json.dumps(env).encode()


#: envelope fields and values of a type the decoder must refuse
WRONG_TYPES: List[Tuple[str, object]] = [
    ("v", "1"), ("v", 2), ("task", 5), ("task", None), ("id", ["x"]), ("id", {"a": 1}),
    ("args", "1, 1"), ("args", {"0": 1}), ("kwargs", [1]), ("kwargs", "x"), ("ct", ["json"]),
    ("ct", "yaml"), ("expires", "soon"), ("expires", [1]), ("eta", "abc"), ("eta", {}),
    ("time_limit", "5"), ("soft_time_limit", [5]), ("priority", "high"), ("retries", "x"),
    ("retries", [0]), ("created", "yesterday"), ("root_id", 7), ("reply_to", 3),
]


def without(env: dict, name: str) -> dict:
    del env[name]
    return env


def bad_bodies(rng: random.Random) -> Dict[str, Callable[[], bytes]]:
    """Kinds of bad body; each makes one."""
    def deep() -> bytes:
        depth = rng.randint(100_000, 200_000)
        raw = body(envelope(rng, args=["X"]))
        return raw.replace(b'["X"]', b"[" * depth + b"]" * depth)

    def wrong_type() -> bytes:
        name, value = rng.choice(WRONG_TYPES)
        return body(envelope(rng, **{name: value}))

    return {
        "random bytes": lambda: bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 200))),
        "not JSON": lambda: "".join(rng.choice("{}[]:,\"abc 123") for _ in range(rng.randint(1, 80))).encode(),
        "non-UTF-8 JSON": lambda: body(envelope(rng)).replace(b'"e2e.add"', b'"e2e.\xff\xfeadd"'),
        "JSON non-object": lambda: json.dumps(rng.choice(
            [[1, 2], "task", 42, 1.5, None, True, [{"task": "e2e.add"}]])).encode(),
        "no task or id": lambda: body(without(envelope(rng), rng.choice(["task", "id"]))),
        "wrong-typed field": wrong_type,
        "deep nesting": deep,
        "unknown task": lambda: body(envelope(rng, task=f"no.such.task{rng.randint(0, 99)}")),
    }


def bad_entries(rng: random.Random, prefix: str) -> List[Tuple[str, list]]:
    """(kind, redis command) of each bad message, in a random order."""
    bodies = bad_bodies(rng)

    def stream() -> str:
        return f"{prefix}:q:{Q}:{rng.randint(0, 9)}"

    def mid() -> bytes:
        return f"bad-{uuid.UUID(int=rng.getrandbits(128))}".encode()

    def good_body() -> bytes:                 # would run: only the fields are wrong
        return body(envelope(rng))

    def delayed(member: bytes) -> list:
        return ["ZADD", f"{prefix}:delayed:{Q}", rng.randint(0, 1000), member]

    def delayed_good_shape() -> bytes:
        kind = rng.choice(sorted(bodies))
        ident, b = mid(), bodies[kind]()
        return b"%08d%d%d:%s%s" % (rng.randint(0, 10**8 - 1), rng.randint(0, 9), len(ident), ident, b)

    kinds: Dict[str, Callable[[], list]] = {
        "m not UTF-8": lambda: ["XADD", stream(), "*", "b", good_body(), "m", b"\xff" + mid()],
        "no m field": lambda: ["XADD", stream(), "*", "b", good_body()],
        "no b field": lambda: ["XADD", stream(), "*", "m", mid()],
        "unknown field": lambda: ["XADD", stream(), "*", "b", good_body(), "m", mid(),
                                  rng.choice(["x", "B", "\u00e9", b"\xfe"]), b"1"],
        "repeated field": lambda: ["XADD", stream(), "*", "b", good_body(), "m", mid(), "m", mid()],
        # unique (a sorted set would fold equal members into one message)
        "malformed delayed member": lambda: delayed(
            rng.choice([b"", b"short", b"abcdefgh", b"abcdefghX3:abc"]) + b"%032x" % rng.getrandbits(128)),
        "delayed member, bad body": lambda: delayed(delayed_good_shape()),
    }
    for name, make_body in bodies.items():
        kinds[name] = (lambda make_body=make_body: ["XADD", stream(), "*", "b", make_body(), "m", mid()])
    names = sorted(kinds)
    out = []
    for _ in range(BAD):
        kind = rng.choice(names)
        out.append((kind, kinds[kind]()))
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
    seed = int(os.environ.get("GREENQ_TEST_SEED") or random.SystemRandom().randrange(2**32))
    rng = random.Random(seed)
    app = redis_env.app()
    broker = app.broker
    broker.declare([Q])
    raw = redis.Redis.from_url(redis_url)
    bad = bad_entries(rng, broker.prefix)
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
    raw.close()
