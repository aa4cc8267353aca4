"""Brokers by URL scheme.  Each implementation is imported on first use only."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Optional
from urllib.parse import urlsplit

from ..exceptions import ConfigError
from .base import Broker, DeadLetter, Delivery, Outgoing, QueueStats

if TYPE_CHECKING:  # pragma: no cover
    from ..config import Config
    from ..drivers.base import Driver

BROKERS = {
    "sqlite": ("greenq.transports.sqlite.broker", "SQLiteBroker", None),
    "memory": ("greenq.transports.memory.broker", "MemoryBroker", None),
    "redis": ("greenq.transports.redis.broker", "RedisBroker", "redis"),
    "rediss": ("greenq.transports.redis.broker", "RedisBroker", "redis"),
    "redis+sentinel": ("greenq.transports.redis.broker_sentinel", "RedisSentinelBroker", "redis"),
    "redis+cluster": ("greenq.transports.redis.broker_cluster", "RedisClusterBroker", "redis"),
    "amqp": ("greenq.transports.amqp.broker", "AMQPBroker", "amqp"),
    "pyamqp": ("greenq.transports.amqp.broker", "AMQPBroker", "amqp"),
    "amqps": ("greenq.transports.amqp.broker", "AMQPBroker", "amqp"),
}


def scheme_of(url: str) -> str:
    return urlsplit(url).scheme.lower()


def load_class(table: dict, url: str, what: str):
    scheme = scheme_of(url)
    if scheme not in table:
        raise ConfigError(f"{what} URL scheme {scheme + '://' if scheme else repr(url)} is not supported; "
                          f"use one of: {', '.join(s + '://' for s in table)}")
    module, name, extra = table[scheme]
    try:
        mod = importlib.import_module(module)
    except ImportError as exc:
        if extra:
            raise ConfigError(f"{what} {scheme}:// needs the {extra} package: "
                              f"pip install 'greenq[{extra}]' ({exc})") from None
        raise
    return getattr(mod, name)


def make_broker(url: str, config: "Config", driver: Optional["Driver"] = None) -> Broker:
    return load_class(BROKERS, url, "broker")(url, config, driver)


__all__ = ["Broker", "Delivery", "Outgoing", "DeadLetter", "QueueStats", "make_broker", "BROKERS"]
