"""The Redis transport: ``redis://``, ``rediss://`` (TLS), ``redis+sentinel://``
and ``redis+cluster://``; broker, results, control plane and scheduler leadership
(the last two not yet on Sentinel and Cluster).  Needs ``greenq[redis]``."""
from typing import Dict

from ..descriptor import Descriptor
from .settings import SETTINGS

_HERE = "greenq.transports.redis."


def _plain(name: str, sentinel: str = "", cluster: str = "") -> Dict[str, str]:
    """``module:Name`` of this package for redis:// and rediss://, and the
    Sentinel and Cluster ones where there are."""
    refs = {"redis": _HERE + name, "rediss": _HERE + name}
    if sentinel:
        refs["redis+sentinel"] = _HERE + sentinel
    if cluster:
        refs["redis+cluster"] = _HERE + cluster
    return refs


TRANSPORT = Descriptor(
    name="redis",
    schemes=("redis", "rediss", "redis+sentinel", "redis+cluster"),
    extra="redis",
    libraries=("redis",),
    ini_section="redis",
    settings=SETTINGS,
    default_ports={"redis": 6379, "rediss": 6380},
    celery_schemes=("redis", "rediss"),
    broker=_plain("celery_broker:CeleryRedisBroker", "broker_sentinel:RedisSentinelBroker",
                  "broker_cluster:RedisClusterBroker"),
    results=_plain("celery_results:CeleryRedisBackend", "results_sentinel:RedisSentinelBackend",
                   "results_cluster:RedisClusterBackend"),
    control=_plain("control:RedisTransport"),
    leadership=_plain("leadership:RedisLeadership"),
    coordination=_plain("coordination:RedisCoordination", "coordination:RedisSentinelCoordination",
                        "coordination:RedisClusterCoordination"),
    async_publisher=_plain("aio:RedisPublisher"),
    async_results=_plain("aio:RedisResults"),
)
