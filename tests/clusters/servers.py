"""Private Redis Cluster and Redis Sentinel deployments for the failover tests.

Every server runs on a free port of 127.0.0.1 with its files in a temporary
directory, and is SIGKILLed and removed afterwards.  The shared Redis on 6379
is never touched.  ``python -m tests.clusters.bench`` uses the same classes.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from typing import Dict, List, Optional

import redis

REDIS_SERVER = shutil.which("redis-server")
REDIS_CLI = shutil.which("redis-cli")


def free_ports(n: int) -> List[int]:
    """``n`` distinct ports nothing listens on (and whose +10000 cluster bus
    port is free too)."""
    ports: List[int] = []
    socks = []
    while len(ports) < n:
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        socks.append(s)
        if port + 10000 > 65535 or port in ports:
            continue
        try:
            with socket.socket() as bus:
                bus.bind(("127.0.0.1", port + 10000))
        except OSError:
            continue
        ports.append(port)
    for s in socks:
        s.close()
    return ports


def wait_until(check, timeout: float, what: str, step: float = 0.05) -> None:
    """Poll ``check()`` until it is true; AssertionError after ``timeout``."""
    end = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (redis.RedisError, OSError):
            pass
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


def replica_synced(port: int) -> bool:
    """True for a master, or a replica whose link to its master is up."""
    info = redis.Redis(port=port, socket_timeout=1).info("replication")
    return info["role"] == "master" or info.get("master_link_status") == "up"


class Servers:
    """A set of redis-server processes in one temporary directory."""

    def __init__(self) -> None:
        self.dir = tempfile.mkdtemp(prefix="greenq-cluster-")
        self.procs: Dict[int, subprocess.Popen] = {}

    def start(self, port: int, *args: str, conf: Optional[str] = None) -> None:
        where = os.path.join(self.dir, str(port))
        os.makedirs(where, exist_ok=True)
        cmd = [REDIS_SERVER]
        if conf is not None:
            path = os.path.join(where, "server.conf")
            with open(path, "w") as f:
                f.write(conf)
            cmd.append(path)
        cmd += ["--port", str(port), "--bind", "127.0.0.1", "--dir", where, "--save", "",
                "--appendonly", "no", "--protected-mode", "no", "--logfile", os.path.join(where, "log"),
                "--repl-diskless-sync-delay", "0", *args]
        self.procs[port] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: redis.Redis(port=port, socket_timeout=1).ping(), 10, f"redis on {port}")

    def kill(self, port: int) -> None:
        """SIGKILL: no chance to hand anything over."""
        proc = self.procs.pop(port)
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)

    def freeze(self, port: int, frozen: bool = True) -> None:
        """SIGSTOP (or SIGCONT): a server that stops reading, e.g. a lagging replica."""
        self.procs[port].send_signal(signal.SIGSTOP if frozen else signal.SIGCONT)

    def stop(self) -> None:
        for port in list(self.procs):
            self.kill(port)
        shutil.rmtree(self.dir, ignore_errors=True)


class RedisCluster(Servers):
    """Three masters and three replicas (``redis-cli --cluster create``)."""

    def __init__(self, node_timeout_ms: int = 1000) -> None:
        super().__init__()
        self.ports = free_ports(6)
        try:
            for port in self.ports:
                self.start(port, "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                           "--cluster-node-timeout", str(node_timeout_ms),
                           "--cluster-replica-validity-factor", "0",
                           "--cluster-require-full-coverage", "no")
            subprocess.run([REDIS_CLI, "--cluster", "create",
                            *[f"127.0.0.1:{p}" for p in self.ports],
                            "--cluster-replicas", "1", "--cluster-yes"],
                           check=True, capture_output=True, timeout=60)
            wait_until(self._ok, 30, "cluster_state:ok on every node", 0.2)
            wait_until(self._synced, 30, "every replica in sync with its master", 0.1)
        except BaseException:
            self.stop()
            raise

    def _ok(self) -> bool:
        for port in self.procs:
            info = redis.Redis(port=port, socket_timeout=1).cluster("info")
            if info.get("cluster_state") != "ok":
                return False
        return True

    def _synced(self) -> bool:
        return all(replica_synced(port) for port in self.procs)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:3])

    def master_of(self, key: str) -> int:
        """Port of the master serving ``key``'s slot."""
        any_port = next(iter(self.procs))
        client = redis.Redis(port=any_port, socket_timeout=1)
        slot = client.cluster("keyslot", key)
        for start, end, master, *_ in client.cluster("slots"):
            if start <= slot <= end:
                return int(master[1])
        raise AssertionError(f"no master for slot {slot}")

    def wait_ok(self, timeout: float = 20) -> None:
        wait_until(self._ok, timeout, "cluster_state:ok after a failover", 0.1)


class RedisSentinel(Servers):
    """A master, ``replicas`` replicas and three sentinels watching ``NAME``."""

    NAME = "gqmaster"

    def __init__(self, down_after_ms: int = 1000, replicas: int = 1) -> None:
        super().__init__()
        self.master, *self.replicas = free_ports(1 + replicas)
        self.replica = self.replicas[0]
        self.sentinels = free_ports(3)
        try:
            self.start(self.master)
            for port in self.replicas:
                self.start(port, "--replicaof", "127.0.0.1", str(self.master))
            conf = (f"sentinel monitor {self.NAME} 127.0.0.1 {self.master} 2\n"
                    f"sentinel down-after-milliseconds {self.NAME} {down_after_ms}\n"
                    f"sentinel failover-timeout {self.NAME} 10000\n"
                    f"sentinel parallel-syncs {self.NAME} 1\n")
            for port in self.sentinels:
                self.start(port, "--sentinel", conf=conf)
            wait_until(lambda: all(map(replica_synced, self.replicas)), 20, "the replicas in sync", 0.1)
            wait_until(self._watching, 20, "sentinels seeing the replica and each other", 0.1)
        except BaseException:
            self.stop()
            raise

    def _watching(self) -> bool:
        for port in self.sentinels:
            state = redis.Redis(port=port, socket_timeout=1).sentinel_master(self.NAME)
            if state["num-slaves"] < 1 or state["num-other-sentinels"] < 2:
                return False
        return True

    def url(self, db: int = 0) -> str:
        hosts = ",".join(f"127.0.0.1:{p}" for p in self.sentinels)
        return f"redis+sentinel://{hosts}/{db}?master={self.NAME}"

    def current_master(self) -> int:
        return int(redis.Redis(port=self.sentinels[0], socket_timeout=1)
                   .sentinel_get_master_addr_by_name(self.NAME)[1])
