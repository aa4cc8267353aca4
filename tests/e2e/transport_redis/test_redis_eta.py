"""A message whose envelope eta is in the future must not run early on Redis,
whichever path published it (issue 7, suspected defect).

Every greenq client path carries the envelope's eta as ``Outgoing.eta`` into
the delayed set (tests/integration/transport_redis/test_redis_malformed.py checks that).  A
message that reaches a stream with a future envelope eta anyway (another
producer, a hand-written entry) is the worker's to hold back: the broker never
decodes bodies.
"""
from __future__ import annotations

import json
import sys
import time

import pytest

from tests.e2e.conftest import HERE, Env

pytestmark = [pytest.mark.e2e, pytest.mark.redis]


@pytest.fixture
def redis_env(tmp_path, redis_url, redis_prefix):
    sys.path.insert(0, str(HERE))
    env = Env(tmp_path, redis_url, {"GREENQ_KEY_PREFIX": redis_prefix})
    yield env
    env.cleanup()


def test_envelope_eta_in_a_stream_entry_is_not_run_early(pool, redis_env, redis_url):
    import redis
    app = redis_env.app()
    app.broker.declare(["default"])
    env = {"v": 1, "ct": "json", "task": "e2e.add", "id": "eta-in-envelope-only", "queue": "default",
           "args": [1, 1], "kwargs": {}, "eta": time.time() + 3600, "created": time.time()}
    raw = redis.Redis.from_url(redis_url)
    raw.xadd(f"{app.broker.prefix}:q:default:0", {"b": json.dumps(env), "m": env["id"]})
    raw.close()
    code, out = redis_env.run_worker(pool)
    assert code == 0, out
    assert not app.AsyncResult(env["id"]).ready(), "ran an hour early"
    [stats] = app.broker.queue_stats(["default"])
    assert (stats.ready, stats.delayed, stats.dead) == (0, 1, 0)     # waiting for its eta, in the broker
