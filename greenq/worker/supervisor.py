"""The supervisor: runs N worker children and replaces any that exits, outgrows
``max_memory_per_child``, or whose hub is stuck; forwards SIGTERM/SIGINT
(warm) and SIGQUIT (cold) to them, once: a child that already received the
stop (systemd or a terminal signalled the whole group) is not signalled again
(greenq/worker/signals.py).

A child whose hub is stuck in C code or a CPU loop cannot obey its own time
limits or renew its leases.  Each child touches a heartbeat file from its hub
every second; when the file is older than ``lease_seconds`` (the moment other
workers may take its messages anyway) the supervisor kills the child with
SIGKILL and starts a new one.  Its unfinished messages come back to the queue
as their leases expire (RabbitMQ: at once).

A child that dies soon after it started is restarted after an exponential
backoff, with one log line per restart.  With ``--http HOST:PORT`` the
supervisor alone binds HOST:PORT; each child serves on a free local port and
the supervisor's /metrics sums theirs, its /healthz is 200 only when every
child is healthy.
"""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from typing import Any, Dict, List, Optional, Tuple

from ..backoff import Backoff
from ..httpserve import routes_app, serve
from .monitor import HEARTBEAT_ENV, HTTP_PORT_ENV, METRICS_TYPE
from .signals import COLD, FORWARD_GRACE, WARM, StopSignals, ask_path, ask_to_stop, notice_path, read_notice

log = logging.getLogger("greenq.supervisor")

#: a child that ran at least this long before exiting restarts at once; one
#: that dies sooner is restarted after an exponential backoff (0.5 s doubling up to 60 s)
HEALTHY_UPTIME = 10.0
RESTART_FIRST_DELAY, RESTART_MAX_DELAY = 0.5, 60.0
EXIT_USAGE = 2


class Child:
    def __init__(self, argv: List[str], workdir: str, index: int, http: bool) -> None:
        self.index = index
        self.heartbeat = os.path.join(workdir, f"child-{index}")
        with open(self.heartbeat, "w"):
            pass
        for stale in (notice_path(self.heartbeat), ask_path(self.heartbeat)):  # this slot's previous child's
            if os.path.exists(stale):
                os.unlink(stale)
        env = dict(os.environ, **{HEARTBEAT_ENV: self.heartbeat})
        self.port_file: Optional[str] = None
        if http:  # the child serves on a free local port and tells us which
            self.port_file = os.path.join(workdir, f"child-{index}.port")
            if os.path.exists(self.port_file):
                os.unlink(self.port_file)
            env[HTTP_PORT_ENV] = self.port_file
        self.proc = subprocess.Popen([sys.executable, "-m", "greenq.worker", *argv, "--child"], env=env)
        self.started = time.time()
        self.asked_to_stop = False
        self.signalled = 0          # the stop (WARM, COLD) this supervisor sent or saw the child receive

    def stale_for(self) -> float:
        try:
            last = max(os.path.getmtime(self.heartbeat), self.started)
        except OSError:
            last = self.started
        return time.time() - last

    def http_port(self) -> Optional[int]:
        try:
            with open(self.port_file or "") as fh:
                return int(fh.read())
        except (OSError, ValueError):
            return None


class Supervisor:
    def __init__(self, argv: List[str], processes: int, max_memory_mib: int, driver: Any,
                 stuck_after: float = 30.0, http: str = "") -> None:
        self.argv = [a for a in argv if a != "--child"]
        self.processes = processes
        self.max_memory = max_memory_mib * 1024 * 1024
        self.driver = driver
        self.stuck_after = max(stuck_after, 5.0)
        self.http = http
        self.children: List[Optional[Child]] = []
        #: per slot: its quick deaths in a row (``attempt``) and the wait before the next restart
        self.restarts = [Backoff(RESTART_FIRST_DELAY, RESTART_MAX_DELAY) for _ in range(processes)]
        self.restart_at: List[Optional[float]] = [None] * processes
        self.stopping = 0
        self._forward_at = 0.0
        self.burst = "--burst" in argv
        self._dir = tempfile.mkdtemp(prefix="greenq-supervisor-")
        self._server: Any = None

    def _stop(self, cold: bool = False) -> None:
        """Stop every child, warm or cold: forwarded by ``_forward`` after
        FORWARD_GRACE, to the children that have not received it themselves."""
        self.stopping = COLD if cold else max(self.stopping, WARM)
        self._forward_at = time.monotonic() + FORWARD_GRACE

    def _forward(self) -> None:
        """Send the stop (SIGTERM warm, SIGQUIT cold) to each live child once,
        unless its notice shows it received this stop already."""
        if time.monotonic() < self._forward_at:
            return
        for child in self.children:
            if child is None or child.signalled >= self.stopping or child.proc.poll() is not None:
                continue
            if read_notice(child.heartbeat) < self.stopping:
                child.proc.send_signal(signal.SIGQUIT if self.stopping == COLD else signal.SIGTERM)
            child.signalled = self.stopping

    def _start(self, index: int) -> Child:
        return Child(self.argv, self._dir, index, bool(self.http))

    def run(self) -> int:
        StopSignals(self._stop).install(self.driver)
        if self.http:  # one endpoint for every child: bound here, before any child starts
            self._server = serve(self.http, routes_app({"/healthz": self._healthz, "/metrics": self._metrics}),
                                 self.driver)
            log.info("supervisor: serving /metrics and /healthz of all %d children on %s",
                     self.processes, self.http)
        self.children = [self._start(i) for i in range(self.processes)]
        log.info("supervisor %d: started %d worker process(es)", os.getpid(), self.processes)
        try:
            return self._loop()
        finally:
            if self._server is not None:
                self._server.server_close()

    def _loop(self) -> int:
        worst = 0
        while True:
            if self.stopping:
                self._forward()
            alive = 0
            for i, child in enumerate(self.children):
                if child is None:
                    restart_at = self.restart_at[i]
                    if restart_at is not None and not self.stopping:
                        alive += 1
                        if time.monotonic() >= restart_at:
                            self.restart_at[i] = None
                            self.children[i] = self._start(i)
                    continue
                code = child.proc.poll()
                if code is None:
                    alive += 1
                    self._check(child)
                    continue
                self.children[i] = None
                if self.stopping or self.burst:
                    # a child stopped by our own signal before it could install handlers is clean too
                    clean = code == 0 or (self.stopping and code in (-signal.SIGTERM, -signal.SIGINT,
                                                                     -signal.SIGQUIT))
                    worst = max(worst, 0 if clean else 1)
                    if code == EXIT_USAGE:
                        worst = EXIT_USAGE
                elif code == EXIT_USAGE:  # a configuration error does not heal by restarting
                    log.error("child %d (slot %d) exited with a configuration error (exit code 2); "
                              "stopping the other children", child.proc.pid, i)
                    worst = EXIT_USAGE
                    self._stop()
                else:
                    alive += 1
                    self._schedule_restart(i, child, code)
            if not alive:
                return worst
            self.driver.sleep(0.2)

    def _schedule_restart(self, index: int, child: Child, code: int) -> None:
        """Restart slot ``index``: at once after a clean exit or a long life,
        else after an exponential backoff; one log line either way."""
        uptime = time.time() - child.started
        restarts = self.restarts[index]
        if code == 0 or uptime >= HEALTHY_UPTIME:
            restarts.reset()
            delay = 0.0
        else:
            delay = restarts.next()
        how = f"exit code {code}" if code >= 0 else f"signal {-code}"
        again = f" (failure {restarts.attempt} in a row)" if restarts.attempt else ""
        log.log(logging.INFO if not restarts.attempt else logging.WARNING,
                "child %d (slot %d) exited with %s after %.1f s%s; restarting in %.1f s",
                child.proc.pid, index, how, uptime, again, delay)
        self.restart_at[index] = time.monotonic() + delay
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
            ask_to_stop(child.proc, child.heartbeat)

    # -- one HTTP endpoint for all children ------------------------------------
    def _scrape(self, path: str) -> List[Tuple[int, Optional[int], str]]:
        """(slot, HTTP status or None, body) of ``path`` from every live child."""
        out = []
        for child in self.children:
            if child is None or child.proc.poll() is not None:
                continue
            port = child.http_port()
            status, body = None, "not serving yet"
            if port is not None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                        status, body = resp.status, resp.read().decode()
                except urllib.error.HTTPError as exc:
                    status, body = exc.code, exc.read().decode()
                except OSError as exc:
                    body = str(exc)
            out.append((child.index, status, body))
        return out

    def _healthz(self) -> "tuple[int, str, str]":
        """200 when every configured child is up and healthy, else 503; each child's answer."""
        answers = self._scrape("/healthz")
        children = []
        for index, status, body in answers:
            try:
                detail = json.loads(body)
            except ValueError:
                detail = {"status": "unreachable", "error": body}
            children.append(dict(detail, slot=index))
        ok = len(answers) == self.processes and all(status == 200 for _, status, _ in answers)
        doc = {"status": "ok" if ok else "unhealthy", "processes": self.processes,
               "alive": len(answers), "children": children}
        return (200 if ok else 503), json.dumps(doc), "application/json"

    def _metrics(self) -> "tuple[int, str, str]":
        """Every child's metrics as one exposition (each sample labelled
        ``child="<slot>"``, so per-task series and histograms stay whole),
        plus the process counts."""
        text = merge([(index, body) for index, status, body in self._scrape("/metrics") if status == 200])
        alive = sum(1 for c in self.children if c and c.proc.poll() is None)
        text += "\n".join(["# HELP greenq_processes Worker processes configured",
                           "# TYPE greenq_processes gauge", f"greenq_processes {self.processes}",
                           "# HELP greenq_processes_alive Worker processes running",
                           "# TYPE greenq_processes_alive gauge", f"greenq_processes_alive {alive}"]) + "\n"
        return 200, text, METRICS_TYPE


def merge(texts: List[Tuple[int, str]]) -> str:
    """Prometheus text from several children as one exposition: each family's
    HELP and TYPE once, then its samples from every child, labelled by slot."""
    families: Dict[str, Dict[str, Any]] = {}
    for slot, text in texts:
        family: Optional[Dict[str, Any]] = None
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                name = line.split(" ", 3)[2]
                family = families.setdefault(name, {"help": None, "type": None, "samples": []})
                family["help" if line.startswith("# HELP") else "type"] = line
            elif line and not line.startswith("#") and family is not None:
                family["samples"].append(_labelled(line, slot))
    out: List[str] = []
    for family in families.values():
        out.extend(x for x in (family["help"], family["type"]) if x)
        out.extend(family["samples"])
    return "\n".join(out) + "\n"


def _labelled(sample: str, slot: int) -> str:
    name_end = min((i for i in (sample.find("{"), sample.find(" ")) if i >= 0), default=len(sample))
    if sample[name_end:name_end + 1] == "{":
        return f'{sample[:name_end]}{{child="{slot}",{sample[name_end + 1:]}'
    return f'{sample[:name_end]}{{child="{slot}"}}{sample[name_end:]}'


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0
