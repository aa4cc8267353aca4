"""Bad input written straight into the embedded SQLite broker, and tasks whose
outcome cannot be stored as it is: every bad message is dead-lettered with a
reason, every good task completes, and the worker never stops (issue 7).

The Redis and RabbitMQ versions of the 1,000-message test live beside their
brokers' tests (they write through those brokers' raw paths)."""
from __future__ import annotations

import random
import sqlite3
import time

import pytest

from tests.malformed import bad_bodies

SEED = 7


def _raw_insert(path: str, rows) -> None:
    """Rows written the way another program would: no greenq code involved."""
    conn = sqlite3.connect(path)
    with conn:
        conn.executemany("INSERT INTO messages (queue, priority, visible_at, claimed_by, deliveries, "
                         "message_id, body) VALUES (?, ?, ?, NULL, ?, ?, ?)", rows)
    conn.close()


def _bad_columns(rng: random.Random, good_body: bytes):
    """A good body under a column of the wrong type: the transport metadata is what is bad."""
    now = time.time()
    return rng.choice([
        ("default", 0, now, 0, b"\x80blob-id", good_body),            # message_id a blob
        ("default", 0, now, 0, b"blob-id", good_body),                # message_id a blob
        ("default", 0, now, "abc", "mid", good_body),                 # deliveries text
        ("default", "abc", now, 0, "mid", good_body),                 # priority text: never fetched
        ("default", 42, now, 0, "mid", good_body),                    # priority out of range
        ("default", 0, "later", 0, "mid", good_body),                 # visible_at text
        ("default", 0, now, 0, "mid", 3.5),                           # body a number
    ])


def test_a_thousand_malformed_beside_a_thousand_good(pool, sqlite_env):
    import e2e_tasks
    app = sqlite_env.app()
    path = sqlite_env.broker_url[len("sqlite:///"):]
    rng = random.Random(SEED)
    bad = bad_bodies(900, SEED)
    good_body = app.codec.encode(app.build_message("e2e.add", (1, 2)))
    good = []
    now = time.time()
    for i, (kind, body) in enumerate(bad):
        good.append(e2e_tasks.add.delay(i, 1))
        _raw_insert(path, [("default", 0, now, 0, f"bad-{i}", body)])
    columns = [_bad_columns(rng, good_body) for _ in range(100)]
    _raw_insert(path, columns)
    good.extend(e2e_tasks.add.delay(i, 2) for i in range(100))
    code, out = sqlite_env.run_worker(pool, "-c", "50", timeout=240)
    assert code == 0, out[-3000:]
    assert [r.get(timeout=10) for r in good] == [i + 1 for i in range(900)] + [i + 2 for i in range(100)]
    conn = sqlite3.connect(path)
    dead = conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
    left = conn.execute("SELECT COUNT(*) FROM messages").fetchone()[0]
    reasons = [r for (r,) in conn.execute("SELECT reason FROM dead_letters")]
    conn.close()
    print(f"seed {SEED}: injected {len(bad)} bad bodies and {len(columns)} bad rows; "
          f"{dead} dead-lettered; {len(good)} good tasks completed")
    assert dead == len(bad) + len(columns), reasons[:5]
    assert left == 0
    assert all(r.startswith(("undecodable", "unknown task", "bad transport metadata")) for r in reasons), \
        sorted(set(r[:60] for r in reasons))
    assert sum(r.startswith("bad transport metadata") for r in reasons) == len(columns)
    assert "Traceback" not in out, out[-3000:]


@pytest.mark.parametrize("field,value,words", [("ct", ["json"], "content type"), ("expires", "soon", "expires"),
                                               ("time_limit", "5", "time_limit"), ("args", "deep", "deep")])
def test_json_that_is_not_an_envelope_is_dead_lettered(pool, sqlite_env, field, value, words):
    """Valid JSON that is not a valid envelope: dead-lettered, and the good
    task behind it runs (before: TypeError/RecursionError stopped the worker)."""
    import json
    import e2e_tasks
    app = sqlite_env.app()
    path = sqlite_env.broker_url[len("sqlite:///"):]
    env = json.loads(app.codec.encode(app.build_message("e2e.add", (1, 2))))
    env[field] = value if value != "deep" else json.loads("[" * 900 + "]" * 900)
    app.broker.declare(["default"])
    _raw_insert(path, [("default", 5, time.time(), 0, env["id"], json.dumps(env).encode())])
    fine = e2e_tasks.add.delay(2, 3)
    code, out = sqlite_env.run_worker(pool)
    assert code == 0, out
    assert fine.get(timeout=10) == 5
    listing = sqlite_env.admin("dlq", "list")
    assert "undecodable" in listing.stdout and words in listing.stdout, listing.stdout


def test_call_options_are_checked_before_sending(sqlite_env):
    """Issue 7 item 4: apply_async(time_limit="5") raised nothing and cost a
    runner slot; now it is a ValueError/TypeError naming the option, and
    nothing is sent."""
    import e2e_tasks
    sqlite_env.app()
    for options in ({"time_limit": "5"}, {"soft_time_limit": -1}, {"countdown": float("nan")},
                    {"eta": "tomorrow"}, {"expires": "soon"}, {"priority": 10}, {"priority": "1"},
                    {"queue": ""}, {"queue": "q" * 256}, {"task_id": "x" * 256},
                    {"soft_time_limit": 10, "time_limit": 5}):
        name = next(iter(options)) if len(options) == 1 else "soft_time_limit"
        with pytest.raises((TypeError, ValueError), match=name):
            e2e_tasks.add.apply_async((1, 2), **options)
    stats = e2e_tasks.app.broker.queue_stats(["default"])
    assert stats[0].ready == 0


def test_outcomes_that_cannot_be_stored_as_they_are(pool, sqlite_env):
    """Issue 7 item 5: an exception whose str() raises, a result nested too
    deeply for the serializer, and (with pickle) an object of a local class
    are each stored as a FAILURE saying why; the tasks behind them settle."""
    sqlite_env.env.update({"GREENQ_SERIALIZER": "pickle", "GREENQ_ACCEPT_CONTENT": "json,pickle",
                           "GREENQ_SIGNING_KEY": "e2e-key"})      # pickle needs a signing key
    import e2e_tasks
    sqlite_env.app()
    bad = [e2e_tasks.unprintable_fail.delay(), e2e_tasks.deep_result.delay(5000),
           e2e_tasks.local_object.delay()]
    fine = [e2e_tasks.add.delay(i, i) for i in range(20)]
    code, out = sqlite_env.run_worker(pool)
    assert code == 0, out
    assert [r.get(timeout=10) for r in fine] == [2 * i for i in range(20)]
    for r in bad:
        assert r.state == "FAILURE", (r, out[-2000:])
        exc = r.get(timeout=5, propagate=False)
        assert isinstance(exc, Exception)
    assert type(bad[0].get(timeout=1, propagate=False)).__name__ == "_Unprintable"   # rebuilt as itself
    assert "_Unprintable" in bad[0].traceback
    assert "not serializable" in str(bad[1].get(timeout=1, propagate=False))
    assert "not serializable" in str(bad[2].get(timeout=1, propagate=False))

