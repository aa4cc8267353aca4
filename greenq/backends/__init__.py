"""Result backends by URL scheme, imported on first use only."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from ..brokers import load_class, scheme_of
from .base import ResultBackend

if TYPE_CHECKING:  # pragma: no cover
    from ..config import Config
    from ..drivers.base import Driver

BACKENDS = {
    "sqlite": ("greenq.transports.sqlite.results", "SQLiteBackend", None),
    "memory": ("greenq.transports.memory.results", "MemoryBackend", None),
    "redis": ("greenq.transports.redis.results", "RedisBackend", "redis"),
    "rediss": ("greenq.transports.redis.results", "RedisBackend", "redis"),
    "redis+sentinel": ("greenq.transports.redis.results_sentinel", "RedisSentinelBackend", "redis"),
    "redis+cluster": ("greenq.transports.redis.results_cluster", "RedisClusterBackend", "redis"),
    "rpc": ("greenq.transports.amqp.rpc", "RPCBackend", "amqp"),
}

#: backend used when ``result_backend`` is empty, by broker scheme
DERIVED = {"amqp": "rpc://", "pyamqp": "rpc://", "amqps": "rpc://"}


def backend_url_for(config: "Config") -> str:
    """``result_backend`` when set, else the one the broker implies."""
    if config.result_backend:
        return config.result_backend
    return DERIVED.get(scheme_of(config.broker_url), config.broker_url)


def make_backend(url: str, config: "Config", driver: Optional["Driver"] = None) -> ResultBackend:
    return load_class(BACKENDS, url, "result backend")(url, config, driver)


__all__ = ["ResultBackend", "make_backend", "backend_url_for", "BACKENDS"]
