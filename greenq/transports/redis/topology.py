"""Clients for Redis behind Sentinel and for Redis Cluster, built from their URLs.

``redis+sentinel://[[user]:pw@]host:26379[,host:26379…]/db?master=NAME``
    The sentinels are asked for the master of ``NAME`` every time a new
    connection is opened, so after a failover the next connection (the
    broker's Reconnector drops the idle ones when a round trip fails) goes to
    the promoted replica.  The password is the data nodes'; sentinels that
    need their own take ``&sentinel_password=...``.

``redis+cluster://[[user]:pw@]host:port[,host:port…]``
    Seed nodes of a Redis Cluster; redis-py's RedisCluster finds the rest and
    follows MOVED/ASK redirections and failovers.  Only database 0 exists.

Both share the ``[redis]`` settings of plain ``redis://`` (pool size, socket
timeout, health checks) and, like it, leave retries to the owner's
Reconnector.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, unquote

import redis
from redis.backoff import NoBackoff
from redis.commands.core import Script
from redis.connection import Encoder
from redis.retry import Retry
from redis.sentinel import Sentinel, SentinelConnectionPool

from redis.exceptions import ClusterDownError, SlotNotCoveredError, TryAgainError

from .client import CLIENT_CONNECTIONS, TRANSIENT, Pool, client_name
from ...config import Config, mask_url
from ...exceptions import BrokerError

SENTINEL_PORT = 26379
CLUSTER_PORT = 6379


@dataclass
class Topology:
    """What a ``redis+sentinel://`` or ``redis+cluster://`` URL says."""

    hosts: List[Tuple[str, int]]
    db: int = 0
    username: Optional[str] = None
    password: Optional[str] = None
    options: Dict[str, str] = field(default_factory=dict)


def parse(url: str, default_port: int) -> Topology:
    """Split a multi-host URL (``urlsplit`` refuses a comma in the port)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise BrokerError(f"bad Redis URL {mask_url(url)}: expected SCHEME://HOST:PORT[,HOST:PORT...]")
    netloc, _, tail = rest.partition("/")
    path, _, query = tail.partition("?")
    if "?" in netloc:
        netloc, _, query = netloc.partition("?")
    userinfo, at, hostlist = netloc.rpartition("@")
    topo = Topology(hosts=[])
    if at:
        user, colon, password = userinfo.partition(":")
        topo.username = unquote(user) or None
        topo.password = unquote(password) if colon else None
    for item in hostlist.split(","):
        host, colon, port = item.strip().rpartition(":")
        if not colon:
            host, port = port, ""
        host = host.strip("[]")
        if not host or (port and not port.isdigit()):
            raise BrokerError(f"bad Redis URL {mask_url(url)}: {item!r} is not HOST:PORT")
        topo.hosts.append((host, int(port) if port else default_port))
    path = path.strip("/")
    if path:
        if not path.isdigit():
            raise BrokerError(f"bad Redis URL {mask_url(url)}: database {path!r} is not a number")
        topo.db = int(path)
    topo.options = {k: v[-1] for k, v in parse_qs(query).items()}
    return topo


def _common(config: Config) -> Dict[str, Any]:
    """Connection options shared with plain redis:// (greenq.transports.redis.client.make_client)."""
    opts = config.section("redis")
    timeout = opts["socket_timeout"] or None
    connect = min((opts["connect_timeout"] or timeout or 2.0) / 2, timeout or float("inf"))
    return dict(socket_timeout=timeout, socket_connect_timeout=connect, socket_keepalive=True,
                health_check_interval=opts["health_check_interval"], retry=Retry(NoBackoff(), 0))


class _SentinelPool(SentinelConnectionPool, Pool):
    """A Sentinel-managed pool with greenq's pool behaviour (callers over the
    cap wait, idle connections close, ``grow``), as plain redis:// has."""


def sentinel_client(url: str, config: Config, name: str, size: int) -> "redis.Redis":
    """A client on the current master of the URL's ``master=NAME``."""
    topo = parse(url, SENTINEL_PORT)
    master = topo.options.get("master") or topo.options.get("service_name")
    if not master:
        raise BrokerError(f"bad Redis URL {mask_url(url)}: redis+sentinel:// needs ?master=NAME")
    common = _common(config)
    sentinel_kwargs = {k: v for k, v in common.items() if k.startswith("socket_")}
    if "sentinel_password" in topo.options:
        sentinel_kwargs["password"] = topo.options["sentinel_password"]
    manager = Sentinel(topo.hosts, sentinel_kwargs=sentinel_kwargs)
    pool = _SentinelPool(master, manager, max_connections=size,
                         db=topo.db, username=topo.username, password=topo.password,
                         client_name=client_name(config.key_prefix, name), **common)
    return redis.Redis(connection_pool=pool)


class _AllNodePools:
    """What RedisBroker/RedisBackend call ``client.connection_pool``: dropping
    idle connections drops them on every node."""

    def __init__(self, cluster: "LazyCluster") -> None:
        self.cluster = cluster

    def _pools(self) -> List[Any]:
        client = self.cluster.built
        if client is None:
            return []
        return [n.redis_connection.connection_pool for n in client.get_nodes()
                if n.redis_connection is not None]

    def disconnect(self, inuse_connections: bool = True) -> None:
        for pool in self._pools():
            pool.disconnect(inuse_connections=inuse_connections)

    def grow(self, size: int) -> None:
        """Raise every node's cap (and the one of nodes met later) to ``size``."""
        self.cluster.size = max(self.cluster.size, size)
        client = self.cluster.built
        if client is not None:
            client.nodes_manager.connection_kwargs["max_connections"] = self.cluster.size
        for pool in self._pools():
            pool.grow(size)


class LazyCluster:
    """A RedisCluster client made at its first use, as making one contacts the
    seed nodes: a worker started while the cluster is unreachable then waits
    for it like for any broker (its round trips fail with ConnectionError and
    are retried), rather than failing at start.  Everything else is the
    client's (attribute access builds it)."""

    def __init__(self, build: Callable[[int], Any], size: int) -> None:
        self._build = build
        self._lock = threading.Lock()
        self.built: Any = None
        self.size = size                       # connections per node
        self._callbacks: Dict[str, Any] = {}
        self.connection_pool = _AllNodePools(self)

    def set_response_callback(self, command: str, callback: Any) -> None:
        """Replies of ``command`` go through ``callback``.  A cluster parses a
        reply on the node's client first, so the callback is set there too,
        on the nodes there are and on those met later (a promoted replica)."""
        self._callbacks[command] = callback
        if self.built is not None:
            self._apply_callbacks(self.built)

    def _apply_callbacks(self, client: Any) -> None:
        for command, callback in self._callbacks.items():
            client.set_response_callback(command, callback)
            for node in client.get_nodes():
                if node.redis_connection is not None:
                    node.redis_connection.set_response_callback(command, callback)
        manager = client.nodes_manager
        if not getattr(manager, "greenq_callbacks", False):
            create = manager.create_redis_node

            def create_redis_node(*args: Any, **kwargs: Any) -> Any:
                node_client = create(*args, **kwargs)
                for command, callback in self._callbacks.items():
                    node_client.set_response_callback(command, callback)
                return node_client
            manager.create_redis_node = create_redis_node
            manager.greenq_callbacks = True

    def get_encoder(self) -> Encoder:
        """For ``register_script`` (a script's SHA), without connecting."""
        return Encoder("utf-8", "strict", False)

    def register_script(self, script: str) -> Script:
        return Script(self, script)  # type: ignore[arg-type]  # Script calls evalsha/script_load: forwarded

    def __getattr__(self, name: str) -> Any:
        client = self.built
        if client is None:
            with self._lock:
                if self.built is None:
                    client = self._build(self.size)
                    self._apply_callbacks(client)
                    self.built = client
                client = self.built
        return getattr(client, name)


def cluster_client(url: str, config: Config, name: str, size: int) -> LazyCluster:
    """A RedisCluster client on the URL's seed nodes, with a greenq pool of
    ``size`` connections per node, made at its first use."""
    from redis.cluster import ClusterNode, RedisCluster
    from redis.exceptions import RedisClusterException

    topo = parse(url, CLUSTER_PORT)
    if topo.db:
        raise BrokerError(f"bad Redis URL {mask_url(url)}: a Redis Cluster has only database 0")
    common = _common(config)
    common.pop("retry")          # the cluster client's own; its nodes never retry
    # Seeds given as a redis:// URL make redis-py build each node's pool from
    # connection_pool_class: greenq's pool, as plain redis:// has.
    first, rest = topo.hosts[0], topo.hosts[1:]

    def build(size: int) -> Any:
        try:
            return RedisCluster(url=f"redis://{first[0]}:{first[1]}/0",
                                startup_nodes=[ClusterNode(h, p) for h, p in rest],
                                username=topo.username, password=topo.password,
                                connection_pool_class=Pool, max_connections=size,
                                client_name=client_name(config.key_prefix, name),
                                retry=Retry(NoBackoff(), 0), **common)
        except (redis.RedisError, RedisClusterException) as exc:
            raise redis.ConnectionError(f"no node of {mask_url(url)} answered: {exc}") from exc
    return LazyCluster(build, size)


#: errors a cluster failover causes: retried with backoff like a lost connection
CLUSTER_TRANSIENT = TRANSIENT + (ClusterDownError, TryAgainError, SlotNotCoveredError)


def make_sentinel_client(url: str, config: Config, role: str = "", extra: int = 0) -> "redis.Redis":
    """:func:`greenq.transports.redis.client.make_client` for a ``redis+sentinel://`` URL."""
    return sentinel_client(url, config, role,
                           (config.section("redis")["max_connections"] or CLIENT_CONNECTIONS) + extra)


def make_cluster_client(url: str, config: Config, role: str = "", extra: int = 0) -> Any:
    """:func:`greenq.transports.redis.client.make_client` for a ``redis+cluster://`` URL."""
    return cluster_client(url, config, role,
                          (config.section("redis")["max_connections"] or CLIENT_CONNECTIONS) + extra)
