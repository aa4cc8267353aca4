"""``redis+sentinel://`` result backend: RedisBackend on the master Sentinel
names (see greenq.transports.redis.broker_sentinel); the result listener resubscribes on
the new master after a failover and wakes every waiter to read again."""
from __future__ import annotations

from .topology import make_sentinel_client
from .results import RedisBackend


class RedisSentinelBackend(RedisBackend):
    """RedisBackend on the master Sentinel names."""

    client_factory = staticmethod(make_sentinel_client)
