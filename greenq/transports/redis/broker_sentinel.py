"""``redis+sentinel://host:26379[,host:26379…]/db?master=NAME``: the Redis
broker on whichever server Sentinel says is the master of ``NAME``.

Everything but the client is :class:`~greenq.transports.redis.broker.RedisBroker`'s: the
same keys, scripts and reconnect state machine.  When the master dies, round
trips fail, the Reconnector drops the idle connections and retries with
backoff, and every new connection asks the sentinels for the master again, so
the broker resumes on the promoted replica as soon as Sentinel has promoted it
(``down-after-milliseconds`` plus the election).  Writes the old master had
acknowledged but not yet replicated are lost in a failover (Redis replicates
asynchronously); ``[redis] min_replicas`` narrows that window (docs/clusters.md).
"""
from __future__ import annotations


from .topology import make_sentinel_client
from .broker import RedisBroker


class RedisSentinelBroker(RedisBroker):
    """RedisBroker on the master Sentinel names; follows failovers."""

    client_factory = staticmethod(make_sentinel_client)
