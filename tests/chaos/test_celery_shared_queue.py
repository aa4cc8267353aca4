"""A Celery queue shared by real Celery workers and real greenq workers, one
kill -9 of each kind mid-run (celery_shared.py): 1,000 tasks sent by a real
Celery client, none lost but the one a killed Celery worker may have popped
and not yet recorded (kombu's BRPOP window), and every duplicate one of the
tasks the killed workers held (issue 21, deliverable 4; docs/celery.md, "Sharing a queue
under failure").  bin/greenq-celery-shared runs it at 10,000 tasks.

It runs on a private redis-server: kombu's unacked index is one per database,
and the run's 10-s visibility timeout would hand out what other tests'
workers hold on the shared one.  The RabbitMQ run uses a vhost of its own
(and the private Redis for its ledger only)."""
from __future__ import annotations

import os
import random
import shutil

import pytest

from tests.conftest import _missing
from tests.fixtures.celery.clients import celery_python
from .celery_shared import SharedPlan, SharedRun, private_redis, private_vhost, table

pytestmark = [pytest.mark.chaos, pytest.mark.e2e, pytest.mark.redis]

DRIVERS = [d for d in os.environ.get("GREENQ_TEST_DRIVERS", "gevent").split(",") if d]


@pytest.mark.timeout(240)
@pytest.mark.skipif("gevent" not in DRIVERS, reason="one green driver is enough: the greenq workers run gevent, "
                                                    "and the Celery workers are Celery's own")
def test_a_shared_celery_queue_loses_nothing_when_a_worker_of_each_kind_is_killed(tmp_path):
    from tests.clusters.servers import REDIS_SERVER
    if REDIS_SERVER is None:
        _missing("redis-server (the shared-queue run needs a private one)")
    python = celery_python()
    seed = int(os.environ.get("GREENQ_CHAOS_SEED") or random.randrange(1 << 30))
    plan = SharedPlan(seed=seed)
    with private_redis() as url:
        run = SharedRun(plan, tmp_path, url, python)
        f = run.execute()
    print("\n" + table([f.row()]))
    why = f"GREENQ_CHAOS_SEED={seed}: {f}\n" + "\n".join(run.timeline) + "\n" + run.tails()
    assert f.sent == plan.tasks, why
    # greenq's fetch pops a message and records it in kombu's unacked in one script: nothing a
    # killed greenq worker took is lost.  kombu's consumer BRPOPs, then records: the one message
    # in that window when a Celery worker dies (popped, in its socket, never begun) is lost --
    # Celery's own loss (celery/celery#4354), at most one per Celery kill (one BRPOP at a time)
    assert f.lost <= 1 and f.never_started == f.missing, why
    assert not set(f.missing) & set(run.killed["greenq"].values()), why   # the greenq victim's all ran
    assert f.left == 0 and f.dead == 0, why              # nothing on the lists, in unacked or dead-lettered
    assert f.held["greenq"] > 0 and f.held["celery"] > 0, why   # each kill caught tasks in flight
    assert not f.unexplained, why                        # only the killed workers' tasks ran twice
    assert f.duplicated <= f.in_flight, why
    assert f.by.get("greenq", 0) > 0 and f.by.get("celery", 0) > 0, why
    assert all(code == 0 for code in f.exits.values()), why


@pytest.mark.amqp
@pytest.mark.timeout(240)
@pytest.mark.skipif("gevent" not in DRIVERS, reason="one green driver is enough: the greenq workers run gevent, "
                                                    "and the Celery workers are Celery's own")
def test_a_shared_celery_queue_on_rabbitmq_loses_nothing_when_a_worker_of_each_kind_is_killed(tmp_path):
    """The same run on RabbitMQ: a killed consumer's unacknowledged messages
    (running or prefetched) come back when its connection closes, for both
    kinds of worker (Celery's with task_acks_late): nothing is lost, not even
    the one message of Redis's BRPOP window."""
    from tests.clusters.servers import REDIS_SERVER
    if REDIS_SERVER is None:
        _missing("redis-server (the shared-queue run keeps its ledger in a private one)")
    if shutil.which("rabbitmqctl") is None:
        _missing("rabbitmqctl (the RabbitMQ shared-queue run makes a vhost of its own)")
    python = celery_python()
    seed = int(os.environ.get("GREENQ_CHAOS_SEED") or random.randrange(1 << 30))
    plan = SharedPlan(seed=seed, broker="amqp")
    with private_redis() as url, private_vhost() as vhost:
        run = SharedRun(plan, tmp_path, url, python, broker_url=vhost)
        f = run.execute()
    print("\n" + table([f.row()]))
    why = f"GREENQ_CHAOS_SEED={seed}: {f}\n" + "\n".join(run.timeline) + "\n" + run.tails()
    assert f.sent == plan.tasks, why
    assert f.lost == 0 and not f.missing, why
    assert f.left == 0 and f.dead == 0, why              # nothing left on the queue or dead-lettered
    assert f.held["greenq"] > 0 and f.held["celery"] > 0, why   # each kill caught tasks running
    assert f.interrupted >= f.in_flight, why             # and those ran again elsewhere
    assert not f.unexplained, why                        # only tasks a killed worker began ran twice
    assert f.by.get("greenq", 0) > 0 and f.by.get("celery", 0) > 0, why
    assert all(code == 0 for code in f.exits.values()), why
