"""The scheduler's lease in every broker (greenq/leadership.py): one holder at a
time, renewed by its holder, passed on when the holder dies, and the runs
sent (written only by the holder) carried over to the next one."""
from __future__ import annotations

import time

import pytest

from greenq import transports
from tests.conftest import own_prefix

TTL = 0.5


@pytest.fixture
def leases(broker_env):
    config = broker_env.config(key_prefix=own_prefix()) if broker_env.kind == "amqp" \
        else broker_env.config()
    made = []

    def make():
        lease = transports.load(broker_env.broker_url, "leadership", "lease")(broker_env.broker_url, config, TTL)
        made.append(lease)
        return lease
    yield make
    for lease in made:
        lease.close()


def die(env_kind: str, lease) -> None:
    """The holder stops: RabbitMQ sees its connection go; elsewhere it stops renewing."""
    if env_kind == "amqp":
        lease.close()
    else:
        time.sleep(TTL + 0.1)


def test_one_holder_and_fenced_writes(broker_env, leases):
    a, b = leases(), leases()
    assert a.acquire("A") is True
    assert b.acquire("B") is False
    assert a.acquire("A") is True                  # renewed
    assert b.acquire("B") is False
    assert a.record("A", "tick", 1010.0) is True
    assert b.record("B", "tick", 9999.0) is False  # not the holder: refused
    assert a.last_runs() == {"tick": 1010.0}


def test_a_dead_holder_hands_over_with_its_runs(broker_env, leases):
    a, b = leases(), leases()
    assert a.acquire("A")
    a.record("A", "tick", 1010.0)
    a.record("A", "tock", 5.0)
    a.record("A", "tick", 1020.0)
    die(broker_env.kind, a)
    deadline = time.monotonic() + 5
    while not b.acquire("B"):
        assert time.monotonic() < deadline, "the lease never passed on"
        time.sleep(0.05)
    assert b.last_runs() == {"tick": 1020.0, "tock": 5.0}
    assert b.record("B", "tick", 1030.0)
    if broker_env.kind != "amqp":                  # a's connection is gone on RabbitMQ
        assert a.record("A", "tick", 1040.0) is False
        assert a.acquire("A") is False
    assert b.last_runs() == {"tick": 1030.0, "tock": 5.0}


def test_release_frees_the_lease_at_once(broker_env, leases):
    a, b = leases(), leases()
    assert a.acquire("A")
    a.release("A")
    assert b.acquire("B")
