"""The supervisor: runs N worker children and replaces any that exits or
outgrows ``max_memory_per_child``; forwards SIGTERM/SIGINT/SIGQUIT.

A child whose hub is stuck in C code cannot obey its own time limits; the
supervisor kills it (SIGKILL) when its memory limit is passed, and restarts
it.  Its unfinished messages come back when their leases expire.
"""
from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from typing import Any, List

log = logging.getLogger("greenq.supervisor")


class Supervisor:
    def __init__(self, argv: List[str], processes: int, max_memory_mib: int, driver: Any) -> None:
        self.argv = [a for a in argv if a != "--child"]
        self.processes = processes
        self.max_memory = max_memory_mib * 1024 * 1024
        self.driver = driver
        self.children: List[subprocess.Popen] = []
        self.stopping = 0
        self.burst = "--burst" in argv

    def _spawn(self) -> subprocess.Popen:
        cmd = [sys.executable, "-m", "greenq.worker", *self.argv, "--child"]
        return subprocess.Popen(cmd)

    def _stop(self, cold: bool = False) -> None:
        self.stopping = 2 if (cold or self.stopping) else 1
        for child in self.children:
            if child.poll() is None:
                child.send_signal(signal.SIGQUIT if self.stopping == 2 else signal.SIGTERM)

    def run(self) -> int:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self.driver.install_signal(signum, self._stop)
        self.driver.install_signal(signal.SIGQUIT, lambda: self._stop(cold=True))
        self.children = [self._spawn() for _ in range(self.processes)]
        log.info("supervisor %d: started %d worker processes", os.getpid(), self.processes)
        worst = 0
        while True:
            alive = 0
            for i, child in enumerate(self.children):
                code = child.poll()
                if code is None:
                    alive += 1
                    if self.max_memory and _rss(child.pid) > self.max_memory:
                        log.warning("child %d passed max_memory_per_child: asking it to stop", child.pid)
                        child.send_signal(signal.SIGTERM)
                    continue
                if code not in (0, None):
                    worst = max(worst, 1)
                if not self.stopping and not self.burst:
                    log.info("child %d exited (%s): starting a replacement", child.pid, code)
                    self.children[i] = self._spawn()
                    alive += 1
            if not alive:
                return worst
            self.driver.sleep(0.2)


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
