"""Issue 17 items 1 and 7 with real greenq-worker processes on Redis: a task
that calls ``sys.exit()`` or raises KeyboardInterrupt fails once (stored,
acknowledged, not requeued nor dead-lettered); with a signing key, a record
written straight into Redis is refused by ``greenq result``; pickle without
a signing key stops the worker at start."""
from __future__ import annotations

import json
import sys

import pytest

from greenq import TaskError
from greenq.config import load

from .conftest import HERE, Env


@pytest.fixture
def redis_env(tmp_path, redis_url, redis_prefix):
    sys.path.insert(0, str(HERE))
    env = Env(tmp_path, redis_url, {"GREENQ_KEY_PREFIX": redis_prefix, "GREENQ_SIGNING_KEY": "e2e-new,e2e-old"})
    env.prefix = redis_prefix
    yield env
    env.cleanup()


def client_app(env: Env):
    """sign_tasks' app in this process, configured as the workers are."""
    import sign_tasks
    env.app("sign_tasks")
    return sign_tasks


def test_a_task_that_exits_fails_once_and_is_acknowledged(pool, redis_env):
    t = client_app(redis_env)
    exited, interrupted, fine = t.exits.delay(3), t.interrupted.delay(), t.add.delay(2, 3)
    code, out = redis_env.run_worker(pool, "-A", "sign_tasks")
    assert code == 0, out
    assert fine.get(timeout=10) == 5
    for result, type_name in ((exited, "builtins.SystemExit"), (interrupted, "builtins.KeyboardInterrupt")):
        assert result.state == "FAILURE", out[-3000:]
        with pytest.raises(TaskError) as caught:          # a TaskError, not the BaseException itself
            result.get(timeout=1)
        assert caught.value.type_name == type_name
        assert type_name.split(".")[1] in result.traceback
    assert redis_env.marker_count("exits") == 1 and redis_env.marker_count("interrupted") == 1
    stats = t.app.broker.queue_stats(["default"])[0]
    assert (stats.ready, stats.held, stats.delayed, stats.dead) == (0, 0, 0, 0)


def test_greenq_result_refuses_a_record_written_into_redis(redis_env):
    t = client_app(redis_env)
    import redis
    client = redis.Redis.from_url(redis_env.broker_url)
    record = {"id": "planted", "state": "SUCCESS", "result": "forged"}
    client.set(f"{redis_env.prefix}:result:planted", b"F" + b"json:" + json.dumps(record).encode())
    done = redis_env.admin("result", "planted")
    assert done.returncode == 1 and "unsigned result record of planted refused" in done.stderr, done
    assert "forged" not in done.stdout
    # the same record signed by the old key is read (rotation: "e2e-new,e2e-old")
    old = load(search=False, env={"GREENQ_SIGNING_KEY": "e2e-old", "GREENQ_BROKER_URL": redis_env.broker_url})
    from greenq.message import Codec
    signed = Codec(signing_key=old.signing_key).encode_result(record)
    client.set(f"{redis_env.prefix}:result:planted", b"F" + signed)
    done = redis_env.admin("result", "planted", "--json")
    assert done.returncode == 0 and json.loads(done.stdout)["result"] == "forged", done
    assert t.app.AsyncResult("planted").get(timeout=1) == "forged"


def test_pickle_without_signing_key_stops_the_worker_at_start(pool, sqlite_env):
    sqlite_env.env.update({"GREENQ_ACCEPT_CONTENT": "json,pickle"})
    code, out = sqlite_env.run_worker(pool, "-A", "sign_tasks", timeout=30)
    assert code != 0
    assert "accept_content" in out and "signing_key" in out, out
