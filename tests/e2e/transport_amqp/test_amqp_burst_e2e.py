"""A --burst worker on RabbitMQ waits for delayed messages it did not send:
another client's countdown, held in the broker's delay cascade (where
``greenq queues`` counts it as delayed), is run before the worker stops, and
so are messages moving down the cascade while the worker decides whether
its queues are done."""
from __future__ import annotations

import json
import sys
import time
import uuid

import pytest

from tests.e2e.conftest import HERE, Env

pytestmark = [pytest.mark.e2e, pytest.mark.amqp]


@pytest.fixture
def amqp_env(tmp_path, amqp_url):
    sys.path.insert(0, str(HERE))
    queue = f"e2e-{uuid.uuid4().hex[:8]}"
    env = Env(tmp_path, amqp_url, {"GREENQ_DEFAULT_QUEUE": queue, "GREENQ_WORKER_QUEUES": queue})
    env.queue = queue
    yield env
    env.cleanup()


def delayed_of(env: Env) -> int:
    """The ``delayed`` count of ``greenq queues`` for the test's queue."""
    listing = env.admin("queues", "--json")
    assert listing.returncode == 0, listing.stderr
    rows = [q for q in json.loads(listing.stdout)["queues"] if q["name"] == env.queue]
    assert len(rows) == 1, listing.stdout
    return int(rows[0]["delayed"])


def test_a_burst_worker_runs_another_clients_countdown_before_it_stops(pool, amqp_env):
    import e2e_tasks
    amqp_env.app()
    sent = time.time()
    result = e2e_tasks.add.apply_async((20, 22), countdown=4)   # this process is the other client
    assert delayed_of(amqp_env) == 1                             # in the delay cascade, counted
    code, out = amqp_env.run_worker(pool)
    assert code == 0, out
    assert "burst: queues are empty, stopping" in out, out
    assert result.get(timeout=1) == 42, out                      # run before the worker left
    assert time.time() - sent >= 4
    assert delayed_of(amqp_env) == 0


def test_a_burst_worker_does_not_stop_while_countdowns_move_down_the_cascade(pool, amqp_env):
    """Forty countdowns 0.05 s apart, over every level below 2 s: whenever
    the worker finds its queue empty, a message is moving from one delay
    queue to the next or into the queue."""
    import e2e_tasks
    amqp_env.app()
    results = [e2e_tasks.add.apply_async((i, 0), countdown=0.05 * (i + 1)) for i in range(40)]
    code, out = amqp_env.run_worker(pool, "-c", "4")
    assert code == 0, out
    assert [r.get(timeout=1) for r in results] == list(range(40)), out
