"""``[redis]``: the settings of the Redis transport (docs/configuration.md)."""
from __future__ import annotations

from typing import Dict

from ...setting import MAX_TIMEOUT, Setting

MAX_REDIS_CONNECTIONS = 10000             # Redis's default maxclients

SETTINGS: Dict[str, Setting] = {
    "max_connections": Setting("int", 0, "connection pool size per process; 0 = automatic: up to 10 "
                               "in a client (broker and results each, + 1 result listener: "
                               "21 in all), concurrency + 10 for a worker's broker",
                               MAX_REDIS_CONNECTIONS),
    "socket_timeout": Setting("float", 10.0, "seconds before a silent connection is declared dead",
                              MAX_TIMEOUT),
    "connect_timeout": Setting("float", 2.0, "seconds to open a connection; a client's publish "
                               "fails after this long while Redis is unreachable (workers retry)",
                               MAX_TIMEOUT),
    "health_check_interval": Setting("float", 15.0, "seconds between connection health checks",
                                     MAX_TIMEOUT),
    "min_replicas": Setting("int", 0, "replicas a publish and an ack wait for (WAIT); 0 = none", 100),
    "idle_timeout": Setting("float", 60.0, "seconds before an unused pooled connection (and an unused "
                            "result listener) is closed; 0 = keep them open", MAX_TIMEOUT),
}
