"""Session-wide private deployments (one Redis Cluster, one Sentinel set) for
tests/clusters, and ``broker_env``/``backend_env`` pointing the shared suites
of tests/integration at them."""
from __future__ import annotations

import uuid

import pytest

from tests.integration.conftest import Env

from .servers import REDIS_CLI, REDIS_SERVER, RedisCluster, RedisSentinel


def _need_redis_server() -> None:
    if REDIS_SERVER is None or REDIS_CLI is None:
        from tests.conftest import _missing
        _missing("redis-server/redis-cli (to start a private cluster)")


@pytest.fixture(scope="session")
def redis_cluster():
    _need_redis_server()
    deployment = RedisCluster()
    yield deployment
    deployment.stop()


@pytest.fixture
def own_cluster():
    """A cluster of the test's own, for a test that kills one of its masters."""
    _need_redis_server()
    deployment = RedisCluster()
    yield deployment
    deployment.stop()


@pytest.fixture
def sentinel():
    """Its own deployment per test: the failover tests kill its master."""
    _need_redis_server()
    deployment = RedisSentinel()
    yield deployment
    deployment.stop()


class DeploymentEnv(Env):
    """The shared suites' Env on a private deployment's URL."""

    def __init__(self, url: str) -> None:   # noqa: D107 - Env's, minus the shared servers
        self.kind = "redis"
        self.tag = uuid.uuid4().hex[:8]
        self.driver = None
        self._opened = []
        self._queues = []
        self._settings = {"key_prefix": f"gqc-{self.tag}"}
        self.broker_url = self.backend_url = url
        # Redis Cluster: one lane per queue, so the order between queues on
        # different masters is not kept (greenq/transports/redis/broker_cluster.py)
        self.queue_order_kept = not url.startswith("redis+cluster://")


@pytest.fixture(params=["cluster"])
def broker_env(request, redis_cluster):
    env = DeploymentEnv(redis_cluster.url)
    yield env
    env.teardown()


@pytest.fixture(params=["cluster"])
def backend_env(request, redis_cluster):
    env = DeploymentEnv(redis_cluster.url)
    yield env
    env.teardown()

