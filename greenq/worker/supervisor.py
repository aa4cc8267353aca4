"""The supervisor: runs N worker children and replaces any that exits, outgrows
``max_memory_per_child``, or whose hub is stuck; forwards SIGTERM/SIGINT
(warm) and SIGQUIT (cold) to them.

A child whose hub is stuck in C code or a CPU loop cannot obey its own time
limits or renew its leases.  Each child touches a heartbeat file from its hub
every second; when the file is older than ``lease_seconds`` (the moment other
workers may take its messages anyway) the supervisor kills the child with
SIGKILL and starts a new one.  Its unfinished messages come back to the queue
as their leases expire (RabbitMQ: at once).

With ``--http HOST:PORT`` the supervisor serves one /metrics and /healthz
for every child (children_http.py).
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any, List, Optional

from .children_http import ChildrenEndpoint
from .monitor import HEARTBEAT_ENV

log = logging.getLogger("greenq.supervisor")


class Child:
    def __init__(self, argv: List[str], heartbeat_dir: str, index: int) -> None:
        self.heartbeat = os.path.join(heartbeat_dir, f"child-{index}")
        with open(self.heartbeat, "w"):
            pass
        env = dict(os.environ, **{HEARTBEAT_ENV: self.heartbeat})
        self.proc = subprocess.Popen([sys.executable, "-m", "greenq.worker", *argv, "--child"], env=env)
        self.started = time.time()
        self.asked_to_stop = False

    def stale_for(self) -> float:
        try:
            last = max(os.path.getmtime(self.heartbeat), self.started)
        except OSError:
            last = self.started
        return time.time() - last


class Supervisor:
    def __init__(self, argv: List[str], processes: int, max_memory_mib: int, driver: Any,
                 stuck_after: float = 30.0, http: str = "") -> None:
        self.argv = [a for a in argv if a != "--child"]
        self.processes = processes
        self.max_memory = max_memory_mib * 1024 * 1024
        self.driver = driver
        self.stuck_after = max(stuck_after, 5.0)
        self.children: List[Optional[Child]] = []
        self.stopping = 0
        self.burst = "--burst" in argv
        self._dir = tempfile.mkdtemp(prefix="greenq-supervisor-")
        self.endpoint = (ChildrenEndpoint(http, self._slots, driver) if http else None)

    def _slots(self) -> List["tuple[int, str]"]:
        return [(i, c.heartbeat) for i, c in enumerate(self.children) if c is not None]

    def _stop(self, cold: bool = False) -> None:
        self.stopping = 2 if (cold or self.stopping) else 1
        for child in self.children:
            if child and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGQUIT if self.stopping == 2 else signal.SIGTERM)

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.driver.install_signal(signum, self._stop)
        self.driver.install_signal(signal.SIGQUIT, lambda: self._stop(cold=True))
        self.children = [Child(self.argv, self._dir, i) for i in range(self.processes)]
        if self.endpoint is not None:
            self.endpoint.start()
        try:
            return self._watch()
        finally:
            if self.endpoint is not None:
                self.endpoint.stop()

    def _watch(self) -> int:
        log.info("supervisor %d: started %d worker process(es)", os.getpid(), self.processes)
        worst = 0
        while True:
            alive = 0
            for i, child in enumerate(self.children):
                if child is None:
                    continue
                code = child.proc.poll()
                if code is None:
                    alive += 1
                    self._check(child)
                    continue
                if self.stopping or self.burst:
                    # a child stopped by our own signal before it could install handlers is clean too
                    clean = code == 0 or (self.stopping and code in (-signal.SIGTERM, -signal.SIGQUIT))
                    worst = max(worst, 0 if clean else 1)
                    self.children[i] = None
                else:
                    log.info("child %d exited (%s): starting a replacement", child.proc.pid, code)
                    self.children[i] = Child(self.argv, self._dir, i)
                    alive += 1
            if not alive:
                return worst
            self.driver.sleep(0.2)

    def _check(self, child: Child) -> None:
        stale = child.stale_for()
        if stale > self.stuck_after:
            log.error("child %d: hub stuck for %.0f s (no heartbeat); killing it and starting another",
                      child.proc.pid, stale)
            child.proc.kill()
        elif (self.max_memory and not child.asked_to_stop and not self.stopping
              and _rss(child.proc.pid) > self.max_memory):
            log.warning("child %d passed max_memory_per_child: asking it to stop", child.proc.pid)
            child.asked_to_stop = True
            child.proc.send_signal(signal.SIGTERM)


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
