"""Fixtures of the shared suites that every broker and result backend passes.

``broker_env`` (memory, sqlite, redis, amqp) and ``backend_env`` (memory,
sqlite, redis, rpc) each give an :class:`Env`: a factory of fresh instances
that share one namespace of this test's own (sqlite: a file in tmp_path;
memory: ``memory://<uuid>``; redis: the ``redis_prefix`` as ``key_prefix``;
amqp and rpc: the run's vhost and key_prefix (``AMQP_PREFIX``), with queue
names of this test's own, deleted after the test).  Every instance is closed
after the test.

A param whose module is not written yet is skipped (only then: an import
error in a module that exists fails the test).  Redis and RabbitMQ params skip
when the server is not answering, or fail under GREENQ_TEST_REQUIRE_SERVICES=1.

``GREENQ_TEST_DRIVER=gevent|eventlet|threads`` hands that driver to every
instance; test_green_drivers.py runs the suites that way, patched, in a
subprocess.
"""
from __future__ import annotations

import importlib.util
import os
import uuid
from typing import Any, List

import pytest

from greenq.backends import make_backend
from greenq.brokers import make_broker
from greenq.drivers import get_driver
from tests.conftest import delete_queues, make_config

MODULES = {
    "broker": {"memory": "greenq.transports.memory.broker", "sqlite": "greenq.transports.sqlite.broker",
               "redis": "greenq.transports.redis.broker", "amqp": "greenq.transports.amqp.broker"},
    "backend": {"memory": "greenq.transports.memory.results", "sqlite": "greenq.transports.sqlite.results",
                "redis": "greenq.transports.redis.results", "rpc": "greenq.transports.amqp.rpc"},
}


def _require_module(kind: str, which: str) -> None:
    """Skip when the implementation's file does not exist yet."""
    module = MODULES[which][kind]
    if importlib.util.find_spec(module) is None:
        pytest.skip(f"{module.replace('.', '/')}.py is not written yet")


class Env:
    """Fresh brokers and backends sharing one isolated namespace."""

    def __init__(self, kind: str, request: Any, tmp_path: Any) -> None:
        self.kind = kind
        self.tag = uuid.uuid4().hex[:8]
        driver_name = os.environ.get("GREENQ_TEST_DRIVER")
        self.driver = get_driver(driver_name) if driver_name else None
        self._opened: List[Any] = []
        self._queues: List[str] = []
        self._settings = {}
        if kind in ("memory", "toy"):   # toy: tests/fixtures/toy.py, once registered
            self.broker_url = self.backend_url = f"{kind}://{self.tag}"
        elif kind == "sqlite":
            self.broker_url = self.backend_url = f"sqlite:///{tmp_path}/greenq.sqlite3"
        elif kind == "redis":
            self.broker_url = self.backend_url = request.getfixturevalue("redis_url")
            self._settings["key_prefix"] = request.getfixturevalue("redis_prefix")
        elif kind in ("amqp", "rpc"):
            self.broker_url = request.getfixturevalue("amqp_url")
            self.backend_url = "rpc://"
        else:  # pragma: no cover
            raise AssertionError(kind)

    @property
    def shared(self) -> bool:
        """True when any backend instance sees every result (not rpc://, which
        delivers a result only to the process that published the task)."""
        return self.kind != "rpc"

    @property
    def leases(self) -> bool:
        """False for RabbitMQ, which has no leases: a held message comes back
        when its consumer's connection dies, however long that takes."""
        return self.kind != "amqp"

    @property
    def isolated(self) -> bool:
        """True when the dead-letter store holds this test's letters only
        (the amqp vhost is shared by every test of the run)."""
        return self.kind not in ("amqp", "rpc")

    def config(self, **settings: Any):
        return make_config(broker_url=self.broker_url, result_backend=self.backend_url,
                           **{**self._settings, **settings})

    def queue(self, name: str = "q") -> str:
        """A queue name of this test's own."""
        self._queues.append(f"gqt-{self.tag}-{name}")
        return self._queues[-1]

    def broker(self, **settings: Any):
        return self._track(make_broker(self.broker_url, self.config(**settings), self.driver))

    def consumer(self, queues: List[str], **settings: Any):
        """A broker that declared ``queues``, as a starting worker does."""
        broker = self.broker(**settings)
        broker.declare(queues)
        return broker

    def backend(self, **settings: Any):
        return self._track(make_backend(self.backend_url, self.config(**settings), self.driver))

    def close(self, instance: Any) -> None:
        self._opened.remove(instance)
        instance.close()

    def _track(self, instance: Any) -> Any:
        self._opened.append(instance)
        return instance

    def teardown(self) -> None:
        while self._opened:
            self._opened.pop().close()
        if self.kind in ("amqp", "rpc") and self._queues:
            delete_queues(self.broker_url, set(self._queues), self.config().key_prefix)


def _env(request: Any, tmp_path: Any, which: str) -> Env:
    _require_module(request.param, which)
    return Env(request.param, request, tmp_path)


@pytest.fixture(params=["memory", "sqlite",
                        pytest.param("redis", marks=pytest.mark.redis),
                        pytest.param("amqp", marks=pytest.mark.amqp)])
def broker_env(request, tmp_path):
    env = _env(request, tmp_path, "broker")
    yield env
    env.teardown()


@pytest.fixture(params=["memory", "sqlite",
                        pytest.param("redis", marks=pytest.mark.redis),
                        pytest.param("rpc", marks=pytest.mark.amqp)])
def backend_env(request, tmp_path):
    env = _env(request, tmp_path, "backend")
    yield env
    env.teardown()
