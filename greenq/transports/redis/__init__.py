"""The Redis transport: ``redis://``, ``rediss://`` (TLS), ``redis+sentinel://``
and ``redis+cluster://``; broker, results, control plane and scheduler leadership
(the last two not yet on Sentinel and Cluster).  Needs ``greenq[redis]``."""
from ..descriptor import Descriptor
from .settings import SETTINGS

_HERE = "greenq.transports.redis."

TRANSPORT = Descriptor(
    name="redis",
    schemes=("redis", "rediss", "redis+sentinel", "redis+cluster"),
    extra="redis",
    libraries=("redis",),
    ini_section="redis",
    settings=SETTINGS,
    default_ports={"redis": 6379, "rediss": 6380},
    celery_schemes=("redis", "rediss"),
    broker={"redis": _HERE + "celery_broker:CeleryRedisBroker", "rediss": _HERE + "celery_broker:CeleryRedisBroker",
            "redis+sentinel": _HERE + "broker_sentinel:RedisSentinelBroker",
            "redis+cluster": _HERE + "broker_cluster:RedisClusterBroker"},
    results={"redis": _HERE + "celery_results:CeleryRedisBackend",
             "rediss": _HERE + "celery_results:CeleryRedisBackend",
             "redis+sentinel": _HERE + "results_sentinel:RedisSentinelBackend",
             "redis+cluster": _HERE + "results_cluster:RedisClusterBackend"},
    control={"redis": _HERE + "control:RedisTransport", "rediss": _HERE + "control:RedisTransport"},
    leadership={"redis": _HERE + "leadership:RedisLeadership", "rediss": _HERE + "leadership:RedisLeadership"},
    coordination={"redis": _HERE + "coordination:RedisCoordination",
                  "rediss": _HERE + "coordination:RedisCoordination",
                  "redis+sentinel": _HERE + "coordination:RedisSentinelCoordination",
                  "redis+cluster": _HERE + "coordination:RedisClusterCoordination"},
    async_publisher={"redis": _HERE + "aio:RedisPublisher", "rediss": _HERE + "aio:RedisPublisher"},
    async_results={"redis": _HERE + "aio:RedisResults", "rediss": _HERE + "aio:RedisResults"},
)
