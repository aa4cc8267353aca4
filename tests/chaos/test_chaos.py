"""The CI-sized chaos runs: real workers, kill -9, connection resets and a
blackhole (see scenario.py); nothing may be lost, duplicates stay among the
tasks a fault caught in flight, and the workers resume at once.

gevent runs on all three brokers, eventlet on the two networked ones
(GREENQ_TEST_DRIVERS picks the driver, as for the e2e tests).
GREENQ_CHAOS_SEED replays a run's fault schedule."""
from __future__ import annotations

import os
import random

import pytest

from tests.conftest import delete_queues, own_prefix
from .scenario import Plan, Run, table

DRIVERS = [d for d in os.environ.get("GREENQ_TEST_DRIVERS", "gevent").split(",") if d]
BROKERS = {"gevent": ("sqlite", "redis", "amqp"), "eventlet": ("redis", "amqp")}
COMBINATIONS = [(pool, broker) for pool in DRIVERS for broker in BROKERS.get(pool, ())]
RESUME_LIMIT = 5.0

pytestmark = [pytest.mark.chaos, pytest.mark.e2e]


@pytest.mark.timeout(420)
@pytest.mark.parametrize("pool,broker", COMBINATIONS)
def test_nothing_lost_under_kills_resets_and_a_blackhole(pool, broker, request, tmp_path):
    """2,000 tasks, 3 kill -9, and on Redis/RabbitMQ a reset and a 20 s
    blackhole: none lost, every duplicate caught in flight by a fault, the
    workers back within 5 s of the path."""
    settings = {}
    if broker == "sqlite":
        url = f"sqlite:///{tmp_path / 'broker.sqlite3'}"
    elif broker == "redis":
        url = request.getfixturevalue("redis_url")
        settings["key_prefix"] = request.getfixturevalue("redis_prefix")
    else:   # a prefix of its own: its dead letters and control are its alone on a shared vhost
        url = request.getfixturevalue("amqp_url")
        settings["key_prefix"] = own_prefix()
    seed = int(os.environ.get("GREENQ_CHAOS_SEED") or random.randrange(1 << 30))
    plan = Plan(broker, pool, seed=seed)
    run = Run(plan, tmp_path, url, settings)
    if broker == "amqp":
        request.addfinalizer(lambda: delete_queues(url, [run.queue], settings["key_prefix"]))
    f = run.execute()
    print("\n" + table([f.row()]))
    why = f"GREENQ_CHAOS_SEED={seed}: {f}\n" + "\n".join(run.timeline) + f"\n{run.workers.tails()}"
    assert f.sent == plan.tasks, why
    assert f.lost == 0, why
    assert f.left == (0, 0, 0, 0), why                 # nothing ready, delayed, held or dead-lettered
    assert f.kills == plan.kills, why
    assert f.abandoned == 0, why                       # every task a live worker began, it finished
    assert not f.unexplained, why
    assert f.duplicated <= f.bound, why
    assert all(code == 0 for code in f.exits.values()), why
    if plan.networked:
        assert f.resets > 0, why
        assert f.leaked == 0, why                      # the blackhole held every byte
        assert f.resume is not None and f.resume <= RESUME_LIMIT, why
