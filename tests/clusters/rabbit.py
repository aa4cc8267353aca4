"""A private three-node RabbitMQ cluster for the failover tests.

Each node is a ``rabbitmq-server`` of its own name (``gqcN<tag>@localhost``),
AMQP and distribution ports and data/log directories under one temporary
directory, run as the ``rabbitmq`` user so it shares that user's
``~/.erlang.cookie`` with ``rabbitmqctl``.  Nodes 2 and 3 join node 1 with
``rabbitmqctl -n NODE stop_app / join_cluster / start_app``.  The shared node
(rabbit@localhost on 5672) is never touched; ``stop()`` SIGKILLs only the
nodes started here, by the pids they wrote.
"""
from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from typing import Dict, List

from .servers import free_ports, wait_until

SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"
CTL = shutil.which("rabbitmqctl")


def available() -> bool:
    try:
        pwd.getpwnam("rabbitmq")
    except KeyError:
        return False
    return os.path.exists(SERVER) and CTL is not None and os.geteuid() == 0


class RabbitCluster:
    """Three RabbitMQ nodes joined in one cluster."""

    def __init__(self, nodes: int = 3) -> None:
        self.dir = tempfile.mkdtemp(prefix="greenq-rabbit-")
        user = pwd.getpwnam("rabbitmq")
        os.chown(self.dir, user.pw_uid, user.pw_gid)
        tag = uuid.uuid4().hex[:6]
        self.names = [f"gqc{i}{tag}@localhost" for i in range(1, nodes + 1)]
        ports = free_ports(2 * nodes)
        self.ports = ports[:nodes]
        self.dist_ports = ports[nodes:]
        self.procs: Dict[str, subprocess.Popen] = {}
        try:
            for i in range(nodes):
                self._start(i)
            for i in range(nodes):
                self.ctl(i, "wait", os.path.join(self.dir, f"n{i}", "pid"), "--timeout", "120", timeout=130)
            for i in range(1, nodes):
                self.ctl(i, "stop_app")
                self.ctl(i, "join_cluster", self.names[0])
                self.ctl(i, "start_app", timeout=120)
            wait_until(lambda: self._running() == nodes, 60, "every node running in the cluster", 0.5)
        except BaseException:
            self.stop()
            raise

    def _env(self, i: int) -> Dict[str, str]:
        base = os.path.join(self.dir, f"n{i}")
        conf = os.path.join(base, "rabbitmq.conf")
        os.makedirs(base, exist_ok=True)
        with open(conf, "w") as f:
            f.write(f"listeners.tcp.1 = 127.0.0.1:{self.ports[i]}\n"
                    "cluster_partition_handling = pause_minority\n")
        with open(os.path.join(base, "enabled_plugins"), "w") as f:
            f.write("[].\n")
        user = pwd.getpwnam("rabbitmq")
        for path in (base, conf, os.path.join(base, "enabled_plugins")):
            os.chown(path, user.pw_uid, user.pw_gid)
        env = {k: v for k, v in os.environ.items() if not k.startswith("RABBITMQ_")}
        env.update({
            "HOME": user.pw_dir,
            "RABBITMQ_NODENAME": self.names[i],
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.ports[i]),
            "RABBITMQ_DIST_PORT": str(self.dist_ports[i]),
            "RABBITMQ_MNESIA_BASE": os.path.join(base, "mnesia"),
            "RABBITMQ_LOG_BASE": os.path.join(base, "log"),
            "RABBITMQ_PID_FILE": os.path.join(base, "pid"),
            "RABBITMQ_CONFIG_FILE": conf,
            "RABBITMQ_ENABLED_PLUGINS_FILE": os.path.join(base, "enabled_plugins"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": os.path.join(base, "advanced.config"),
        })
        return env

    def _start(self, i: int) -> None:
        user = pwd.getpwnam("rabbitmq")

        def demote() -> None:
            os.setsid()
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
        log = open(os.path.join(self.dir, f"n{i}.out"), "w")
        self.procs[self.names[i]] = subprocess.Popen([SERVER], env=self._env(i), cwd=self.dir,
                                                     stdout=log, stderr=subprocess.STDOUT,
                                                     preexec_fn=demote)

    def ctl(self, i: int, *args: str, timeout: float = 60) -> str:
        done = subprocess.run([CTL, "-n", self.names[i], *args], capture_output=True, text=True,
                              timeout=timeout)
        if done.returncode:
            raise AssertionError(f"rabbitmqctl -n {self.names[i]} {' '.join(args)}: "
                                 f"{done.stderr or done.stdout}")
        return done.stdout

    def _running(self) -> int:
        out = self.ctl(0, "cluster_status", "--formatter", "json")
        import json
        return len(json.loads(out).get("running_nodes", []))

    def url(self, order: List[int] = None) -> str:
        """``;``-separated node list (node 1 first, unless ``order`` says otherwise)."""
        order = list(range(len(self.ports))) if order is None else order
        return ";".join(f"amqp://guest:guest@127.0.0.1:{self.ports[i]}//" for i in order)

    def kill(self, i: int) -> None:
        """SIGKILL node ``i``'s Erlang VM (a crash: nothing handed over)."""
        pidfile = os.path.join(self.dir, f"n{i}", "pid")
        with open(pidfile) as f:
            pid = int(f.read().strip())
        os.kill(pid, signal.SIGKILL)
        proc = self.procs.pop(self.names[i], None)
        if proc is not None:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                pass

    def stop(self) -> None:
        for i, name in enumerate(self.names):
            if name in self.procs:
                try:
                    self.kill(i)
                except (OSError, ValueError):
                    proc = self.procs.pop(name)
                    if proc.poll() is None:
                        os.killpg(proc.pid, signal.SIGKILL)
        time.sleep(0.2)
        shutil.rmtree(self.dir, ignore_errors=True)
