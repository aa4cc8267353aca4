"""RabbitMQ with real workers (each driver of GREENQ_TEST_DRIVERS): the broker
drops the test's connections mid-run (its own only: the vhost may be shared), heartbeats while the pool is full, and a Redis
result backend beside a RabbitMQ broker."""
from __future__ import annotations

import signal
import os
import sys
import uuid

import pytest

from tests.conftest import close_connections, ctl_or_skip
from tests.e2e.conftest import HERE, Env

pytestmark = [pytest.mark.e2e, pytest.mark.amqp]


@pytest.fixture
def amqp_env(tmp_path, amqp_url):
    sys.path.insert(0, str(HERE))
    queue = f"e2e-{uuid.uuid4().hex[:8]}"
    env = Env(tmp_path, amqp_url, {"GREENQ_DEFAULT_QUEUE": queue, "GREENQ_WORKER_QUEUES": queue})
    yield env
    env.cleanup()


def stop(proc) -> str:
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    return out


def test_worker_and_client_survive_their_connections_closed(pool, amqp_env):
    ctl_or_skip("close the worker's and the client's connections")
    import e2e_tasks
    amqp_env.app()
    results = [e2e_tasks.slow.delay(f"c{i}", 0.2) for i in range(60)]
    proc = amqp_env.worker(pool, "-c", "10", burst=False)
    amqp_env.wait_marker("c5.finished")
    # the worker's (its consumer, publishers, control) and this client's, nobody else's
    assert close_connections(amqp_env.broker_url, [proc.pid, os.getpid()], "greenq e2e: broker drops us") >= 3
    # the worker reconnects and goes on; the client's reply queue is still there
    assert [r.get(timeout=60) for r in results] == [f"c{i}" for i in range(60)]
    late = e2e_tasks.add.delay(1, 1)   # the client's publishing pool reconnects too
    assert late.get(timeout=30) == 2
    out = stop(proc)
    assert "consumer connection" in out and "restored" in out, out
    finished = sum(amqp_env.marker_count(f"c{i}.finished") for i in range(60))
    assert finished >= 60   # at-least-once: what was in flight ran again


def test_heartbeats_flow_while_the_pool_is_full(pool, amqp_env):
    import e2e_tasks
    amqp_env.env["GREENQ_AMQP_HEARTBEAT"] = "1"
    amqp_env.app()
    results = [e2e_tasks.slow.delay(f"h{i}", 3.5) for i in range(4)]
    proc = amqp_env.worker(pool, "-c", "2", burst=False)
    assert [r.get(timeout=30) for r in results] == [f"h{i}" for i in range(4)]
    out = stop(proc)
    assert "connection to" not in out, out   # never lost (two full pools of 3.5 s, heartbeat 1 s)


def test_redis_results_with_a_rabbitmq_broker(pool, amqp_env, redis_url, redis_prefix):
    import e2e_tasks
    amqp_env.env.update({"GREENQ_RESULT_BACKEND": redis_url, "GREENQ_KEY_PREFIX": redis_prefix})
    app = amqp_env.app()
    assert app.backend.reply_to() is None   # results are stored by task id, not sent back
    r = e2e_tasks.add.delay(20, 22)
    code, out = amqp_env.run_worker(pool)
    assert code == 0, out
    assert r.get(timeout=10) == 42
    other = amqp_env.client(f"import e2e_tasks\nprint(e2e_tasks.app.AsyncResult({r.id!r}).get(timeout=10))")
    assert other.stdout.strip() == "42", other.stderr   # any process can read it
